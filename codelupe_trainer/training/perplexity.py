"""Perplexity from a loss, for the training callback and the run's final metrics alike (no torch needed)."""

from __future__ import annotations

import math


def safe_perplexity(loss: float) -> float:
    """exp(loss), clamped so a diverging loss reads as a huge number instead of overflowing; NaN stays NaN."""
    if math.isnan(loss):
        return float("nan")
    return math.exp(min(loss, 50.0))
