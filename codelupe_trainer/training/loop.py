"""The training loop: the stock transformers Trainer with per-phase timing, run once per cycle with a fresh
optimizer and schedule, evaluated before and after."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments

from ..config import TrainingSettings
from ..data.collate import PackedCollator
from ..data.packing import Block
from ..errors import TrainingInterrupted
from .model import count_parameters
from .telemetry import Frequencies, ReportingCallback, TrainingReporter


class PhaseClock:
    """Measures data loading, forward and backward per step without a device-wide synchronize.

    On CUDA, forward/backward are bracketed by CUDA events and only read at report time (`elapsed_time`
    waits on those events alone); on CPU, wall-clock time is the truth.
    """

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.data_loading_s = 0.0
        self.cpu_forward_s = 0.0
        self.cpu_backward_s = 0.0
        self.event_triples: list[tuple[Any, Any, Any]] = []
        self.micro_batches = 0

    def marker(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add_micro_batch(self, start, after_forward, end) -> None:
        self.micro_batches += 1
        if self.cuda:
            self.event_triples.append((start, after_forward, end))
        else:
            self.cpu_forward_s += after_forward - start
            self.cpu_backward_s += end - after_forward

    def drain(self) -> tuple[float, float, float]:
        """(data loading, forward, backward) in ms per micro-batch since the last drain."""
        count = max(self.micro_batches, 1)
        if self.cuda:
            forward = backward = 0.0
            for start, after_forward, end in self.event_triples:
                end.synchronize()
                forward += start.elapsed_time(after_forward)
                backward += after_forward.elapsed_time(end)
        else:
            forward, backward = self.cpu_forward_s * 1000, self.cpu_backward_s * 1000
        data_loading = self.data_loading_s * 1000
        self.data_loading_s = self.cpu_forward_s = self.cpu_backward_s = 0.0
        self.event_triples.clear()
        self.micro_batches = 0
        return data_loading / count, forward / count, backward / count


class TimedTrainer(Trainer):
    """The stock Trainer, with data loading, forward and backward timed per micro-batch, and optionally
    length-grouped batches (when samples are not packed)."""

    phase_clock: PhaseClock
    last_loss: torch.Tensor | None = None
    group_lengths: list[int] | None = None

    def _get_train_sampler(self, train_dataset=None):
        if self.group_lengths is None:
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler

        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=self.group_lengths)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        started = time.perf_counter()
        result = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.phase_clock.data_loading_s += time.perf_counter() - started
        return result

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if model.training:
            self._after_forward = self.phase_clock.marker()
        return result

    def training_step(self, model, inputs, num_items_in_batch=None):
        start = self.phase_clock.marker()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.phase_clock.add_micro_batch(start, self._after_forward, self.phase_clock.marker())
        self.last_loss = loss
        return loss


@dataclass
class TrainingResult:
    global_step: int
    train_loss: float
    eval_loss: float | None
    initial_eval_loss: float | None
    train_seconds: float
    trainable_params: int
    total_params: int
    device: str


def build_training_arguments(training: TrainingSettings, scratch_dir: Path, device: str, seed: int, has_eval: bool):
    return TrainingArguments(
        output_dir=str(scratch_dir),
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        num_train_epochs=training.epochs,
        max_steps=training.max_steps,
        warmup_steps=training.warmup_ratio if training.warmup_ratio < 1 else 0,
        max_grad_norm=training.max_grad_norm,
        logging_steps=training.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if (has_eval and training.eval_steps) else "no",
        eval_steps=training.eval_steps or None,
        save_strategy="no",
        # Our own callback reports; the W&B integration (which can upload checkpoints) must never run.
        report_to="none",
        # A diverging run must show up in the metrics, not be averaged away.
        logging_nan_inf_filter=False,
        remove_unused_columns=False,
        gradient_checkpointing=training.gradient_checkpointing and device == "cuda",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",
        disable_tqdm=True,
        seed=seed,
        optim="paged_adamw_8bit" if device == "cuda" else "adamw_torch",
    )


def train_adapter(
    model,
    tokenizer,
    train_blocks: list[Block],
    eval_blocks: list[Block],
    training: TrainingSettings,
    scratch_dir: Path,
    reporter: TrainingReporter,
    frequencies: Frequencies,
    should_stop: Callable[[], bool],
    system_metrics: Callable[[], dict[str, float]],
    seed: int,
    device: str,
    quantized: bool = False,
    packed: bool = True,
) -> TrainingResult:
    """Train the adapter in place (fresh optimizer and schedule each cycle) and evaluate it."""
    collator = PackedCollator(tokenizer.pad_token_id)
    arguments = build_training_arguments(training, scratch_dir, device, seed, has_eval=bool(eval_blocks))
    trainer = TimedTrainer(
        model=model,
        args=arguments,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks or None,
        data_collator=collator,
    )
    trainer.phase_clock = PhaseClock(device)
    if not packed:
        trainer.group_lengths = [len(block) for block in train_blocks]
    trainer.remove_callback(PrinterCallback)  # our reporter is the only voice
    callback = ReportingCallback(reporter, trainer, collator, frequencies, should_stop, system_metrics)
    trainer.add_callback(callback)
    initial_eval_loss = None
    # bitsandbytes on CPU repacks 4-bit weights for inference the first time a layer runs in eval mode, and
    # the repacked path cannot train afterwards; there the loss before training is not measured.
    if eval_blocks and not (quantized and device == "cpu"):
        initial_eval_loss = float(trainer.evaluate(metric_key_prefix="initial")["initial_loss"])
    started = time.perf_counter()
    output = trainer.train()
    train_seconds = time.perf_counter() - started
    if callback.stopped_early:
        raise TrainingInterrupted(f"stopped at step {trainer.state.global_step} on request")
    eval_loss = None
    if eval_blocks:
        eval_loss = float(trainer.evaluate()["eval_loss"])
    trainable, total = count_parameters(model)
    return TrainingResult(
        global_step=trainer.state.global_step,
        train_loss=float(output.training_loss),
        eval_loss=eval_loss,
        initial_eval_loss=initial_eval_loss,
        train_seconds=train_seconds,
        trainable_params=trainable,
        total_params=total,
        device=device,
    )
