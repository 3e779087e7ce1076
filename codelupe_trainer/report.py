"""What the cycle reports: the W&B run config (an allow-list of settings), the model config, the final
per-run metrics, and a reporter that forwards training metrics and keeps `status` informed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .config import Settings
from .data.dataset import BuiltDataset
from .metrics import MetricsRun
from .progress import write_cycle_progress
from .state import TrainerState
from .training.telemetry import safe_perplexity

HEARTBEAT_S = 5.0


def run_config(settings: Settings) -> dict[str, Any]:
    """The W&B run config, from an allow-list: no URL, no key, no path that could name a user's secret."""
    dumped = settings.model_dump(mode="json")
    allowed = {section: dumped[section] for section in ("schedule", "data", "model", "training", "metrics")}
    # The promotion settings, but not the on_promote command line (it may carry a host name or a token).
    allowed["promotion"] = {key: value for key, value in dumped["promotion"].items() if key != "on_promote"}
    allowed["promotion"]["on_promote_configured"] = bool(dumped["promotion"]["on_promote"])
    allowed["database"] = {key: dumped["database"][key] for key in ("table", "id_column", "content_column", "language_column", "quality_column")}
    allowed["wandb"] = {"project": dumped["wandb"]["project"], "group": dumped["wandb"]["group"]}
    return allowed


def model_config(settings: Settings, trainable: int, total: int, quantization: str, previous: Path | None) -> dict[str, Any]:
    return {
        "model/name": settings.model.base_model,
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


def final_metrics(state: TrainerState, run_number: int, result, dataset: BuiltDataset, dataset_seconds: float) -> dict[str, float]:
    seconds = max(result.train_seconds, 1e-9)
    metrics = {
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
        "performance/run_samples_per_second": dataset.train_samples / seconds,
        "performance/run_train_seconds": result.train_seconds,
        # What the optimizer steps consumed, not the dataset's tokens (which include the eval split).
        "performance/run_tokens_per_second": result.tokens_seen / seconds,
    }
    if result.eval_loss is not None:
        metrics["eval/final_loss"] = result.eval_loss
        metrics["eval/final_perplexity"] = safe_perplexity(result.eval_loss)
    return metrics


class ProgressReporter:
    """Forwards training metrics to the metrics run and keeps `status` informed of the progress."""

    def __init__(self, metrics: MetricsRun, state_file: Path, run_number: int):
        self.metrics = metrics
        self.state_file = state_file
        self.run_number = run_number
        self._last_heartbeat = 0.0

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
            write_cycle_progress(self.state_file, "training", run=self.run_number, step=step,
                                 percent=round(values["progress/step_percent"], 1),
                                 eta_minutes=round(values["progress/eta_minutes"], 1))
