"""``eval_linear.py``'s command line with the training augmentation replaced by the deterministic evaluation
transform, so that a 1-process and a 2-process run see the same pixels (the random crops of the official path
are drawn per process from its own RNG stream, so they differ with the number of processes).

Usage: python tests/eval/linear_worker.py EVAL_LINEAR_FLAGS...   (alone or under torchrun)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import eval_linear  # noqa: E402
from utils.data.augment.per_image import eval_transform  # noqa: E402

if __name__ == "__main__":
    eval_linear.train_transform = eval_transform
    sys.exit(eval_linear.cli(sys.argv[1:]))
