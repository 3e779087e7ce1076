"""One training cycle, top to bottom:

    load state -> count and fetch new samples -> build dataset -> train -> save adapter -> save state

with metrics reported at each step. The state advances only after the adapter is safely on disk; any
failure before that changes nothing but the failure counters.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from . import stop
from .config import Settings, metrics_file, wandb_directory
from .data import filters
from .data.dataset import (BLOCK_FILTERS, BuiltDataset, build_dataset, format_raw, make_completion_formatter,
                           pack_by_language, within_block_budget)
from .continual import Holdout, add_replay, holdout_fingerprints, load_holdout, without_holdout
from .data.neardup import signed_ahead
from .data.packing import one_sample_per_block
from .data.records import FetchResult
from .data.source import (SourceError, check_table, count_new_samples, describe_ineligible, fetch_new_samples,
                          first_watermark, ids_behind_watermark, ineligible_new_rows, open_connection,
                          watermark_mismatch, watermark_rows)
from .errors import StateError, StoreError, TrainingError, TrainingInterrupted
from .failures import save_traceback
from .faults import crash_point
from .hooks import run_on_promote
from .lock import trainer_lock
from .metrics import (MetricsRun, SystemMonitor, WandbOptions, effective_wandb_mode, prune_wandb_runs,
                      rotate_metrics_file, send_alert)
from .outcome import CycleOutcome
from .progress import write_cycle_progress
from .promotion import Decision, comparable_anchors, decide_promotion, holdout_metrics, update_anchors
from .report import (HEARTBEAT_S, ProgressReporter, adapter_card, continuous_metrics, final_metrics, model_config,
                     run_config)
from .state import (TrainerState, advance_state, in_service_adapter, load_state, record_failure,
                    save_state, with_hand_off)
from .training.adapter_fit import in_service_misfit
from .training.adapters import prune_adapters, save_adapter
from .training.backoff import (BackoffOutcome, OutOfMemoryOnRanks, memory_after_run, memory_record, sized,
                               start_micro_batch, train_with_oom_backoff)
from .training.distributed import RankGroup, RankSpec, read_adapter_files
from .training.disk import describe_disk_full, is_disk_full, space_problem
from .training.model_files import model_problems, watching_download

# The training stack (torch, transformers, peft, bitsandbytes: ~10 s and ~0.5 GB to import) is imported only
# once a cycle has something to train: the daemon's cycles that find too few new rows end in about a second.
# `tests/test_first_hour.py` checks that such a cycle never imports torch.

log = logging.getLogger(__name__)


def run_cycle(settings: Settings, force: bool = False, process_started: float | None = None) -> CycleOutcome:
    """`process_started`: when the trainer process began (the daemon's start for the cycles it runs), for uptime.
    A stop request (stop.CURRENT: SIGTERM/SIGINT once its handlers are installed) ends it in any phase."""
    started = time.time() if process_started is None else process_started
    with trainer_lock(settings.paths.state_file):
        try:
            return _run_locked(settings, force, stop.CURRENT.requested, started)
        except TrainingInterrupted as interruption:
            return CycleOutcome("interrupted", str(interruption))
        except StateError:
            raise  # one line; no failure can be recorded in a state that cannot be read
        except Exception as error:
            if is_disk_full(error):  # the disk, not a bug: one line that says where, and no traceback to write
                raise _failed(settings, TrainingError(describe_disk_full(settings)), started) from error
            if not isinstance(error, (TrainingError, SourceError, StoreError)):  # a bug, a library's surprise: keep the trace
                save_traceback(settings, error)
            raise _failed(settings, error, started)


def _failed(settings: Settings, error: Exception, started: float) -> Exception:
    """Record the failure in the state (and alert when it makes the daemon stuck); the error to raise. A state
    that cannot be written (the disk is full) is said, and the cycle's own error still names the cause."""
    smaller = (memory_record(settings.training, settings.data.max_length, error.next_micro_batch, time.time())
               if isinstance(error, OutOfMemoryOnRanks) else None)
    try:
        failed = record_failure(settings.paths.state_file, f"{type(error).__name__}: {error}", started, smaller)
    except OSError as problem:
        log.error("could not record this failure in %s: %s", settings.paths.state_file, problem)
        return error
    if failed.consecutive_failures == settings.service.alert_after_failures:
        alert_stuck(settings, failed)
    return error


def _run_locked(settings: Settings, force: bool, should_stop: Callable[[], bool], process_started: float) -> CycleOutcome:
    state = catch_up_hand_off(settings, load_state(settings.paths.state_file))
    # Every pending range is read, however old: one past database.max_commit_lag_minutes is given up when the
    # state advances after this read, so rows that arrived while no cycle read them are trained first.
    give_up_before = time.time() - settings.database.max_commit_lag_minutes * 60
    gaps = state.gap_ranges()
    with open_connection(settings.database) as connection:
        check_table(connection, settings.database)
        # Another table under the same settings (a changed database.url or table, a table created again and
        # refilled past the watermark) would have its rows up to the watermark taken as trained.
        other_table = watermark_mismatch(connection, settings.database, state.watermark_rows, state.last_trained_id)
        if other_table:
            raise SourceError(other_table)
        if state.total_training_runs == 0 and state.last_trained_id == 0:  # never advanced: from the first row
            state.last_trained_id = first_watermark(connection, settings.database)
        available = count_new_samples(connection, settings.database, settings.data, state.last_trained_id, gaps,
                                      up_to=settings.schedule.min_new_samples)
        if available == 0 or (available < settings.schedule.min_new_samples and not force):
            behind = ids_behind_watermark(connection, settings.database, state.last_trained_id) if not available else None
            if behind:
                log.warning("%s", behind)  # each idle cycle: the daemon would otherwise wait in silence
            # And why the rows that are there do not count (a crawler scoring 0-1 against min_quality = 70).
            why = describe_ineligible(ineligible_new_rows(connection, settings.database, settings.data,
                                                           state.last_trained_id),
                                      settings.data, state.last_trained_id)
            return CycleOutcome(
                "nothing_to_do",
                f"{available} eligible new samples" + (f" ({why})" if why else "")
                + f"; waiting for {settings.schedule.min_new_samples}",
                new_samples=available,
            )
        unusable = model_problems(settings.model, settings.training.loss)
        if unusable:  # each would fail the cycle after the model loaded, or before
            raise TrainingError("; ".join(unusable))
        no_room = space_problem(settings)
        if no_room:  # before hours of training that could not be saved
            raise TrainingError(f"{no_room}; nothing was trained")
        previous = in_service_adapter(state)
        misfit = in_service_misfit(previous, settings.model) if previous is not None else None
        if misfit:  # before the model loads: peft would keep the adapter's own settings without a word
            raise TrainingError(misfit)
        log.info("%s%d eligible new samples past id %d", "at least " if available == settings.schedule.min_new_samples else "",
                 available, state.last_trained_id)
        write_cycle_progress(settings.paths.state_file, "dataset", new_samples=available)
        from .training.model import load_tokenizer

        tokenizer = load_tokenizer(settings.model.base_model)
        format_text = make_completion_formatter(tokenizer) if settings.data.format == "completion" else format_raw
        holdout = load_holdout(connection, settings, state)
        fetched = FetchResult(last_examined_id=state.last_trained_id, give_up_seen_before=give_up_before)
        # A copy or near-copy of a holdout sample would leak the evaluation into training: both are blocked.
        blockers, duplicate_store = filters.build_blockers(settings.data, settings.paths.state_file.parent,
                                                           protected=[sample.content for sample in holdout.samples])
        phase_started = time.perf_counter()
        rows = fetch_new_samples(connection, settings.database, settings.data, state.last_trained_id, fetched, gaps)
        rows = without_holdout(rows, holdout)
        # No more than training.max_steps can train: a row is recorded as trained only if training saw it.
        rows = within_block_budget(rows, settings.training.block_budget, tokenizer, settings.data.max_length, format_text,
                                   settings.data.eval_fraction, settings.data.seed, fetched, settings.data.max_eval_samples)
        if duplicate_store.near is not None:
            # After the budget: reading ahead must not read rows this run will leave for the next one.
            rows = signed_ahead(rows, duplicate_store.near)
        dataset = build_dataset(
            _with_progress(rows, settings.paths.state_file),
            tokenizer,
            max_length=settings.data.max_length,
            eval_fraction=settings.data.eval_fraction,
            seed=settings.data.seed,
            blockers=blockers,
            skipped_upstream=fetched.skipped,
            format_text=format_text,
            max_eval_samples=settings.data.max_eval_samples,
        )
        dataset.data_metrics["data/holdout_rows"] = holdout.rows_in_fetch
        dataset.data_metrics["data/waiting_for_score"] = fetched.waiting_for_score
        if dataset.train_blocks:
            add_replay(connection, settings, state, dataset, holdout, blockers, tokenizer, format_text)
        holdout.blocks = pack_by_language(holdout.samples, tokenizer, settings.data.max_length, format_text)
        dataset_seconds = time.perf_counter() - phase_started
        # The journal's line between the count and the first evaluation (on the 7B, a minute of building and
        # loading that was otherwise silent).
        log.info("dataset: %d new samples to train in %d blocks (+ %d replayed), %d held out; %d rows read, %d skipped, "
                 "%d blocked%s (%.1f s)", dataset.train_samples, len(dataset.train_blocks), dataset.replay_samples,
                 dataset.eval_samples + holdout.rows_in_fetch, fetched.rows_examined, sum(fetched.skipped.values()),
                 int(dataset.data_metrics.get("data/blocked_total", 0)),
                 f", {fetched.waiting_for_score} waiting for a quality score" if fetched.waiting_for_score else "",
                 dataset_seconds)
        fetched.watermark_rows = watermark_rows(connection, settings.database,
                                                max(state.last_trained_id, fetched.last_examined_id))
        crash_point("tokenize")
    stop.CURRENT.check("after the dataset build")
    held_out = dataset.eval_samples + holdout.rows_in_fetch
    if dataset.train_samples and not dataset.train_blocks:
        # Samples passed every filter and yet gave nothing to train: the rows are not done with.
        raise TrainingError(f"{dataset.train_samples} samples passed the filters but gave no tokens to train on: "
                            f"the tokenizer of model.base_model reads them as nothing; nothing was advanced")
    if not dataset.train_blocks:
        # Everything was skipped or blocked: nothing to train, but those rows are done with.
        save_state(advance_state(state, fetched, 0, None, None, process_started, samples_held_out=held_out),
                   settings.paths.state_file)
        duplicate_store.commit()
        waiting = f" ({fetched.waiting_for_score} wait for a quality score)" if fetched.waiting_for_score else ""
        return CycleOutcome("filtered_out", f"all {fetched.rows_examined} new rows were skipped, blocked or held out{waiting}")
    return _train_and_save(settings, state, tokenizer, dataset, fetched, duplicate_store, dataset_seconds, should_stop,
                           process_started, holdout)


def _train_and_save(settings, state: TrainerState, tokenizer, dataset: BuiltDataset, fetched: FetchResult,
                    duplicate_store, dataset_seconds: float, should_stop, process_started: float,
                    holdout: Holdout) -> CycleOutcome:
    from .training.loop import train_adapter
    from .training.model import attach_adapter, choose_packing, count_parameters, load_base_model, pick_device
    from .training.telemetry import ReportingOptions

    run_number = state.total_training_runs + 1
    device = pick_device()
    options = wandb_options(settings)
    config = run_config(settings) | {"device": device}
    rotate_metrics_file(metrics_file(settings))
    metrics = MetricsRun(run_number, metrics_file(settings), options, config, settings.metrics.queue_size,
                         step_offset=state.total_steps)
    reporter = ProgressReporter(metrics, settings.paths.state_file, run_number, interactive=sys.stderr.isatty())
    monitor = SystemMonitor(settings.paths.output_dir)
    ranks = RankGroup(settings.training, device, run_number) if settings.training.world_size > 1 else None
    exit_code = 1
    try:
        if ranks is not None:
            # Several training processes: this one is rank 0; the group forms before anything builds a Trainer.
            write_cycle_progress(settings.paths.state_file, "waiting for the training ranks", run=run_number)
            ranks.__enter__()
        dataset.dataset_metrics["dataset/train_blocks"] = len(dataset.train_blocks)
        metrics.log(0, dataset.data_metrics | dataset.dataset_metrics | {"performance/dataset_build_seconds": dataset_seconds}
                    | continuous_metrics(state, run_number))
        write_cycle_progress(settings.paths.state_file, "loading model", run=run_number)
        log.info("loading %s on %s", settings.model.base_model, device)
        loading_started = time.perf_counter()
        with download_progress(settings, run_number):
            base, quantization = load_base_model(settings.model, device)
        log.info("model loaded in %.1f s (quantization: %s)", time.perf_counter() - loading_started, quantization)
        stop.CURRENT.check("after loading the model")
        previous = in_service_adapter(state)
        if state.latest_adapter and previous is None:
            # Loud, and recorded: training starts over from a fresh LoRA rather than failing forever.
            log.warning("the previous adapter %s is missing: this run starts a new LoRA", state.latest_adapter)
            metrics.update_config({"model/previous_adapter_missing": True})
        packing = choose_packing(settings.model.packing, base)
        if packing != "position_ids":
            dataset.train_blocks = one_sample_per_block(dataset.train_blocks)
            dataset.eval_blocks = one_sample_per_block(dataset.eval_blocks)
            holdout.blocks = {language: one_sample_per_block(blocks) for language, blocks in holdout.blocks.items()}
        model = attach_adapter(base, settings.model, previous)
        trainable, total = count_parameters(model)
        # The dtype the frozen head really has: model.frozen_dtype applies on CUDA with a quantized base only.
        frozen_dtype = str(base.get_output_embeddings().weight.dtype).removeprefix("torch.")
        metrics.update_config(model_config(settings, trainable, total, quantization, previous)
                              | {"packing": packing, "model/frozen_dtype": frozen_dtype})
        reporting = ReportingOptions(settings.metrics.system_every_steps, settings.metrics.gradient_metrics_every_steps,
                                     settings.metrics.per_layer_sample, settings.metrics.gpu_peak_tflops)

        def attempt(training):
            with tempfile.TemporaryDirectory(prefix="codelupe-trainer-") as scratch:
                return train_adapter(model, tokenizer, dataset.train_blocks, dataset.eval_blocks, training, Path(scratch),
                                     reporter, reporting, should_stop, monitor.read, settings.data.seed, device,
                                     quantized=quantization != "none", packed=packing == "position_ids",
                                     holdout=holdout.blocks)

        start = start_micro_batch(state.micro_batch, settings.training, settings.data.max_length)
        if ranks is None:
            result, sizing = train_with_oom_backoff(model, settings.training, start, attempt)
        else:
            # All ranks train at one size: the one an earlier out-of-memory left in the state, if any.
            training = sized(settings.training, start)
            result, sizing = ranks.train(RankSpec(settings.model, training, read_adapter_files(previous),
                                                  dataset.train_blocks, dataset.eval_blocks, tokenizer.pad_token_id,
                                                  settings.data.seed, quantization != "none",
                                                  packing == "position_ids"), attempt)
        metrics.update_config({"hyperparams/effective_micro_batch": sizing.micro_batch,
                               "hyperparams/effective_gradient_accumulation_steps": sizing.accumulation})
        metrics.log(result.global_step, {"performance/oom_backoffs": sizing.backoffs})
        stop.CURRENT.check("after training")
        fingerprints = holdout_fingerprints(holdout, settings)
        decision = decide_promotion(settings.promotion, result.holdout_before, result.holdout_after,
                                    comparable_anchors(state.holdout_best, fingerprints))
        log.info("%s run %d: %s", "promoting" if decision.promoted else "rejecting", run_number, decision.reason)
        write_cycle_progress(settings.paths.state_file, "saving adapter", run=run_number)
        # From here the run is published as a whole: a stop signal waits for the state and the store, and then
        # for the hand-off to the inference server (on_promote, bounded by its timeout), which belongs to the
        # published run: interrupted, it would leave the server on the old adapter and nothing would retry it.
        with stop.CURRENT.deferred():
            outcome = _publish(settings, state, model, run_number, previous, dataset, fetched, result, duplicate_store,
                               device, quantization, packing, process_started, metrics, dataset_seconds, sizing,
                               decision, holdout, fingerprints)
            exit_code = 0
            if settings.promotion.mode == "gate":
                metrics.rename("promoted" if decision.promoted else "rejected")
            announce_decision(settings, decision, outcome, state)
        return outcome
    finally:
        crash_point("teardown")
        if ranks is not None:
            ranks.__exit__(None, None, None)
        reporter.line.close()
        monitor.close()
        metrics.finish(exit_code)


def download_progress(settings: Settings, run_number: int, interval_s: float = HEARTBEAT_S,
                      cache_dir: str | Path | None = None):
    """The first load of a hub model downloads it (~15 GB for the 7B): the bytes arriving are the cycle's progress,
    so a download slower than service.cycle_stall_minutes is not taken for a hang (a stalled one still is),
    and `status` and the log (once a minute) say how far it is instead of a silent 'loading model'."""
    if settings.model.is_local:
        return contextlib.nullcontext()
    logged = -math.inf  # the first bytes are said at once, then once a minute

    def on_growth(total: int) -> None:
        nonlocal logged
        write_cycle_progress(settings.paths.state_file, "downloading model", run=run_number,
                             downloaded_gb=round(total / 1e9, 2))
        if time.monotonic() - logged >= 60:
            logged = time.monotonic()
            log.info("downloading %s: %.1f GB so far", settings.model.base_model, total / 1e9)

    return watching_download(settings.model.base_model, on_growth, interval_s, cache_dir)


def _publish(settings: Settings, state: TrainerState, model, run_number: int, previous: Path | None,
             dataset: BuiltDataset, fetched: FetchResult, result, duplicate_store, device: str, quantization: str,
             packing: str, process_started: float, metrics: MetricsRun, dataset_seconds: float,
             sizing: BackoffOutcome, decision: Decision, holdout: Holdout,
             fingerprints: dict[str, str]) -> CycleOutcome:
    """Adapter, then state, then duplicate store: the order that makes a crash at any point safe.
    A candidate the gate rejected is saved too (for inspection), but `latest` stays where it was."""
    summary = {
        "run_number": run_number,
        "adapter": str(settings.paths.output_dir / f"run-{run_number:06d}"),
        "continued_from": str(previous) if previous else None,
        "previous_adapter_missing": bool(state.latest_adapter) and previous is None,
        "samples_trained": dataset.train_samples,
        "train_samples": dataset.train_samples,
        "eval_samples": dataset.eval_samples,
        "rows_examined": fetched.rows_examined,
        "skipped": dict(fetched.skipped),
        "waiting_for_score": fetched.waiting_for_score,
        "blocked": {name: dataset.data_metrics[f"data/blocked_{name}"] for name in BLOCK_FILTERS},
        "steps": result.global_step,
        "train_loss": result.train_loss,
        "eval_loss_before": result.initial_eval_loss,
        "eval_loss": result.eval_loss,
        "train_seconds": round(result.train_seconds, 3),
        "device": device,
        "quantization": quantization,
        "packing": packing,
        "micro_batch": sizing.micro_batch,
        "oom_backoffs": sizing.backoffs,
        "replay_samples": dataset.replay_samples,
        "holdout_rows": holdout.rows_in_fetch,
        "promoted": decision.promoted,
        "promotion_reason": decision.reason,
        "holdout_loss": decision.candidate_loss,
        "holdout_loss_in_use": decision.in_use_loss,
        "tokens_trained": result.tokens_seen,
        "finished_at": time.time(),
    }
    parent = state.adapter_in_use if previous is not None else None
    card = adapter_card(settings, run_number, summary | {"continued_from_run": f"run {parent}" if parent else None},
                        state.last_trained_id + 1, fetched.last_examined_id, metrics.run_id)
    crash_point("publish")
    adapter_path = save_adapter(model, settings.paths.output_dir, run_number, promote=decision.promoted, card=card)
    summary["adapter"] = str(adapter_path)
    crash_point("save")
    lineage_entry = {
        "run": run_number,
        "adapter": str(adapter_path),
        "parent": parent,
        "first_id": state.last_trained_id + 1,
        "last_id": fetched.last_examined_id,
        "samples_trained": dataset.train_samples,
        "replay_samples": dataset.replay_samples,
        "holdout_loss": decision.candidate_loss,
        "holdout_loss_in_use": decision.in_use_loss,
        "holdout_losses": decision.candidate_languages,
        "holdout_losses_in_use": decision.in_use_languages,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "finished_at": summary["finished_at"],
    }
    new_state = advance_state(state, fetched, dataset.train_samples, adapter_path, summary, process_started,
                              samples_held_out=dataset.eval_samples + holdout.rows_in_fetch,
                              lineage_entry=lineage_entry, replay_samples=dataset.replay_samples,
                              steps=result.global_step, tokens=result.tokens_seen)
    new_state.holdout_best = update_anchors(state.holdout_best, fingerprints, result.holdout_before, parent or 0,
                                            result.holdout_after, decision.promoted, run_number)
    new_state.micro_batch = memory_after_run(state.micro_batch, settings.training, settings.data.max_length, sizing)
    save_state(new_state, settings.paths.state_file)
    # After the state: a crash in between can at worst let a duplicate through later, never lose a sample.
    duplicate_store.commit()
    metrics.log(result.global_step, final_metrics(new_state, run_number, result, dataset, dataset_seconds)
                | holdout_metrics(decision, new_state.holdout_best) | {"continuous/promoted": int(decision.promoted)}
                | ({"continuous/promotion_margin": decision.margin} if decision.margin is not None else {}))
    prune_old_outputs(settings, adapter_path, new_state)
    verdict = "" if settings.promotion.mode == "always" else (" (promoted)" if decision.promoted else " (rejected: kept the adapter in use)")
    return CycleOutcome("trained", f"run {run_number} trained {dataset.train_samples} samples{verdict}",
                        new_samples=dataset.total_samples, run_number=run_number, summary=summary)


def wandb_options(settings: Settings) -> WandbOptions:
    return WandbOptions(
        mode=effective_wandb_mode(settings.wandb.mode, settings.wandb.enabled),
        project=settings.wandb.project,
        entity=settings.wandb.entity,
        group=settings.wandb.group,
        directory=wandb_directory(settings),
        init_timeout_s=settings.wandb.init_timeout_s,
        finish_timeout_s=settings.wandb.finish_timeout_s,
    )


def alert_stuck(settings: Settings, state: TrainerState) -> None:
    """Once, when failures in a row reach service.alert_after_failures: the daemon is stuck at this watermark.
    Counts and the error class only: never sample text, paths of user data or secrets."""
    error_class = (state.last_error or "").split(":", 1)[0]
    send_alert(wandb_options(settings), metrics_file(settings), "codelupe-trainer is stuck",
               f"{state.consecutive_failures} cycles in a row failed at last_trained_id {state.last_trained_id} "
               f"({error_class}); see `codelupe-trainer status` on the training host")


def announce_decision(settings: Settings, decision: Decision, outcome: CycleOutcome, before: TrainerState) -> None:
    """After the state is saved: hand a promoted adapter to the server that uses it (on_promote), or alert
    that a candidate was rejected. Neither can undo what is published. `before`: the state the run started
    from (a rejection adds one rejected run and leaves the adapter in use as it was)."""
    summary = outcome.summary
    if decision.promoted:
        crash_point("hand-off")
        hook = run_on_promote(settings.promotion, "promote", Path(summary["adapter"]), outcome.run_number,
                              decision.candidate_loss, decision.in_use_loss)
        if hook is not None:
            record_hook_outcome(settings, outcome.run_number, hook)
    else:
        # Counts only: never sample text, paths of user data or secrets.
        send_alert(wandb_options(settings), metrics_file(settings), "codelupe-trainer rejected an adapter",
                   f"run {outcome.run_number} was not promoted ({before.rejected_runs + 1} rejected in all); "
                   f"the adapter in use is still run {before.adapter_in_use or 0}")


def catch_up_hand_off(settings: Settings, state: TrainerState) -> TrainerState:
    """Run the hand-off (on_promote) of the adapter in use if it never ran: the process that promoted it (or
    rolled back to it) was killed between writing the state and the hand-off (kill -9, the kernel's
    out-of-memory killer, a power cut), so the server is still on an older adapter than `latest` and nothing
    else would ever retry it. Also hands the adapter in use over once when on_promote is first configured.
    Called at the start of every cycle, under the lock; a hand-off that ran and failed is not repeated."""
    if not settings.promotion.on_promote or state.adapter_in_use is None:
        return state
    # The entry that put the adapter in use there: the newest promotion or rollback (a rejection changes nothing).
    entry = next((item for item in reversed(state.lineage)
                  if item.get("event") == "rollback" or ("event" not in item and item.get("promoted"))), None)
    adapter = in_service_adapter(state)
    if entry is None or "on_promote" in entry or entry.get("run") != state.adapter_in_use or adapter is None:
        return state
    event = "rollback" if entry.get("event") == "rollback" else "promote"
    log.warning("the hand-off of run %d to promotion.on_promote has not run (the process that %s it ended first, "
                "or on_promote was set since): running it now", state.adapter_in_use,
                "rolled back to" if event == "rollback" else "promoted")
    with stop.CURRENT.deferred():  # as after a promotion: a hand-off cut half-way would not be retried
        outcome = run_on_promote(settings.promotion, event, adapter, state.adapter_in_use,
                                 entry.get("holdout_loss"), entry.get("holdout_loss_in_use"))
        save_state(with_hand_off(state, state.adapter_in_use, outcome), settings.paths.state_file)
    return state


def record_hook_outcome(settings: Settings, run_number: int, outcome: str) -> None:
    save_state(with_hand_off(load_state(settings.paths.state_file), run_number, outcome), settings.paths.state_file)


def prune_old_outputs(settings: Settings, adapter_path: Path, state: TrainerState) -> None:
    """Retention runs after the state is saved; a failure here is logged, never a failed run. The newest
    `keep_adapters` promoted adapters are kept whatever else is pruned: they are what `rollback` can reach."""
    promoted = [Path(entry["adapter"]) for entry in state.lineage if entry.get("promoted")][-settings.paths.keep_adapters:]
    try:
        prune_adapters(settings.paths.output_dir, settings.paths.keep_adapters, [adapter_path, *promoted])
        prune_wandb_runs(wandb_directory(settings), settings.wandb.keep_offline_days)
    except OSError as error:
        log.warning("could not remove old adapters or W&B runs: %s", error)


def _with_progress(samples: Iterator, state_file: Path) -> Iterator:
    """Passes samples through, telling `status` and the daemon's stall watch how far the fetch is (every few
    seconds); the first row read is a fault-injection point."""
    last_written = time.monotonic()
    for index, sample in enumerate(samples):
        if index == 0:
            crash_point("fetch")
        if time.monotonic() - last_written >= HEARTBEAT_S:
            last_written = time.monotonic()
            write_cycle_progress(state_file, "dataset", rows_read=index)
        yield sample
