"""Out-of-memory back-off: one CUDA OOM must not turn into a failure on every cycle.

On `torch.OutOfMemoryError` in training or evaluation the attempt is undone (the adapter's trainable weights
restored from a host copy taken before it; the optimizer lived only in the attempt), the micro-batch halves
and gradient accumulation doubles, so the effective batch and the data stay the same, and the run starts
again. The size that worked is remembered in the state for later cycles. At micro-batch 1 it gives up with
a message naming the settings that reduce memory.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config import TrainingSettings
from ..errors import TrainingError

log = logging.getLogger(__name__)


SMALLEST_MESSAGE = ("out of GPU memory even at micro-batch 1: lower data.max_length or model.lora_r, keep "
                    "training.gradient_checkpointing on and training.loss on auto/chunked, or use a larger GPU")


class OutOfMemoryOnRanks(TrainingError):
    """Several ranks cannot retry within a run (they must all train at one size): the cycle fails, and the
    next one trains at `next_micro_batch` (remembered in the state), with the same effective batch."""

    def __init__(self, micro_batch: int, training: TrainingSettings):
        self.next_micro_batch = micro_batch // 2
        accumulation = sized(training, self.next_micro_batch).gradient_accumulation_steps
        super().__init__(f"CUDA out of memory at micro-batch {micro_batch} on several ranks: the next cycle trains "
                         f"with micro-batch {self.next_micro_batch} x accumulation {accumulation} (same effective "
                         "batch)")


def check_ranks_memory_failure(error: BaseException | str, training: TrainingSettings) -> None:
    """Raise the back-off for several ranks when `error` (rank 0's, or a rank's reported reason) is an OOM."""
    import torch  # here: the cycle imports this module before it knows whether there is anything to train

    oom = isinstance(error, torch.OutOfMemoryError) or str(error).startswith(f"{torch.OutOfMemoryError.__name__}:")
    if not oom:
        return
    if training.batch_size == 1:
        raise TrainingError(SMALLEST_MESSAGE) from None
    raise OutOfMemoryOnRanks(training.batch_size, training) from None


@dataclass
class BackoffOutcome:
    micro_batch: int
    accumulation: int
    backoffs: int


def sized(training: TrainingSettings, micro_batch: int) -> TrainingSettings:
    """The same effective batch (batch_size x accumulation) at another micro-batch size."""
    effective = training.batch_size * training.gradient_accumulation_steps
    return training.model_copy(update={"batch_size": micro_batch,
                                       "gradient_accumulation_steps": max(1, math.ceil(effective / micro_batch))})


# How long a micro-batch an out-of-memory back-off found is kept before the configured size is tried again. An
# out-of-memory can pass (another process on the GPU, an inference server that has since shrunk) and a daemon
# left alone would otherwise train at half its batch for good; a try that fails again costs one step's work.
RETRY_CONFIGURED_BATCH_AFTER_S = 24 * 3600


def memory_record(training: TrainingSettings, max_length: int, micro_batch: int,
                  backed_off_at: float) -> dict[str, int]:
    """The micro-batch that fits, with what it was measured for and when (the state's `micro_batch`)."""
    return {"micro": micro_batch, "max_length": max_length,
            "effective": training.batch_size * training.gradient_accumulation_steps,
            "backed_off_at": int(backed_off_at)}


def record_applies(remembered: dict[str, int] | None, training: TrainingSettings, max_length: int) -> bool:
    """Whether a remembered micro-batch was measured for today's effective batch and length."""
    effective = training.batch_size * training.gradient_accumulation_steps
    return bool(remembered) and remembered.get("effective") == effective and remembered.get("max_length") == max_length


def start_micro_batch(remembered: dict[str, int] | None, training: TrainingSettings, max_length: int,
                      now: float | None = None) -> int:
    """The micro-batch an earlier back-off found (the state's record), if it was found for today's effective batch
    and length and, with one training process, less than RETRY_CONFIGURED_BATCH_AFTER_S ago; else the configured
    batch size. Several processes keep it (there, each try that runs out of memory again costs a failed cycle)."""
    if not record_applies(remembered, training, max_length):
        return training.batch_size
    micro = min(remembered.get("micro") or training.batch_size, training.batch_size)
    age = (time.time() if now is None else now) - remembered.get("backed_off_at", 0)
    if micro < training.batch_size and training.world_size == 1 and age >= RETRY_CONFIGURED_BATCH_AFTER_S:
        log.info("trying training.batch_size = %d again: micro-batch %d has been used since an out-of-memory "
                 "%.0f h ago (it backs off again if it still does not fit)", training.batch_size, micro, age / 3600)
        return training.batch_size
    return micro


def memory_after_run(remembered: dict[str, int] | None, training: TrainingSettings, max_length: int,
                     sizing: BackoffOutcome) -> dict[str, int] | None:
    """The state's record after a finished run: a new back-off is dated now; the configured size fitting (again)
    clears it; a run at the remembered smaller size keeps the date of the back-off that found it."""
    if sizing.backoffs:
        return memory_record(training, max_length, sizing.micro_batch, time.time())
    if sizing.micro_batch >= training.batch_size or not remembered:
        return None
    return memory_record(training, max_length, sizing.micro_batch, remembered.get("backed_off_at") or time.time())


def train_with_oom_backoff(model, training: TrainingSettings, start_micro_batch: int | None,
                           attempt: Callable[[TrainingSettings], object]):
    import torch

    micro_batch = min(start_micro_batch or training.batch_size, training.batch_size)
    snapshot = {name: parameter.detach().to("cpu", copy=True)
                for name, parameter in model.named_parameters() if parameter.requires_grad}
    backoffs = 0
    while True:
        settings = sized(training, micro_batch)
        try:
            result = attempt(settings)
            return result, BackoffOutcome(micro_batch, settings.gradient_accumulation_steps, backoffs)
        except torch.OutOfMemoryError:
            if micro_batch == 1:
                raise TrainingError(SMALLEST_MESSAGE) from None
            _undo_attempt(model, snapshot)
            micro_batch //= 2
            backoffs += 1
            log.warning("CUDA out of memory: retrying with micro-batch %d x accumulation %d (same effective batch)",
                        micro_batch, sized(training, micro_batch).gradient_accumulation_steps)


def _undo_attempt(model, snapshot: dict) -> None:
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in snapshot:
                parameter.copy_(snapshot[name].to(parameter.device))
                parameter.grad = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
