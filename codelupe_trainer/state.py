"""The persisted state file: what has been trained, by which run, and how the daemon is doing.

The file is only ever replaced whole (temporary file, fsync, rename, fsync of the folder), so a crash
at any moment leaves either the old or the new version, never a torn one.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from .data.records import FetchResult
from .errors import StateError
from .faults import crash_point


@dataclass
class TrainerState:
    total_training_runs: int = 0
    last_trained_id: int = 0
    # Samples the adapter was trained on, each row once; rows held out for evaluation are counted apart.
    total_samples_trained: int = 0
    total_samples_held_out: int = 0
    first_started_at: float = field(default_factory=time.time)
    uptime_seconds: float = 0.0
    # When uptime was last added; time before it (or before the process started) is never counted twice.
    uptime_accounted_at: float | None = None
    consecutive_failures: int = 0
    total_failures: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_run: dict[str, Any] | None = None
    latest_adapter: str | None = None
    # Ranges of ids below last_trained_id that were missing when it advanced (a transaction still in flight,
    # however many ids it holds), as [first, last, first seen missing]; rows that commit in them later are
    # trained once, and the range is forgotten after database.max_commit_lag_minutes.
    pending_gaps: list[list[float]] = field(default_factory=list)
    # [id, md5 of its content] of a few rows at or below last_trained_id, as they were when it advanced: a
    # table whose rows there hold other content is not the one trained on (source.watermark_mismatch).
    watermark_rows: list[list] = field(default_factory=list)
    # The micro-batch that fitted in GPU memory after an out-of-memory back-off, with what it was measured
    # for and when: {"micro": m, "effective": batch x accumulation, "max_length": L, "backed_off_at": unix s};
    # later cycles start from it (one training process: for a day, then the configured size is tried again).
    micro_batch: dict[str, int] | None = None
    # The promotion gate: the run whose adapter is `latest`, how many candidates were rejected, and each
    # adapter's lineage (parent, rows consumed, holdout losses, promoted or rejected and why; newest last).
    adapter_in_use: int | None = None
    rejected_runs: int = 0
    total_replay_samples: int = 0
    # Optimizer steps and real tokens trained over the daemon's lifetime (W&B's `lifetime/step` axis).
    total_steps: int = 0
    total_tokens_trained: int = 0
    lineage: list[dict[str, Any]] = field(default_factory=list)
    # Per language, the best holdout loss any adapter in service reached, on which holdout, by which run
    # (0: the base model): the promotion gate's anchor against compounding tolerances (promotion.py).
    holdout_best: dict[str, list] = field(default_factory=dict)

    def gap_ranges(self) -> list[tuple[int, int]]:
        return [(int(first), int(last)) for first, last, _ in self.pending_gaps]

    @property
    def uptime_hours(self) -> float:
        return self.uptime_seconds / 3600.0


def load_state(path: Path) -> TrainerState:
    """The state, or a fresh one where there is no file yet. A file that is there but unusable (written by
    hand) raises StateError naming the problem: guessing would retrain or skip rows. (An OSError is left as it
    is: `status` says who may read the file, `doctor` that it cannot be read.)"""
    if not path.exists():
        return TrainerState()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError (an OSError is left to the caller)
        raise StateError(state_problem(path, f"it is not JSON ({str(error).splitlines()[0] if str(error) else type(error).__name__})")) from None
    if not isinstance(raw, dict):
        raise StateError(state_problem(path, f"it holds a JSON {type(raw).__name__}, not an object"))
    if isinstance(raw.get("pending_gaps"), dict):  # the format before ranges: {"id": first seen}
        raw["pending_gaps"] = [[int(gap), int(gap), seen] for gap, seen in raw["pending_gaps"].items()]
    values = {key: value for key, value in raw.items() if key in TrainerState.__dataclass_fields__}
    try:
        _state_file_schema().model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise StateError(state_problem(path, f"{where} is {json.dumps(first['input'])[:40]}: "
                                             f"{first['msg'][0].lower()}{first['msg'][1:]}")) from None
    state = TrainerState(**values)
    state.pending_gaps = _below_watermark(state.pending_gaps, state.last_trained_id)
    return state


def _below_watermark(gaps: list[list[float]], watermark: int) -> list[list[float]]:
    """Pending ranges lie below the watermark. One set back by hand (a database restored from an older backup:
    README, Troubleshooting) leaves ranges above it, whose rows the next cycle reads as new: read through the
    ranges as well, they would train twice."""
    return [[first, min(last, watermark), seen] for first, last, seen in gaps if first <= watermark]


@functools.cache
def _state_file_schema() -> type[BaseModel]:
    """TrainerState's fields as a strict pydantic model: no "1200" for a number, no true for a count."""
    return create_model("StateFile", __config__=ConfigDict(strict=True),
                        **{name: (hint, None) for name, hint in typing.get_type_hints(TrainerState).items()})


def state_problem(path: Path, what: str) -> str:
    return (f"the state file {path} cannot be used: {what}. It holds the watermark and the adapter in service: "
            "fix it by hand, or restore it from a backup (moving it aside trains every row again)")


def in_service_adapter(state: TrainerState) -> Path | None:
    """The adapter the next run continues from, where it is still on disk."""
    return Path(state.latest_adapter) if state.latest_adapter and Path(state.latest_adapter).exists() else None


def save_state(state: TrainerState, path: Path) -> None:
    write_json_atomically(asdict(state), path, before_replace=lambda: crash_point("state"))


def write_json_atomically(value: Any, path: Path, before_replace: Callable[[], None] | None = None,
                          durable: bool = True) -> None:
    """Replace `path` whole. `durable=False` skips the fsyncs: for status files rewritten every few seconds,
    where a crash may lose the latest version but must never leave a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # Owner and group (`codelupe` under systemd) may read it: `status` works for the group; it holds no secret.
    os.fchmod(descriptor, 0o640)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def account_uptime(state: TrainerState, process_started: float, now: float) -> None:
    """Add the time this process has been up since the later of its start and the last accounting."""
    since = max(state.uptime_accounted_at or 0.0, process_started)
    state.uptime_seconds += max(0.0, now - since)
    state.uptime_accounted_at = now


def record_failure(path: Path, error: BaseException | str, process_started: float | None = None,
                   micro_batch: dict[str, int] | None = None) -> TrainerState:
    """A failed cycle changes nothing but the failure counters, the last error and the uptime (and, after an
    out-of-memory on several ranks, the micro-batch the next cycle starts from)."""
    state = load_state(path)
    if micro_batch is not None:
        state.micro_batch = micro_batch
    state.consecutive_failures += 1
    state.total_failures += 1
    state.last_error = str(error)[:500]
    state.last_error_at = time.time()
    if process_started is not None:
        account_uptime(state, process_started, state.last_error_at)
    save_state(state, path)
    return state


# ---------------------------------------------------------------- pure transitions


LINEAGE_KEPT = 1000  # entries; older adapters' folders are long pruned by then


def advance_state(state: TrainerState, fetched: FetchResult, samples_trained: int, adapter_path: Path | None,
                  summary: dict[str, Any] | None, process_started: float | None = None,
                  samples_held_out: int = 0, lineage_entry: dict[str, Any] | None = None,
                  replay_samples: int = 0, steps: int = 0, tokens: int = 0) -> TrainerState:
    """The state after a successful cycle: a pure function of the old state and what the cycle consumed.
    `process_started`: when the trainer process began, for the uptime (None: no uptime added).
    A run whose adapter the gate rejected (`lineage_entry["promoted"]` false) consumed its rows and trained
    on them, but `latest_adapter` stays on the adapter in use."""
    now = time.time()
    gaps = remove_ids(state.pending_gaps, sorted(set(fetched.filled_gaps)))
    if fetched.give_up_seen_before is not None:
        gaps = give_up_gaps(gaps, fetched.give_up_seen_before, fetched.last_examined_id)
    gaps += [[first, last, now] for first, last in fetched.new_gaps]
    new_state = TrainerState(**asdict(state))
    new_state.pending_gaps = gaps
    new_state.last_trained_id = max(state.last_trained_id, fetched.last_examined_id)
    if fetched.watermark_rows is not None:
        new_state.watermark_rows = fetched.watermark_rows
    if process_started is not None:
        account_uptime(new_state, process_started, now)
    new_state.total_samples_held_out += samples_held_out
    if adapter_path is not None:
        new_state.total_training_runs += 1
        new_state.total_samples_trained += samples_trained
        new_state.total_replay_samples += replay_samples
        new_state.total_steps += steps
        new_state.total_tokens_trained += tokens
        new_state.last_run = summary
        if lineage_entry is None or lineage_entry.get("promoted", True):
            new_state.latest_adapter = str(adapter_path)
            new_state.adapter_in_use = new_state.total_training_runs
        else:
            new_state.rejected_runs += 1
        if lineage_entry is not None:
            new_state.lineage = [*state.lineage, lineage_entry][-LINEAGE_KEPT:]
    new_state.consecutive_failures = 0
    return new_state


def with_hand_off(state: TrainerState, run_number: int, outcome: str) -> TrainerState:
    """The state (changed in place, and returned) with the outcome of run `run_number`'s hand-off (on_promote)
    in its newest lineage entry (a promotion, or a rollback to it) and in `last_run` when that is the run: an
    entry without one has a hand-off still to run (cycle.catch_up_hand_off)."""
    for entry in reversed(state.lineage):
        if entry.get("run") == run_number:
            entry["on_promote"] = outcome
            break
    if state.last_run and state.last_run.get("run_number") == run_number:
        state.last_run["on_promote"] = outcome
    return state


def remove_ids(gaps: list[list[float]], ids: list[int]) -> list[list[float]]:
    """The gap ranges without the ids that have been read (a range is split around them)."""
    remaining = []
    for first, last, seen in gaps:
        start = int(first)
        for row_id in ids:
            if start <= row_id <= last:
                if row_id > start:
                    remaining.append([start, row_id - 1, seen])
                start = row_id + 1
        if start <= last:
            remaining.append([start, int(last), seen])
    return remaining


def give_up_gaps(gaps: list[list[float]], seen_before: float, read_through: int) -> list[list[float]]:
    """The gap ranges without those watched longer than the commit-lag window (first seen before `seen_before`)
    that the fetch has just read through (up to `read_through`): a rolled-back insert never fills its ids, and a
    row never scored stops being waited for. A range is given up only after a read that came after its window
    ran out, never before one: rows that committed (or were scored) while no cycle read, because the daemon was
    stopped or one cycle trained for longer than the window, are trained first. A range a step budget left
    unread stays for the next cycle."""
    return [gap for gap in gaps if gap[2] >= seen_before or gap[1] > read_through]
