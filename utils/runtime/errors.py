"""The errors that mean the user must change something (a flag, a file, the data), not a bug in tinydino.

Every one derives from :class:`UserError`; the scripts report it as one line, ``<script>: error: <message>``, with
exit status 2 and no traceback (``utils.runtime.cli.user_errors``). The message says what to do. Each class also
derives from the built-in exception a caller would expect (``ValueError`` for a bad value, ``RuntimeError`` for a
state that cannot go on).
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: a problem the user fixes; the message is one line that says how."""


class UsageError(UserError, ValueError):
    """A flag value out of range or a combination of flags that cannot work."""


class ModelError(UserError, ValueError):
    """A user mistake about the model (unknown architecture, weights that do not fit), with what to do about it."""


class DatasetError(UserError):
    """A user-side dataset problem (missing, empty, unreadable, without labels where labels are needed)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, unsafe, or without the expected keys)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that only full unpickling (which can run arbitrary code) would load."""


class NonFiniteLossError(UserError, RuntimeError):
    """Too many consecutive non-finite losses: the run stops rather than save a broken model."""
