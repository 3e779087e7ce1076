"""The learning-rate schedule of one cycle: a linear warm-up, then a linear decay.

transformers' "linear" schedule starts its warm-up at 0: the first optimizer step of every cycle ran at a
learning rate of 0, and since `warmup_ratio` rounds up to at least one step, a cycle of one optimizer step
trained nothing while its rows were recorded as trained. Here the warm-up starts at lr / (warmup + 1), as
nanoGPT's does, so every step trains; the decay still ends one step short of 0 (the last step trains too).
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim.lr_scheduler import LambdaLR


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up steps for a run of `total_steps` optimizer steps (rounded up, as transformers rounds a ratio)."""
    return math.ceil(total_steps * warmup_ratio) if warmup_ratio > 0 else 0


def learning_rate_factor(step: int, warmup: int, total: int) -> float:
    """The share of the peak learning rate that optimizer step `step` (0-based) of `total` trains with.

    Warm-up: (step + 1) / (warmup + 1), so the first step is never at 0; from step `warmup` on, a linear decay
    from the peak, (total - step) / (total - warmup), whose last step is still above 0.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def build_scheduler(optimizer, total_steps: int, warmup_ratio: float) -> LambdaLR:
    return LambdaLR(optimizer, partial(learning_rate_factor, warmup=warmup_steps(total_steps, warmup_ratio),
                                       total=total_steps))
