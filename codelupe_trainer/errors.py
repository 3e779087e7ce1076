"""Exceptions that cross wings: raised in training or the cycle, caught by the service and the command line.

They live here, below everything, so that no wing imports another just to name an error.
"""

from __future__ import annotations


class TrainingError(Exception):
    """Training could not produce a usable adapter."""


class TrainingInterrupted(BaseException):
    """A stop was requested; the cycle ended where it was and nothing was saved. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way (ours or a library's) swallows it."""


class StateError(Exception):
    """The state file exists but cannot be used (not JSON, a field of the wrong type: a hand edit gone wrong).
    Nothing can run or be recorded until it is fixed: it holds the watermark and the adapter in service."""


class StoreError(Exception):
    """The duplicate store beside the state (`dedup.sqlite3`) cannot be used: not SQLite, or damaged. Its
    hashes, near-duplicate keys and holdout ids cannot be guessed again, so nothing runs until it is fixed."""
