"""A stop request (SIGTERM, SIGINT) honoured in every phase of a cycle, within seconds.

Between training steps the loop checks `requested()` and ends at the step boundary. Elsewhere (fetching, the
dataset build, loading a 7B model, a long evaluation) there is no loop of ours to check, so the signal
handler raises `TrainingInterrupted` in the main thread at the next Python instruction: every phase before the
state is saved may be abandoned, because nothing counts until the state file's atomic rename. The few lines
that publish a finished run (adapter, state, duplicate store) run under `deferred()`: a signal there only sets
the flag, and the run completes.

`TrainingInterrupted` is a BaseException, like KeyboardInterrupt: a library's `except Exception` cannot
swallow it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import TrainingInterrupted


class StopRequest:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._deferred = 0
        self._raised = False
        self.signal_name: str | None = None

    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str = "stop requested") -> None:
        self.signal_name = self.signal_name or reason
        self._event.set()

    def _handle(self, signum, frame) -> None:
        self.request(signal.Signals(signum).name)
        # Raise once, in the main thread, outside the publishing section; later signals only set the flag,
        # so the clean-up (closing the W&B run) is never interrupted in turn.
        if self._deferred == 0 and not self._raised and threading.current_thread() is threading.main_thread():
            self._raised = True
            raise TrainingInterrupted(f"stopped on {self.signal_name}")

    def install(self) -> None:
        """Route SIGTERM and SIGINT here (main thread only, as Python requires)."""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Run the block to its end even if a stop arrives in it."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1

    def check(self, where: str) -> None:
        """Raise TrainingInterrupted at a phase boundary if a stop arrived (for signals that came in while deferred,
        or in a thread)."""
        if self.requested():
            raise TrainingInterrupted(f"stopped {where} ({self.signal_name})")


# One per process: the cycle process's signal handlers and the cycle share it.
CURRENT = StopRequest()
