"""Graceful stop: SIGINT/SIGTERM set a flag that the training loop polls.

    with GracefulStop() as stop:
        while not stop.stop_requested():
            ...
        checkpointer.save(...)

The first SIGINT or SIGTERM only sets the flag; a second SIGINT raises
``KeyboardInterrupt`` (for a loop that does not poll or hangs). Previous
handlers are restored on exit. Outside the main thread signals cannot be
caught; there the context manager only offers ``request_stop()``.
"""
from __future__ import annotations

import signal
import sys
import threading

__all__ = ["GracefulStop", "stop_requested"]

_active: list["GracefulStop"] = []


class GracefulStop:
    """Context manager turning SIGINT/SIGTERM into ``stop_requested() == True``."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM), verbose: bool = True):
        self.signals = tuple(signals)
        self.verbose = verbose
        self.signal_name: str | None = None  # name of the first signal received
        self._flag = threading.Event()
        self._previous: dict[int, object] = {}

    def stop_requested(self) -> bool:
        return self._flag.is_set()

    def request_stop(self, reason: str = "requested") -> None:
        if self.signal_name is None:
            self.signal_name = reason
        self._flag.set()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._flag.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name}")
        self.request_stop(name)
        if self.verbose:
            print(f"\n{name} received: stopping after the current step "
                  f"(send SIGINT again to abort now)", file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()
        if self in _active:
            _active.remove(self)


def stop_requested() -> bool:
    """True when any active ``GracefulStop`` has received a stop signal."""
    return any(g.stop_requested() for g in _active)
