"""The training loop's statistics: a TrainerCallback that turns Trainer events into plain metric dicts
(train, batch, performance, progress, gradients, weights, system) for a reporter the cycle hands in.

It knows nothing about W&B; it is also where a stop request is honoured between steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import TrainerCallback

from ..faults import crash_point
from .flops import peak_flops, training_flops_per_token, utilisation
from .perplexity import safe_perplexity
from .ranks import all_ranks_sum, world_size


class TrainingReporter(Protocol):
    """What the cycle wants to hear from the training loop. All values are plain Python numbers."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...


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



@dataclass
class ReportingOptions:
    system_every_steps: int = 10
    gradient_metrics_every_steps: int = 10
    per_layer_sample: int = 8
    peak_tflops: float = 0.0  # one accelerator's dense bf16 peak; 0 = from the CUDA card's name, when known


def model_flops_per_token(model) -> float | None:
    """4N of the model's config (training/flops.py), or None for a model that is not Qwen2/Llama-shaped."""
    config = getattr(model, "config", None)
    try:
        return training_flops_per_token(config.to_dict())
    except (AttributeError, KeyError, TypeError):
        return None


def accelerator_peak_flops(model, peak_tflops: float) -> float | None:
    """The peak of all the ranks' accelerators together: the configured one, else the CUDA card's by name."""
    if peak_tflops > 0:
        peak = peak_tflops * 1e12
    else:
        device = next(model.parameters()).device
        if device.type != "cuda":
            return None
        peak = peak_flops(torch.cuda.get_device_name(device))
        if peak is None:
            return None
    return peak * world_size()


class ReportingCallback(TrainerCallback):
    """Turns Trainer events into metric dicts for the reporter; also where a stop request is honoured and a
    non-finite loss ends the run at once.

    `meter` is the trainer's StepMeter (duck-typed here so this module does not import the loop): it holds
    what the micro-batches of each window really trained, the step's loss, and the time spent evaluating.
    """

    def __init__(
        self,
        reporter: TrainingReporter,
        meter,
        options: ReportingOptions,
        should_stop: Callable[[], bool],
        system_metrics: Callable[[], dict[str, float]],
    ):
        self.reporter = reporter
        self.meter = meter
        self.options = options
        self.should_stop = should_stop
        self.system_metrics = system_metrics
        self.stopped_early = False
        self.non_finite_at_step: int | None = None
        self._window_started = time.perf_counter()
        self._window_steps = 0
        self._train_started = time.perf_counter()
        self._trainable: list[tuple[str, torch.nn.Parameter]] = []
        self._sampled: set[str] = set()
        self._gradients_recorded_for = -1
        self._evaluated = False
        self._last_step = 0
        self._flops_per_token: float | None = None
        self._peak_flops: float | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
        names = [name for name, _ in self._trainable]
        self._sampled = set(sample_layer_names(names, self.options.per_layer_sample))
        self._last_step = state.max_steps
        self._flops_per_token = model_flops_per_token(model)
        self._peak_flops = accelerator_peak_flops(model, self.options.peak_tflops)
        self.meter.drain()  # nothing before the first step (an initial evaluation) belongs to a window
        self._train_started = self._window_started = time.perf_counter()

    def _due(self, step: int, every: int) -> bool:
        """Whether step `step` reports what is reported every `every` steps: on those steps and on the run's
        last one. A production cycle (1,000 new rows at accumulation 4: ~6 steps) is often shorter than the
        shipped interval of 10, and without its last step it would report nothing of its end, or nothing at
        all. Every rank decides alike (max_steps is the same on each), so their collective reads stay paired."""
        return bool(every) and (step % every == 0 or step == self._last_step)

    def record_gradients(self, step: int) -> None:
        """Gradient norms as the backward pass left them: called by the trainer just before clipping."""
        if self._due(step, self.options.gradient_metrics_every_steps) and self._gradients_recorded_for != step:
            self._gradients_recorded_for = step
            self.reporter.log(step, gradient_statistics(self._trainable, self._sampled))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # global_step is incremented after the optimizer step: this is step global_step + 1.
        step = state.global_step + 1
        self.record_gradients(step)  # no-op when clipping already recorded them (max_grad_norm > 0)
        if self._due(step, self.options.gradient_metrics_every_steps):
            self.reporter.log(step, weight_statistics(self._trainable, self._sampled))

    def _heartbeat(self, phase: str, step: int) -> None:
        heartbeat = getattr(self.reporter, "heartbeat", None)
        if heartbeat is not None:
            heartbeat(phase, step)

    def on_prediction_step(self, args, state, control, **kwargs):
        if not self._evaluated:
            self._evaluated = True
            crash_point("eval")
        self._heartbeat("evaluating", state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            crash_point("train")
        self._heartbeat("training", state.global_step)
        self.meter.end_step()
        if state.global_step == self._last_step:
            # The Trainer logs every logging_steps only: the steps after the last multiple (all but the first
            # of a cycle shorter than that) would leave no loss, throughput or progress line. Set before the
            # loss is judged, so that every rank logs (its reads are collective) whatever its loss.
            control.should_log = True
        loss = self.meter.last_step_loss
        # One scalar read per optimizer step: a diverged run stops here instead of training on to the end.
        if loss is not None and not math.isfinite(float(loss)):
            self.non_finite_at_step = state.global_step
            control.should_training_stop = True
            return control
        self._window_steps += 1
        step = state.global_step
        if self._due(step, self.options.system_every_steps):
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
            if self.meter.last_step_loss is not None:
                batch_loss = float(self.meter.last_step_loss.detach().float().item())
                metrics["batch/loss"] = batch_loss
                metrics["batch/perplexity"] = safe_perplexity(batch_loss)
            metrics.update(self._performance_window())
            metrics.update(self._progress(state))
        if isinstance(logs.get("initial_loss"), (int, float)):
            # The loss before this run trained: each run's improvement is a chart, not only a state-file line.
            metrics["eval/initial_loss"] = float(logs["initial_loss"])
            metrics["eval/initial_perplexity"] = safe_perplexity(float(logs["initial_loss"]))
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
        """Throughput of the optimizer steps since the last report: only their micro-batches' samples and
        tokens, over their time less any evaluation that ran inside the window."""
        now = time.perf_counter()
        window = self.meter.drain()
        elapsed = max(now - self._window_started - window["eval_seconds"], 1e-9)
        # Several ranks: samples and tokens of all of them (every rank logs at the same steps).
        window["samples"], window["tokens"] = all_ranks_sum(window["samples"]), all_ranks_sum(window["tokens"])
        steps = max(self._window_steps, 1)
        self._window_started = now
        self._window_steps = 0
        tokens_per_second = window["tokens"] / elapsed
        metrics = {
            "batch/size": window["samples"] / steps,
            "performance/samples_per_second": window["samples"] / elapsed,
            "performance/tokens_per_second": tokens_per_second,
            "performance/tokens_per_step": window["tokens"] / steps,
            "performance/batch_time_ms": 1000 * elapsed / steps,
            "performance/data_loading_time_ms": window["data_loading_ms"],
            "performance/forward_time_ms": window["forward_ms"],
            "performance/backward_time_ms": window["backward_ms"],
        }
        if self._flops_per_token:
            metrics["performance/model_tflops"] = tokens_per_second * self._flops_per_token / 1e12
            if self._peak_flops:
                metrics["performance/mfu_percent"] = 100 * utilisation(tokens_per_second, self._flops_per_token,
                                                                       self._peak_flops)
        return metrics

    def _progress(self, state) -> dict[str, float]:
        step, max_steps = state.global_step, max(state.max_steps, 1)
        epochs = max(float(state.num_train_epochs or 1), 1e-9)
        elapsed = time.perf_counter() - self._train_started
        eta_seconds = elapsed / max(step, 1) * max(max_steps - step, 0)
        return {
            "progress/step": step,
            "progress/total_steps": max_steps,
            "progress/step_percent": min(100.0, 100.0 * step / max_steps),
            "progress/epoch": float(state.epoch or 0.0),
            "progress/epoch_percent": min(100.0, 100.0 * float(state.epoch or 0.0) / epochs),
            "progress/eta_minutes": eta_seconds / 60,
            "progress/eta_hours": eta_seconds / 3600,
        }
