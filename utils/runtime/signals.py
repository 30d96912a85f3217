"""Graceful stops: SIGTERM, SIGUSR1 and SIGUSR2 ask the training loop to finish its step, checkpoint and exit.

The handler only sets a flag; the loop reads it after each step, and all processes agree on it through the step's
all-reduce, so that every rank stops at the same iteration.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))


class StopRequest:
    """Installs handlers for :data:`STOP_SIGNALS` (main thread only) and remembers whether one arrived."""

    def __init__(self, install: bool = True):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
