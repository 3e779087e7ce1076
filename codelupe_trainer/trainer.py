"""Model loading, LoRA, the training loop (transformers Trainer) and saving the adapter.

The only module that imports torch, transformers and peft. It knows nothing about W&B: the cycle hands
it a `TrainingReporter`, and the callback here turns trainer events into plain Python numbers for it.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from .config import ModelSettings, TrainingSettings
from .dataset import IGNORE_INDEX, Block
from .faults import crash_point

ADAPTER_WEIGHTS = "adapter_model.safetensors"
LATEST_LINK = "latest"


class TrainingError(Exception):
    """Training could not produce a usable adapter."""


class TrainingInterrupted(Exception):
    """A stop was requested; the run ended at a step boundary and nothing was saved."""


class TrainingReporter(Protocol):
    """What the cycle wants to hear from the training loop. All values are plain Python numbers."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...


# ---------------------------------------------------------------- model


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_quantization(setting: str, device: str) -> str:
    if setting == "auto":
        return "4bit" if device == "cuda" else "none"
    return setting


def load_tokenizer(base_model: str):
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_settings: ModelSettings, device: str):
    quantization = resolve_quantization(model_settings.quantization, device)
    compute_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kwargs: dict[str, Any] = {"dtype": compute_dtype, "attn_implementation": model_settings.attn_implementation}
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    kwargs["device_map"] = {"": 0} if device == "cuda" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_settings.base_model, **kwargs)
    # A KV cache in training would hide the packed-sequence layout from the attention mask builder.
    model.config.use_cache = False
    if quantization in ("4bit", "8bit"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, quantization


def attach_adapter(base_model, model_settings: ModelSettings, previous_adapter: Path | None):
    """Continue from the previous adapter (trainable) or start a fresh LoRA."""
    if previous_adapter is not None:
        model = PeftModel.from_pretrained(base_model, str(previous_adapter), is_trainable=True)
    else:
        config = LoraConfig(
            r=model_settings.lora_r,
            lora_alpha=model_settings.lora_alpha,
            lora_dropout=model_settings.lora_dropout,
            target_modules=list(model_settings.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base_model, config)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise TrainingError(f"the adapter has no trainable parameters (loaded from {previous_adapter})")
    return model


def packing_is_isolated(model) -> bool:
    """Probe the loaded model: do restarting position ids keep packed samples apart on its attention backend?

    The logits of a short sequence packed after another must match those of it alone, far more closely than
    the same sequence read as a continuation (the leak we are guarding against). Run in train mode without
    gradients: the base model has no dropout, and eval mode would make bitsandbytes repack 4-bit weights.
    """
    device = next(model.parameters()).device
    first, second = [11, 12, 13, 14, 15, 16], [21, 22, 23, 24]
    packed = torch.tensor([first + second], device=device)
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))], device=device)
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([second], device=device)).logits[0].float()
            isolated = model(input_ids=packed, position_ids=positions).logits[0, len(first):].float()
            leaked = model(input_ids=packed).logits[0, len(first):].float()
    finally:
        model.train(was_training)
    isolation_error = (isolated - alone).abs().max().item()
    leak = (leaked - alone).abs().max().item()
    return isolation_error <= 0.1 * leak or isolation_error < 1e-4


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    return trainable, total


# ---------------------------------------------------------------- batches


class PackedCollator:
    """Pads packed blocks to the longest in the batch and counts what it collated.

    Padding gets its own restarting position ids and no labels, so it is a separate, loss-free segment.
    No attention mask is built: restarting position ids are what keep packed samples apart.
    The counts (samples and real tokens) are read by the step timer, avoiding any device sync.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.samples_collated = 0
        self.tokens_collated = 0

    def __call__(self, blocks: list[Block]) -> dict[str, torch.Tensor]:
        longest = max(len(block) for block in blocks)
        input_ids = np.full((len(blocks), longest), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(blocks), longest), IGNORE_INDEX, dtype=np.int64)
        # Padding continues as its own sequence (0, 1, 2, ...), so the mask keeps it apart too.
        position_ids = np.tile(np.arange(longest, dtype=np.int64), (len(blocks), 1))
        for row, block in enumerate(blocks):
            length = len(block)
            input_ids[row, :length] = block.input_ids
            labels[row, :length] = block.labels
            position_ids[row, :length] = block.position_ids
            position_ids[row, length:] -= length
            self.tokens_collated += length
            self.samples_collated += len(block.lengths)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
        }


# ---------------------------------------------------------------- timing


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


# ---------------------------------------------------------------- statistics


def sample_layer_names(names: list[str], count: int) -> list[str]:
    """Evenly spaced names, so the sample covers the first, middle and last layers."""
    if count <= 0 or not names:
        return []
    if count >= len(names):
        return list(names)
    stride = (len(names) - 1) / max(count - 1, 1)
    return [names[round(index * stride)] for index in range(count)]


def metric_name(parameter_name: str) -> str:
    """A short, stable key for a parameter: 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight'
    becomes 'layers.0.self_attn.q_proj.lora_A'."""
    name = parameter_name.replace("base_model.model.", "").replace(".default", "").removesuffix(".weight")
    return name.removeprefix("model.")


def gradient_statistics(named_parameters: list[tuple[str, torch.nn.Parameter]], sampled: set[str]) -> dict[str, float]:
    """Norms of the current gradients, computed on the device in one fused pass."""
    with_grad = [(name, parameter.grad) for name, parameter in named_parameters if parameter.grad is not None]
    if not with_grad:
        return {}
    norms = torch.stack(torch._foreach_norm([gradient.detach() for _, gradient in with_grad])).float()
    values = torch.stack([norms.norm(), norms.mean(), norms.max(), norms.min()]).tolist()
    metrics = dict(zip(("gradients/global_norm", "gradients/mean_norm", "gradients/max_norm", "gradients/min_norm"), values))
    sampled_positions = [index for index, (name, _) in enumerate(with_grad) if name in sampled]
    if sampled_positions:
        sampled_norms = norms[sampled_positions].tolist()
        for position, value in zip(sampled_positions, sampled_norms):
            metrics[f"gradients/{metric_name(with_grad[position][0])}"] = value
    return metrics


def weight_statistics(named_parameters: list[tuple[str, torch.nn.Parameter]], sampled: set[str]) -> dict[str, float]:
    """Mean and standard deviation of the trainable weights, globally and for the sampled layers.

    Built from per-tensor sums and sums of squares (no concatenated copy of every weight), all on the
    device, then moved to the host in one transfer.
    """
    if not named_parameters:
        return {}
    weights = [parameter.detach().float() for _, parameter in named_parameters]
    sums = torch.stack([weight.sum() for weight in weights])
    squares = torch.stack(torch._foreach_norm(weights)) ** 2
    counts = torch.tensor([weight.numel() for weight in weights], dtype=torch.float32, device=sums.device)
    total = counts.sum()
    global_mean = sums.sum() / total
    global_variance = (squares.sum() - total * global_mean**2) / (total - 1).clamp(min=1)
    positions = [index for index, (name, _) in enumerate(named_parameters) if name in sampled]
    layer_means = sums[positions] / counts[positions]
    layer_variances = (squares[positions] - counts[positions] * layer_means**2) / (counts[positions] - 1).clamp(min=1)
    values = torch.cat([torch.stack([global_mean, global_variance.clamp(min=0).sqrt()]), layer_means,
                        layer_variances.clamp(min=0).sqrt()]).tolist()
    metrics = {"weights/global_mean": values[0], "weights/global_std": values[1]}
    for offset, index in enumerate(positions):
        name = metric_name(named_parameters[index][0])
        metrics[f"weights/{name}/mean"] = values[2 + offset]
        metrics[f"weights/{name}/std"] = values[2 + len(positions) + offset]
    return metrics


def device_memory_metrics() -> dict[str, float]:
    """Allocator numbers only torch knows; utilisation, temperature and power come from NVML elsewhere."""
    if not torch.cuda.is_available():
        return {}
    metrics = {}
    for index in range(torch.cuda.device_count()):
        metrics[f"system/gpu_{index}_memory_allocated_gb"] = torch.cuda.memory_allocated(index) / 1e9
        metrics[f"system/gpu_{index}_memory_reserved_gb"] = torch.cuda.memory_reserved(index) / 1e9
    return metrics


def safe_perplexity(loss: float) -> float:
    """exp(loss), clamped so a diverging loss reads as a huge number instead of overflowing; NaN stays NaN."""
    if math.isnan(loss):
        return float("nan")
    return math.exp(min(loss, 50.0))


# ---------------------------------------------------------------- callback


@dataclass
class Frequencies:
    system_every_steps: int = 10
    gradient_metrics_every_steps: int = 10
    per_layer_sample: int = 8


class ReportingCallback(TrainerCallback):
    """Turns Trainer events into metric dicts for the reporter; also where a stop request is honoured."""

    def __init__(
        self,
        reporter: TrainingReporter,
        trainer: TimedTrainer,
        collator: PackedCollator,
        frequencies: Frequencies,
        should_stop: Callable[[], bool],
        system_metrics: Callable[[], dict[str, float]],
    ):
        self.reporter = reporter
        self.trainer = trainer
        self.collator = collator
        self.frequencies = frequencies
        self.should_stop = should_stop
        self.system_metrics = system_metrics
        self.stopped_early = False
        self._window_started = time.perf_counter()
        self._window_steps = 0
        self._window_samples = 0
        self._window_tokens = 0
        self._train_started = time.perf_counter()
        self._trainable: list[tuple[str, torch.nn.Parameter]] = []
        self._sampled: set[str] = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
        names = [name for name, _ in self._trainable]
        self._sampled = set(sample_layer_names(names, self.frequencies.per_layer_sample))
        self._train_started = self._window_started = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        every = self.frequencies.gradient_metrics_every_steps
        # global_step is incremented after the optimizer step: this is step global_step + 1.
        step = state.global_step + 1
        if every and step % every == 0:
            metrics = gradient_statistics(self._trainable, self._sampled)
            metrics.update(weight_statistics(self._trainable, self._sampled))
            self.reporter.log(step, metrics)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            crash_point("train")
        self._window_steps += 1
        step = state.global_step
        every = self.frequencies.system_every_steps
        if every and step % every == 0:
            metrics = dict(self.system_metrics())
            metrics.update(device_memory_metrics())
            self.reporter.log(step, metrics)
        if self.should_stop():
            self.stopped_early = True
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        step = state.global_step
        metrics: dict[str, float] = {}
        if "loss" in logs:
            loss = float(logs["loss"])
            metrics.update({
                "train/loss": loss,
                "train/perplexity": safe_perplexity(loss),
                "train/learning_rate": float(logs.get("learning_rate", 0.0)),
                "train/epoch": float(state.epoch or 0.0),
            })
            if logs.get("grad_norm") is not None:
                metrics["batch/grad_norm"] = float(logs["grad_norm"])
            if self.trainer.last_loss is not None:
                batch_loss = float(self.trainer.last_loss.detach().float().item())
                metrics["batch/loss"] = batch_loss
                metrics["batch/perplexity"] = safe_perplexity(batch_loss)
            metrics.update(self._performance_window())
            metrics.update(self._progress(state))
        for key, value in logs.items():
            if key.startswith("eval_") and isinstance(value, (int, float)):
                name = key.removeprefix("eval_")
                if name in ("loss",):
                    metrics["eval/loss"] = float(value)
                    metrics["eval/perplexity"] = safe_perplexity(float(value))
                elif name in ("runtime", "samples_per_second", "steps_per_second"):
                    metrics[f"eval/{name}"] = float(value)
        if metrics:
            self.reporter.log(step, metrics)

    def _performance_window(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._window_started, 1e-9)
        samples = self.collator.samples_collated - self._window_samples
        tokens = self.collator.tokens_collated - self._window_tokens
        steps = max(self._window_steps, 1)
        data_loading_ms, forward_ms, backward_ms = self.trainer.phase_clock.drain()
        self._window_started = now
        self._window_samples = self.collator.samples_collated
        self._window_tokens = self.collator.tokens_collated
        self._window_steps = 0
        return {
            "batch/size": samples / steps,
            "performance/samples_per_second": samples / elapsed,
            "performance/tokens_per_second": tokens / elapsed,
            "performance/batch_time_ms": 1000 * elapsed / steps,
            "performance/data_loading_time_ms": data_loading_ms,
            "performance/forward_time_ms": forward_ms,
            "performance/backward_time_ms": backward_ms,
        }

    def _progress(self, state) -> dict[str, float]:
        step, max_steps = state.global_step, max(state.max_steps, 1)
        epochs = max(float(state.num_train_epochs or 1), 1e-9)
        elapsed = time.perf_counter() - self._train_started
        eta_seconds = elapsed / max(step, 1) * max(max_steps - step, 0)
        return {
            "progress/step": step,
            "progress/step_percent": min(100.0, 100.0 * step / max_steps),
            "progress/epoch": float(state.epoch or 0.0),
            "progress/epoch_percent": min(100.0, 100.0 * float(state.epoch or 0.0) / epochs),
            "progress/eta_minutes": eta_seconds / 60,
            "progress/eta_hours": eta_seconds / 3600,
        }


# ---------------------------------------------------------------- training


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


# ---------------------------------------------------------------- saving


def adapter_is_finite(model) -> bool:
    return all(torch.isfinite(parameter).all() for parameter in model.parameters() if parameter.requires_grad)


def save_adapter(model, output_dir: Path, run_number: int) -> Path:
    """Write the adapter to a new folder, complete before it becomes visible, and point `latest` at it."""
    if not adapter_is_finite(model):
        raise TrainingError("adapter weights are NaN or infinite; nothing was saved")
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"run-{run_number:06d}"
    staging = output_dir / f".staging-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            # A folder from a run that crashed after saving but before the state was written: replace it.
            shutil.rmtree(final)
        os.replace(staging, final)
        point_latest(output_dir, final.name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def point_latest(output_dir: Path, target_name: str) -> None:
    temporary = output_dir / f".{LATEST_LINK}-{uuid.uuid4().hex[:8]}"
    os.symlink(target_name, temporary)
    os.replace(temporary, output_dir / LATEST_LINK)
    descriptor = os.open(output_dir, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
