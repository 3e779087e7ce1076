"""Exceptions that cross wings: raised in training or the cycle, caught by the service and the command line.

They live here, below everything, so that no wing imports another just to name an error.
"""

from __future__ import annotations


class TrainingError(Exception):
    """Training could not produce a usable adapter."""


class TrainingInterrupted(Exception):
    """A stop was requested; the cycle ended at a safe point and nothing was saved."""
