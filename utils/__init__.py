"""tinydino's shared package: one module a concern.

The scripts on top (``main_dino.py``, ``eval_knn.py``, ...) import from here and never from each other.
A few names are re-exported at the package level because the official DINO code exposes them as ``utils.X``.
"""

from utils.train.schedules import cosine_scheduler

__all__ = ["cosine_scheduler"]
