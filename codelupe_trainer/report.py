"""What the cycle reports: the W&B run config (an allow-list of settings), the model config, the final
per-run metrics, and a reporter that forwards training metrics and keeps `status` informed."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .config import Settings
from .data.dataset import BuiltDataset
from .metrics import MetricsRun
from .progress import write_cycle_progress
from .state import TrainerState
from .training.perplexity import safe_perplexity

HEARTBEAT_S = 5.0
PROGRESS_LOG_S = 60.0
log = logging.getLogger(__name__)


def run_config(settings: Settings) -> dict[str, Any]:
    """The W&B run config, from an allow-list: no URL, no key, no path that could name a user's secret."""
    dumped = settings.model_dump(mode="json")
    allowed = {section: dumped[section] for section in ("schedule", "data", "model", "training", "metrics")}
    allowed["model"]["base_model"] = settings.model.public_name
    # The promotion settings, but not the on_promote command line (it may carry a host name or a token).
    allowed["promotion"] = {key: value for key, value in dumped["promotion"].items() if key != "on_promote"}
    allowed["promotion"]["on_promote_configured"] = bool(dumped["promotion"]["on_promote"])
    allowed["database"] = {key: dumped["database"][key] for key in ("table", "id_column", "content_column", "language_column", "quality_column")}
    allowed["wandb"] = {"project": dumped["wandb"]["project"], "group": dumped["wandb"]["group"]}
    return allowed


def model_config(settings: Settings, trainable: int, total: int, quantization: str, previous: Path | None) -> dict[str, Any]:
    return {
        "model/name": settings.model.public_name,
        "model/total_params": total,
        "model/trainable_params": trainable,
        "model/trainable_percent": 100.0 * trainable / total if total else 0.0,
        "model/lora_r": settings.model.lora_r,
        "model/lora_alpha": settings.model.lora_alpha,
        "model/lora_dropout": settings.model.lora_dropout,
        "model/target_modules": list(settings.model.target_modules),
        "model/quantization": quantization,
        "model/continued_from_previous_adapter": previous is not None,
        "hyperparams/batch_size": settings.training.batch_size,
        "hyperparams/gradient_accumulation_steps": settings.training.gradient_accumulation_steps,
        "hyperparams/learning_rate": settings.training.learning_rate,
        "hyperparams/max_length": settings.data.max_length,
        "hyperparams/epochs": settings.training.epochs,
        "hyperparams/max_steps": settings.training.max_steps,
        "hyperparams/warmup_ratio": settings.training.warmup_ratio,
    }


def continuous_metrics(state: TrainerState, run_number: int) -> dict[str, float]:
    """The daemon's lifetime figures; logged at a run's start (from the state before it) and end (after)."""
    return {
        "continuous/run_number": run_number,
        "continuous/total_runs": state.total_training_runs,
        "continuous/last_trained_id": state.last_trained_id,
        "continuous/total_samples_trained": state.total_samples_trained,
        "continuous/total_samples_held_out": state.total_samples_held_out,
        "continuous/uptime_hours": state.uptime_hours,
        "continuous/pending_gaps": len(state.pending_gaps),
        "continuous/rejected_runs": state.rejected_runs,
        "continuous/adapter_in_use": state.adapter_in_use or 0,
        "continuous/total_replay_samples": state.total_replay_samples,
        "continuous/total_steps": state.total_steps,
        "continuous/total_tokens_trained": state.total_tokens_trained,
    }


def final_metrics(state: TrainerState, run_number: int, result, dataset: BuiltDataset, dataset_seconds: float) -> dict[str, float]:
    seconds = max(result.train_seconds, 1e-9)
    metrics = continuous_metrics(state, run_number) | {
        "performance/run_samples_per_second": dataset.train_samples / seconds,
        "performance/run_train_seconds": result.train_seconds,
        # What the optimizer steps consumed, not the dataset's tokens (which include the eval split).
        "performance/run_tokens_per_second": result.tokens_seen / seconds,
    }
    if result.eval_loss is not None:
        metrics["eval/final_loss"] = result.eval_loss
        metrics["eval/final_perplexity"] = safe_perplexity(result.eval_loss)
    return metrics


class ProgressLine:
    """Training progress for a person watching: a tqdm bar on a terminal; elsewhere (the journal, a pipe)
    one log line every PROGRESS_LOG_S seconds, so a long run is never silent and never floods the log."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.bar = None
        self._last_line: float | None = None  # the first report is logged at once: training has started

    def update(self, values: dict[str, float]) -> None:
        step, total = int(values["progress/step"]), int(values.get("progress/total_steps", 0))
        loss, tokens = values.get("train/loss"), values.get("performance/tokens_per_second")
        if self.interactive:
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total or None, unit="step", desc="training", dynamic_ncols=True, leave=True)
            self.bar.n = step
            self.bar.set_postfix_str(", ".join(part for part in (
                f"loss {loss:.4f}" if loss is not None else "", f"{tokens:,.0f} tokens/s" if tokens else "") if part),
                refresh=False)
            self.bar.refresh()
        elif (self._last_line is None or time.monotonic() - self._last_line >= PROGRESS_LOG_S
              or (total and step >= total)):
            self._last_line = time.monotonic()
            log.info("training: step %d/%d (%.0f %%), loss %s, %s tokens/s, ETA %.1f min", step, total,
                     values.get("progress/step_percent", 0.0), "-" if loss is None else f"{loss:.4f}",
                     f"{tokens:,.0f}" if tokens else "-", values.get("progress/eta_minutes", 0.0))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ProgressReporter:
    """Forwards training metrics to the metrics run, keeps `status` informed of the progress, and shows it
    to a person (`ProgressLine`)."""

    def __init__(self, metrics: MetricsRun, state_file: Path, run_number: int, interactive: bool = False):
        self.metrics = metrics
        self.state_file = state_file
        self.run_number = run_number
        self._last_heartbeat = 0.0
        self.line = ProgressLine(interactive)

    def heartbeat(self, phase: str, step: int) -> None:
        """Proof of life for the daemon's stall watch during long stretches without a logging step
        (a long evaluation, slow steps); at most one file write every few seconds."""
        now = time.monotonic()
        if now - self._last_heartbeat >= HEARTBEAT_S:
            self._last_heartbeat = now
            write_cycle_progress(self.state_file, phase, run=self.run_number, step=step)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.metrics.log(step, values)
        if "progress/step_percent" in values:
            self.line.update(values)
            write_cycle_progress(self.state_file, "training", run=self.run_number, step=step,
                                 percent=round(values["progress/step_percent"], 1),
                                 eta_minutes=round(values["progress/eta_minutes"], 1))


def adapter_card(settings: Settings, run_number: int, summary: dict[str, Any], first_id: int, last_id: int,
                 wandb_run_id: str | None) -> str:
    """The adapter folder's README.md: what it is and how it was made. Numbers and settings only: never
    sample text, paths of user data, the database URL or any other secret."""

    def number(value, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    training = settings.training
    verdict = ("promoted" if summary.get("promoted") else "rejected by the promotion gate") \
        if settings.promotion.mode == "gate" else "promoted (promotion.mode = always)"
    return f"""---
base_model: {settings.model.base_model}
library_name: peft
tags: [lora, codelupe-trainer, code]
---

# codelupe-trainer adapter, run {run_number}

A LoRA adapter for `{settings.model.base_model}`, fine-tuned by codelupe-trainer on rows {first_id}-{last_id}
of the table `{settings.database.table}`, continuing from {summary.get("continued_from_run") or "a new LoRA"}.

| | |
| --- | --- |
| status | {verdict}: {summary.get("promotion_reason") or "-"} |
| samples trained | {summary.get("samples_trained")} new (+ {summary.get("replay_samples", 0)} replayed), {summary.get("eval_samples")} held out for evaluation |
| tokens trained | {summary.get("tokens_trained")} |
| optimizer steps | {summary.get("steps")} |
| eval loss | {number(summary.get("eval_loss_before"))} before, {number(summary.get("eval_loss"))} after |
| holdout loss | {number(summary.get("holdout_loss_in_use"))} with the adapter in use, {number(summary.get("holdout_loss"))} with this one |
| LoRA | r {settings.model.lora_r}, alpha {settings.model.lora_alpha}, dropout {settings.model.lora_dropout}, modules {", ".join(settings.model.target_modules)} |
| training | learning rate {training.learning_rate}, micro-batch {summary.get("micro_batch")}, accumulation {training.gradient_accumulation_steps}, max length {settings.data.max_length}, epochs {training.epochs}, quantization {summary.get("quantization")} |
| W&B | project `{settings.wandb.project}`, group `{settings.wandb.group}`, run id `{wandb_run_id or "-"}` |

Load it with peft:

```python
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained("<this folder>")
```
"""
