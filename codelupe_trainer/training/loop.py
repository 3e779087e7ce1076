"""The training loop: the stock transformers Trainer with per-phase timing, run once per cycle with a fresh
optimizer and schedule, evaluated before and after."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments

from ..config import TrainingSettings
from ..data.collate import COUNT_KEYS, SAMPLES_KEY, TOKENS_KEY, PackedCollator
from ..data.packing import Block
from ..errors import TrainingError, TrainingInterrupted
from ..faults import divergence_fault, memory_fault
from .loss import IGNORE_INDEX, chunked_causal_lm_loss, causal_lm_parts, chunked_model_loss, resolve_loss
from .model import count_parameters
from .ranks import all_ranks_sum, same_on_every_rank, weights_fingerprint
from .schedule import build_scheduler
from .telemetry import ReportingOptions, ReportingCallback, TrainingReporter

log = logging.getLogger(__name__)


class StepMeter:
    """What the training loop did since the last report, measured without a device-wide synchronize.

    Per micro-batch: data loading, forward and backward time (on CUDA bracketed by CUDA events read only at
    report time, on CPU wall clock), and the real samples and tokens of the batch. Per optimizer step: the
    step's loss, the sum of its micro-batches' losses as the Trainer returns them (each is already divided
    by the accumulation, so the sum is the step's mean loss on the scale of `train/loss`). Also the time
    spent evaluating, which is not training throughput.
    """

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.data_loading_s = 0.0
        self.cpu_forward_s = 0.0
        self.cpu_backward_s = 0.0
        self.event_triples: list[tuple[Any, Any, Any]] = []
        self.micro_batches = 0
        self.samples = 0
        self.tokens = 0
        self.eval_seconds = 0.0
        self.run_tokens = 0
        self._step_loss: torch.Tensor | None = None
        self.last_step_loss: torch.Tensor | None = None

    def marker(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add_micro_batch(self, start, after_forward, end, samples: int, tokens: int, loss: torch.Tensor) -> None:
        self.micro_batches += 1
        self.samples += samples
        self.tokens += tokens
        self.run_tokens += tokens
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss
        if self.cuda:
            self.event_triples.append((start, after_forward, end))
        else:
            self.cpu_forward_s += after_forward - start
            self.cpu_backward_s += end - after_forward

    def end_step(self) -> None:
        """Called after each optimizer step: the accumulated micro-batch losses become the step's loss."""
        if self._step_loss is not None:
            self.last_step_loss, self._step_loss = self._step_loss, None

    def drain(self) -> dict[str, float]:
        """Per micro-batch times (ms) and the window's samples, tokens and eval time; then start a new window."""
        count = max(self.micro_batches, 1)
        if self.cuda:
            forward = backward = 0.0
            for start, after_forward, end in self.event_triples:
                end.synchronize()
                forward += start.elapsed_time(after_forward)
                backward += after_forward.elapsed_time(end)
        else:
            forward, backward = self.cpu_forward_s * 1000, self.cpu_backward_s * 1000
        window = {
            "data_loading_ms": self.data_loading_s * 1000 / count,
            "forward_ms": forward / count,
            "backward_ms": backward / count,
            "samples": self.samples,
            "tokens": self.tokens,
            "eval_seconds": self.eval_seconds,
        }
        self.data_loading_s = self.cpu_forward_s = self.cpu_backward_s = self.eval_seconds = 0.0
        self.event_triples.clear()
        self.micro_batches = self.samples = self.tokens = 0
        return window


class TimedTrainer(Trainer):
    """The stock Trainer, with each micro-batch timed and counted (`StepMeter`), and optionally
    length-grouped batches (when samples are not packed)."""

    meter: StepMeter
    group_lengths: list[int] | None = None
    # Called with the step number just before gradients are clipped, so their norms are the raw ones.
    before_clipping: Callable[[int], None] | None = None
    # training.warmup_ratio: our schedule's (training/schedule.py), whose first step is not at learning rate 0.
    warmup_ratio: float = 0.0

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = build_scheduler(optimizer or self.optimizer, num_training_steps, self.warmup_ratio)
            self._created_lr_scheduler = True  # as the stock method: a second train() builds it afresh
        return self.lr_scheduler

    def _clip_grad_norm(self, model):
        if self.before_clipping is not None:
            self.before_clipping(self.state.global_step + 1)
        return super()._clip_grad_norm(model)

    def _get_train_sampler(self, train_dataset=None):
        # Length grouping is for one process; several ranks take the Trainer's own distributed sampler.
        if self.group_lengths is None or self.args.world_size > 1:
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler

        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=self.group_lengths)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        started = time.perf_counter()
        result = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.meter.data_loading_s += time.perf_counter() - started
        return result

    # "chunked": the decoder's hidden states through a chunked loss (training/loss.py); else the model's own.
    loss_mode: str = "standard"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        memory_fault(inputs["input_ids"].shape[0])
        # "fused" evaluates chunked too: Liger's patched forward fuses the loss only while the model trains
        # (its skip_logits defaults to self.training) and otherwise builds the full logits and the model's
        # own fp32 loss, the evaluation peak the chunked loss exists to avoid.
        chunked = self.loss_mode == "chunked" or (self.loss_mode == "fused" and not model.training)
        if chunked and not return_outputs:
            # The Trainer's mixed precision (bf16 on CUDA) is an autocast accelerate wraps around the model's
            # forward; the chunked loss runs the LM head after that forward, so it enters the same autocast
            # itself, or the head's matmuls would run in the fp32 peft's k-bit preparation leaves it in.
            with self.accelerator.autocast():
                result = chunked_model_loss(model, inputs, num_items_in_batch)
            # As the stock compute_loss does: with several ranks num_items_in_batch counts every rank's tokens
            # and DDP averages the ranks' gradients, so each rank's sum over that global count is scaled back
            # up by the number of ranks. Without it the loss, its logged value and every gradient were
            # 1/num_processes of the truth (and gradient clipping acted at num_processes x max_grad_norm).
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                result = result * self.accelerator.num_processes
        else:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        if model.training:
            self._after_forward = self.meter.marker()
        return result

    def training_step(self, model, inputs, num_items_in_batch=None):
        samples, tokens = inputs.pop(SAMPLES_KEY, 0), inputs.pop(TOKENS_KEY, 0)
        start = self.meter.marker()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.meter.add_micro_batch(start, self._after_forward, self.meter.marker(), samples, tokens, loss)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {key: value for key, value in inputs.items() if key not in COUNT_KEYS}
        if self.loss_mode in ("chunked", "fused") and prediction_loss_only:
            # Evaluation needs only the loss: the stock step would take the model's own, with the full logits
            # (bf16, then fp32 in the loss, then fp32 again in accelerate's output conversion: ~12 GB at
            # 4 x 2,048 x 152,064), a peak above training's. The batch's mean, as the stock step returns it.
            with torch.no_grad():
                loss = self.compute_loss(model, self._prepare_inputs(inputs))
            return loss.detach(), None, None
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def evaluate(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.meter.eval_seconds += time.perf_counter() - started


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
    # Real (non-padding) tokens the optimizer steps consumed; a token seen in two epochs counts twice.
    tokens_seen: int = 0
    # The fixed holdout's loss per language, {language: (mean token loss, tokens)}, with the weights this run
    # started from (the adapter in use, or the base model for a first adapter) and with the trained ones.
    holdout_before: dict[str, tuple[float, int]] | None = None
    holdout_after: dict[str, tuple[float, int]] | None = None


def forget_evaluation_preparation(trainer: Trainer) -> None:
    """Let `train()` prepare the model as for training after an evaluation prepared it first.

    accelerate marks a model it prepared, even for evaluation only, as prepared for good, and then skips
    preparing it for training, which is where several ranks get DDP: with the evaluation before training,
    the ranks never averaged their gradients and each trained its own adapter on its own share of the rows.
    """
    model = trainer.model
    if getattr(model, "_is_accelerate_prepared", False):
        model._is_accelerate_prepared = False
        trainer.accelerator._models.clear()  # else the next evaluation would find it "prepared" in the list


@torch.no_grad()
def evaluate_holdout(model, holdout: dict[str, list[Block]], pad_token_id: int, batch_size: int,
                     device: str) -> dict[str, tuple[float, int]]:
    """Mean token loss per language over the holdout's blocks, in a fixed order (the same batches every time
    it is called), through the chunked loss so no vocabulary-sized logits are made."""
    collator = PackedCollator(pad_token_id)
    was_training = model.training
    model.eval()
    parameter_device = next(model.parameters()).device
    losses: dict[str, tuple[float, int]] = {}
    try:
        for language, blocks in holdout.items():
            total, tokens = 0.0, 0
            for start in range(0, len(blocks), batch_size):
                batch = {key: value.to(parameter_device) for key, value in collator(blocks[start : start + batch_size]).items()}
                counted = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                    decoder, lm_head = causal_lm_parts(model)
                    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                     use_cache=False).last_hidden_state
                    total += float(chunked_causal_lm_loss(hidden, lm_head.weight, batch["labels"], num_items_in_batch=1))
                tokens += counted
            if tokens:
                losses[language] = (total / tokens, tokens)
    finally:
        model.train(was_training)
    return losses


def steps_per_epoch(train_blocks: int, batch_size: int, accumulation: int, processes: int = 1) -> int:
    """Optimizer steps in one pass over the blocks, counted as the Trainer counts them (no batch is dropped;
    with several processes each rank gets ceil(blocks / processes) of them, the sampler repeating a few)."""
    batches = math.ceil(math.ceil(train_blocks / processes) / batch_size)
    return math.ceil(batches / accumulation)


def trainer_max_steps(training: TrainingSettings, train_blocks: int) -> int:
    """The Trainer's max_steps: -1 (by epochs) unless `training.max_steps` ends the run sooner.

    A max_steps larger than the epochs need would make the Trainer loop over the data again. One smaller
    than a single epoch would leave rows unseen that the state records as trained: the cycle takes no more
    rows than the budget trains (see `TrainingSettings.block_budget`), and should the filters' removals ever make the packing
    come out larger, the run trains its whole epoch, a few steps over max_steps, rather than lose rows.
    """
    per_epoch = steps_per_epoch(train_blocks, training.batch_size, training.gradient_accumulation_steps,
                                training.world_size)
    if training.max_steps <= 0 or training.max_steps >= math.ceil(training.epochs * per_epoch):
        return -1
    if training.max_steps < per_epoch:
        log.warning("training.max_steps=%d is less than one epoch of %d blocks (%d steps): training the whole epoch",
                    training.max_steps, train_blocks, per_epoch)
        return per_epoch
    return training.max_steps


def checkpointing_arguments(enabled: bool) -> dict:
    """Gradient checkpointing under the name the installed transformers reads: newer 5.x releases call it
    activation checkpointing and warn on the old name, which 6.0 removes; older ones know only the old name."""
    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False}}


def build_training_arguments(training: TrainingSettings, scratch_dir: Path, device: str, seed: int, has_eval: bool,
                             max_steps: int | None = None, loss_mode: str | None = None):
    """`loss_mode`: the resolved training.loss (train_adapter resolves it once, with the model's type)."""
    distributed = {}
    if training.world_size > 1:
        # Every LoRA weight gets a gradient each step: no search for unused parameters.
        distributed = {"ddp_backend": "nccl" if device == "cuda" else "gloo", "ddp_find_unused_parameters": False}
    return TrainingArguments(
        **distributed,
        use_liger_kernel=(loss_mode or resolve_loss(training.loss, device)) == "fused",
        output_dir=str(scratch_dir),
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        num_train_epochs=training.epochs,
        max_steps=training.max_steps if max_steps is None else max_steps,
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
        **checkpointing_arguments(training.gradient_checkpointing),
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
    options: ReportingOptions,
    should_stop: Callable[[], bool],
    system_metrics: Callable[[], dict[str, float]],
    seed: int,
    device: str,
    quantized: bool = False,
    packed: bool = True,
    holdout: dict[str, list[Block]] | None = None,
) -> TrainingResult:
    """Train the adapter in place (fresh optimizer and schedule each cycle) and evaluate it."""
    collator = PackedCollator(tokenizer.pad_token_id, with_counts=True)
    loss_mode = resolve_loss(training.loss, device, getattr(model.config, "model_type", None))
    arguments = build_training_arguments(training, scratch_dir, device, seed, has_eval=bool(eval_blocks),
                                         max_steps=trainer_max_steps(training, len(train_blocks)), loss_mode=loss_mode)
    trainer = TimedTrainer(
        model=model,
        args=arguments,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks or None,
        data_collator=collator,
    )
    trainer.meter = StepMeter(device)
    trainer.loss_mode = loss_mode
    trainer.warmup_ratio = training.warmup_ratio
    if not packed:
        trainer.group_lengths = [len(block) for block in train_blocks]
    trainer.remove_callback(PrinterCallback)  # our reporter is the only voice
    callback = ReportingCallback(reporter, trainer.meter, options, should_stop, system_metrics)
    trainer.add_callback(callback)
    trainer.before_clipping = callback.record_gradients
    initial_eval_loss = None
    # bitsandbytes on CPU repacks 4-bit weights for inference the first time a layer runs in eval mode, and
    # the repacked path cannot train afterwards; there the loss before training is not measured.
    measurable = not (quantized and device == "cpu")
    if eval_blocks and measurable:
        log.info("evaluating %d blocks before training", len(eval_blocks))
        initial_eval_loss = float(trainer.evaluate(metric_key_prefix="initial")["initial_loss"])
        forget_evaluation_preparation(trainer)
    if holdout and measurable:
        log.info("evaluating the holdout (%d blocks) with the adapter in use", sum(map(len, holdout.values())))
    holdout_before = evaluate_holdout(model, holdout, tokenizer.pad_token_id, training.batch_size, device) \
        if holdout and measurable else None
    started = time.perf_counter()
    output = trainer.train()
    train_seconds = time.perf_counter() - started
    if callback.non_finite_at_step is not None:
        raise TrainingError(f"the training loss became NaN or infinite at step {callback.non_finite_at_step}; "
                            "nothing was saved (lower training.learning_rate, or look for a bad sample)")
    if callback.stopped_early:
        raise TrainingInterrupted(f"stopped at step {trainer.state.global_step} on request")
    divergence_fault(model)
    # Several ranks must end with one adapter: rank 0 saves its copy and records every rank's rows as trained.
    if training.world_size > 1 and not same_on_every_rank(weights_fingerprint(model)):
        raise TrainingError("the training ranks ended with different adapters (their gradients were not averaged);"
                            " nothing was saved")
    eval_loss = None
    if eval_blocks:
        log.info("evaluating %d blocks after training", len(eval_blocks))
        eval_loss = float(trainer.evaluate()["eval_loss"])
    if holdout and measurable:
        log.info("evaluating the holdout with the new adapter")
    holdout_after = evaluate_holdout(model, holdout, tokenizer.pad_token_id, training.batch_size, device) \
        if holdout and measurable else None
    trainable, total = count_parameters(model)
    tokens_seen = all_ranks_sum(trainer.meter.run_tokens)
    return TrainingResult(
        global_step=trainer.state.global_step,
        train_loss=float(output.training_loss),
        eval_loss=eval_loss,
        initial_eval_loss=initial_eval_loss,
        train_seconds=train_seconds,
        trainable_params=trainable,
        total_params=total,
        device=device,
        tokens_seen=tokens_seen,
        holdout_before=holdout_before,
        holdout_after=holdout_after,
    )
