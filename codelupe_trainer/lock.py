"""One trainer at a time: an flock beside the state file, released by the kernel if its holder dies.

Every writer of the state file (a cycle, the daemon recording a child's failure) holds it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class AlreadyRunning(Exception):
    """Another cycle holds the trainer lock."""


def lock_path(state_file: Path) -> Path:
    return state_file.with_suffix(".lock")


@contextmanager
def trainer_lock(state_file: Path) -> Iterator[None]:
    path = lock_path(state_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(f"another codelupe-trainer cycle is running (lock {path} is held)") from None
        try:  # the holder's pid, for a person looking: a courtesy a full disk must not turn into a failure
            os.ftruncate(handle.fileno(), 0)
            os.pwrite(handle.fileno(), f"{os.getpid()}\n".encode(), 0)  # unbuffered: nothing left to fail at close
        except OSError:
            pass
        yield
    finally:
        handle.close()
