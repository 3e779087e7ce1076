"""One training cycle, top to bottom:

    load state -> count and fetch new samples -> build dataset -> train -> save adapter -> save state

with metrics reported at each step. The state advances only after the adapter is safely on disk; any
failure before that changes nothing but the failure counters.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import filters
from .doctor import check_model_path
from .faults import crash_point
from .config import Settings
from .dataset import BLOCK_FILTERS, BuiltDataset, build_dataset, format_raw, make_completion_formatter, one_sample_per_block
from .metrics import MetricsRun, SystemMonitor, WandbOptions, effective_wandb_mode
from .records import FetchResult
from .retention import prune_adapters, prune_wandb_runs
from .source import check_table, count_new_samples, fetch_new_samples, open_connection
from .state import TrainerState, account_uptime, load_state, record_failure, save_state
from .status import write_cycle_progress
from .trainer import (
    Frequencies,
    TrainingError,
    TrainingInterrupted,
    attach_adapter,
    count_parameters,
    load_base_model,
    load_tokenizer,
    packing_is_isolated,
    pick_device,
    safe_perplexity,
    save_adapter,
    train_adapter,
)

log = logging.getLogger(__name__)

# When the trainer process started: the daemon's start for cycles it runs, else this process's own.
_process_started = time.time()


class AlreadyRunning(Exception):
    """Another cycle holds the trainer lock."""


@dataclass
class CycleOutcome:
    status: str  # trained | nothing_to_do | interrupted | filtered_out
    message: str
    new_samples: int = 0
    run_number: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def lock_path(settings: Settings) -> Path:
    return settings.paths.state_file.with_suffix(".lock")


def metrics_file(settings: Settings) -> Path:
    return settings.paths.state_file.parent / "metrics.jsonl"


def wandb_directory(settings: Settings) -> Path:
    return settings.wandb.dir or settings.paths.state_file.parent


@contextmanager
def trainer_lock(settings: Settings) -> Iterator[None]:
    """One trainer at a time; the kernel releases the flock if the holder dies."""
    path = lock_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(f"another codelupe-trainer cycle is running (lock {path} is held)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def set_process_started(started: float) -> None:
    """Called in a daemon's cycle process, so uptime counts the daemon's time, not just the cycle's."""
    global _process_started
    _process_started = started


def run_config(settings: Settings) -> dict[str, Any]:
    """The W&B run config, from an allow-list: no URL, no key, no path that could name a user's secret."""
    dumped = settings.model_dump(mode="json")
    allowed = {section: dumped[section] for section in ("schedule", "data", "model", "training", "metrics")}
    allowed["database"] = {key: dumped["database"][key] for key in ("table", "id_column", "content_column", "language_column", "quality_column")}
    allowed["wandb"] = {"project": dumped["wandb"]["project"], "group": dumped["wandb"]["group"]}
    return allowed


def run_cycle(settings: Settings, force: bool = False, should_stop: Callable[[], bool] = lambda: False) -> CycleOutcome:
    with trainer_lock(settings):
        try:
            return _run_locked(settings, force, should_stop)
        except TrainingInterrupted as interruption:
            return CycleOutcome("interrupted", str(interruption))
        except Exception as error:
            record_failure(settings.paths.state_file, f"{type(error).__name__}: {error}", _process_started)
            raise


def _run_locked(settings: Settings, force: bool, should_stop: Callable[[], bool]) -> CycleOutcome:
    state = expire_gaps(load_state(settings.paths.state_file), settings.database.max_commit_lag_minutes)
    gaps = [int(gap) for gap in state.pending_gaps]
    with open_connection(settings.database) as connection:
        check_table(connection, settings.database)
        available = count_new_samples(connection, settings.database, settings.data, state.last_trained_id, gaps)
        if available == 0 or (available < settings.schedule.min_new_samples and not force):
            return CycleOutcome(
                "nothing_to_do",
                f"{available} eligible new samples; waiting for {settings.schedule.min_new_samples} (use --force to train anyway)",
                new_samples=available,
            )
        _, model_found, model_problem = check_model_path(settings.model.base_model)
        if not model_found:
            raise TrainingError(model_problem)
        log.info("%d eligible new samples past id %d", available, state.last_trained_id)
        write_cycle_progress(settings.paths.state_file, "dataset", new_samples=available)
        tokenizer = load_tokenizer(settings.model.base_model)
        fetched = FetchResult(last_examined_id=state.last_trained_id)
        blockers, duplicate_store = filters.build_blockers(settings.data, settings.paths.state_file.parent)
        phase_started = time.perf_counter()
        dataset = build_dataset(
            _announce_first(fetch_new_samples(connection, settings.database, settings.data, state.last_trained_id, fetched, gaps)),
            tokenizer,
            max_length=settings.data.max_length,
            eval_fraction=settings.data.eval_fraction,
            seed=settings.data.seed,
            blockers=blockers,
            skipped_upstream=fetched.skipped,
            format_text=make_completion_formatter(tokenizer) if settings.data.format == "completion" else format_raw,
        )
        dataset_seconds = time.perf_counter() - phase_started
        crash_point("tokenize")
    if should_stop():
        raise TrainingInterrupted("stop requested before training")
    if not dataset.train_blocks:
        # Everything was skipped or blocked: nothing to train, but those rows are done with.
        advance_past_rejected(settings, state, fetched, duplicate_store)
        return CycleOutcome("filtered_out", f"all {fetched.rows_examined} new rows were skipped or blocked")
    return _train_and_save(settings, state, tokenizer, dataset, fetched, duplicate_store, dataset_seconds, should_stop)


def _train_and_save(settings, state: TrainerState, tokenizer, dataset: BuiltDataset, fetched: FetchResult,
                    duplicate_store, dataset_seconds: float, should_stop) -> CycleOutcome:
    run_number = state.total_training_runs + 1
    device = pick_device()
    options = WandbOptions(
        mode=effective_wandb_mode(settings.wandb.mode, settings.wandb.enabled),
        project=settings.wandb.project,
        entity=settings.wandb.entity,
        group=settings.wandb.group,
        directory=wandb_directory(settings),
        init_timeout_s=settings.wandb.init_timeout_s,
        finish_timeout_s=settings.wandb.finish_timeout_s,
    )
    config = run_config(settings) | {"device": device}
    metrics = MetricsRun(run_number, metrics_file(settings), options, config, settings.metrics.queue_size)
    reporter = ProgressReporter(metrics, settings.paths.state_file, run_number)
    monitor = SystemMonitor(settings.paths.output_dir)
    exit_code = 1
    try:
        metrics.log(0, dataset.data_metrics | dataset.dataset_metrics | {"performance/dataset_build_seconds": dataset_seconds})
        write_cycle_progress(settings.paths.state_file, "loading model", run=run_number)
        base, quantization = load_base_model(settings.model, device)
        previous = Path(state.latest_adapter) if state.latest_adapter and Path(state.latest_adapter).exists() else None
        packing = choose_packing(settings.model.packing, base)
        if packing != "position_ids":
            dataset.train_blocks = one_sample_per_block(dataset.train_blocks)
            dataset.eval_blocks = one_sample_per_block(dataset.eval_blocks)
        model = attach_adapter(base, settings.model, previous)
        trainable, total = count_parameters(model)
        metrics.update_config(model_config(settings, trainable, total, quantization, previous) | {"packing": packing})
        with tempfile.TemporaryDirectory(prefix="codelupe-trainer-") as scratch:
            result = train_adapter(
                model, tokenizer, dataset.train_blocks, dataset.eval_blocks, settings.training, Path(scratch),
                reporter, Frequencies(settings.metrics.system_every_steps, settings.metrics.gradient_metrics_every_steps,
                                     settings.metrics.per_layer_sample),
                should_stop, monitor.read, settings.data.seed, device, quantized=quantization != "none",
                packed=packing == "position_ids",
            )
        write_cycle_progress(settings.paths.state_file, "saving adapter", run=run_number)
        adapter_path = save_adapter(model, settings.paths.output_dir, run_number)
        crash_point("save")
        summary = {
            "run_number": run_number,
            "adapter": str(adapter_path),
            "continued_from": str(previous) if previous else None,
            "samples_trained": dataset.total_samples,
            "train_samples": dataset.train_samples,
            "eval_samples": dataset.eval_samples,
            "rows_examined": fetched.rows_examined,
            "skipped": dict(fetched.skipped),
            "blocked": {name: dataset.data_metrics[f"data/blocked_{name}"] for name in BLOCK_FILTERS},
            "steps": result.global_step,
            "train_loss": result.train_loss,
            "eval_loss_before": result.initial_eval_loss,
            "eval_loss": result.eval_loss,
            "train_seconds": round(result.train_seconds, 3),
            "device": device,
            "quantization": quantization,
            "packing": packing,
            "finished_at": time.time(),
        }
        new_state = advance_state(state, fetched, dataset.total_samples, adapter_path, summary)
        save_state(new_state, settings.paths.state_file)
        # After the state: a crash in between can at worst let a duplicate through later, never lose a sample.
        duplicate_store.commit()
        metrics.log(result.global_step, final_metrics(new_state, run_number, result, dataset, dataset_seconds))
        exit_code = 0
        prune_old_outputs(settings, adapter_path)
        return CycleOutcome("trained", f"run {run_number} trained {dataset.total_samples} samples",
                            new_samples=dataset.total_samples, run_number=run_number, summary=summary)
    finally:
        monitor.close()
        metrics.finish(exit_code)


def prune_old_outputs(settings: Settings, adapter_path: Path) -> None:
    """Retention runs after the state is saved; a failure here is logged, never a failed run."""
    try:
        prune_adapters(settings.paths.output_dir, settings.paths.keep_adapters, [adapter_path])
        prune_wandb_runs(wandb_directory(settings), settings.wandb.keep_offline_days)
    except OSError as error:
        log.warning("could not remove old adapters or W&B runs: %s", error)


class ProgressReporter:
    """Forwards training metrics to the metrics run and keeps `status` informed of the progress."""

    def __init__(self, metrics: MetricsRun, state_file: Path, run_number: int):
        self.metrics = metrics
        self.state_file = state_file
        self.run_number = run_number

    def log(self, step: int, values: dict[str, float]) -> None:
        self.metrics.log(step, values)
        if "progress/step_percent" in values:
            write_cycle_progress(self.state_file, "training", run=self.run_number, step=step,
                                 percent=round(values["progress/step_percent"], 1),
                                 eta_minutes=round(values["progress/eta_minutes"], 1))


def choose_packing(setting: str, base_model) -> str:
    """`auto` packs only if the probe shows this model's attention keeps packed samples apart."""
    if setting != "auto":
        return setting
    if packing_is_isolated(base_model):
        return "position_ids"
    log.warning("this attention backend does not keep packed samples apart: one sample per row, length-grouped")
    return "length_grouped"


def advance_state(state: TrainerState, fetched: FetchResult, samples_trained: int, adapter_path: Path | None,
                  summary: dict[str, Any] | None) -> TrainerState:
    """The state after a successful cycle: a pure function of the old state and what the cycle consumed."""
    now = time.time()
    gaps = {gap: seen for gap, seen in state.pending_gaps.items() if int(gap) not in set(fetched.filled_gaps)}
    for gap in fetched.new_gaps:
        gaps.setdefault(str(gap), now)
    new_state = TrainerState(**asdict(state))
    new_state.pending_gaps = gaps
    new_state.last_trained_id = max(state.last_trained_id, fetched.last_examined_id)
    account_uptime(new_state, _process_started, now)
    if adapter_path is not None:
        new_state.total_training_runs += 1
        new_state.total_samples_trained += samples_trained
        new_state.latest_adapter = str(adapter_path)
        new_state.last_run = summary
    new_state.consecutive_failures = 0
    return new_state


def advance_past_rejected(settings: Settings, state: TrainerState, fetched: FetchResult, duplicate_store) -> None:
    save_state(advance_state(state, fetched, 0, None, None), settings.paths.state_file)
    duplicate_store.commit()


def _announce_first(samples: Iterator) -> Iterator:
    """Passes samples through; marks the moment the first row has been read (a fault-injection point)."""
    for index, sample in enumerate(samples):
        if index == 0:
            crash_point("fetch")
        yield sample


def expire_gaps(state: TrainerState, max_age_minutes: float, now: float | None = None) -> TrainerState:
    """Forget gaps watched longer than the commit-lag window: a rolled-back insert never fills its id."""
    now = time.time() if now is None else now
    state.pending_gaps = {gap: seen for gap, seen in state.pending_gaps.items() if now - seen <= max_age_minutes * 60}
    return state


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
    real_tokens = dataset.dataset_metrics["dataset/total_tokens"]
    metrics = {
        "continuous/run_number": run_number,
        "continuous/total_runs": state.total_training_runs,
        "continuous/last_trained_id": state.last_trained_id,
        "continuous/total_samples_trained": state.total_samples_trained,
        "continuous/uptime_hours": state.uptime_hours,
        "continuous/pending_gaps": len(state.pending_gaps),
        "performance/run_samples_per_second": dataset.train_samples / seconds,
        "performance/run_train_seconds": result.train_seconds,
        "performance/run_tokens_per_second": real_tokens / seconds,
    }
    if result.eval_loss is not None:
        metrics["eval/final_loss"] = result.eval_loss
        metrics["eval/final_perplexity"] = safe_perplexity(result.eval_loss)
    return metrics


def describe_outcome(outcome: CycleOutcome, settings: Settings) -> str:
    """The one-screen summary printed by run-once."""
    if outcome.status != "trained":
        return outcome.message
    summary = outcome.summary
    before = summary.get("eval_loss_before")
    after = summary.get("eval_loss")
    lines = [
        f"run {summary['run_number']}: trained {summary['samples_trained']} samples "
        f"({summary['train_samples']} train / {summary['eval_samples']} eval) in {summary['steps']} steps, "
        f"{summary['train_seconds']:.1f} s on {summary['device']} (quantization: {summary['quantization']})",
        f"rows read: {summary['rows_examined']}, skipped: {sum(summary['skipped'].values())} {summary['skipped'] or ''}, "
        f"blocked: {sum(summary['blocked'].values())}",
        f"train loss: {summary['train_loss']:.4f}",
        f"eval loss: before {before:.4f} -> after {after:.4f}" if before is not None and after is not None else "eval loss: no eval split",
        f"adapter: {summary['adapter']}" + (f" (continued from {summary['continued_from']})" if summary["continued_from"] else " (new)"),
        f"state: {settings.paths.state_file}",
        f"metrics: {metrics_file(settings)}; W&B dir: {wandb_directory(settings) / 'wandb'}",
    ]
    return "\n".join(lines)
