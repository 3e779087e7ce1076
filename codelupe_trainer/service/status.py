"""`codelupe-trainer status`: the persisted state, the daemon's live status and the running cycle's progress."""

from __future__ import annotations

import json
import time

from ..config import Settings
from ..progress import read_cycle_progress, read_live_status
from ..state import load_state
from ..training.backoff import record_applies


def print_status(settings: Settings, as_json: bool) -> int:
    state = load_state(settings.paths.state_file)
    # A state file that is not there reads as a fresh state (zero runs): said as such, since a `status` run
    # without the service's --config looks at another file, and zeros would read as a lost state.
    exists = settings.paths.state_file.exists()
    live = read_live_status(settings.paths.state_file)
    # Failed cycles the state could not take (a full disk), counted by the running daemon.
    unrecorded = int((live or {}).get("unrecorded_failures", 0))
    in_a_row = state.consecutive_failures + unrecorded
    view = {
        "state_file": str(settings.paths.state_file),
        "state_exists": exists,
        "config": settings.config_source(),
        "total_training_runs": state.total_training_runs,
        "last_trained_id": state.last_trained_id,
        "total_samples_trained": state.total_samples_trained,
        "uptime_hours": round(state.uptime_hours, 3),
        "first_started_at": state.first_started_at if exists else None,
        "consecutive_failures": in_a_row,
        "unrecorded_failures": unrecorded,
        "stuck": in_a_row >= settings.service.alert_after_failures,
        "total_failures": state.total_failures,
        "last_error": state.last_error,
        "last_error_at": state.last_error_at,
        "latest_adapter": state.latest_adapter,
        "adapter_in_use": state.adapter_in_use,
        "rejected_runs": state.rejected_runs,
        "holdout_best": {language: {"loss": entry[0], "run": entry[2]} for language, entry in state.holdout_best.items()},
        "last_run": state.last_run,
        "pending_gaps": len(state.pending_gaps),
        "micro_batch": state.micro_batch,
        "live": live,
        "cycle": read_cycle_progress(settings.paths.state_file),
    }
    if as_json:
        print(json.dumps(view, indent=2))
        return 0
    print(f"state file:            {view['state_file']}")
    if not exists:
        print(f"                       not there yet: nothing was trained with this configuration ({view['config']})")
    print(f"training runs:         {state.total_training_runs}")
    print(f"last trained id:       {state.last_trained_id}")
    if state.pending_gaps:  # what the watermark has passed but not given up on
        ids = sum(int(last) - int(first) + 1 for first, last, _ in state.pending_gaps)
        oldest_minutes = (time.time() - min(seen for _, _, seen in state.pending_gaps)) / 60
        print(f"                       {ids:,} id(s) below it still watched (not committed or not scored yet), the "
              f"oldest for {oldest_minutes:.0f} min; given up by the first cycle that reads them after "
              f"database.max_commit_lag_minutes ({settings.database.max_commit_lag_minutes:g})")
    print(f"samples trained:       {state.total_samples_trained}")
    print(f"uptime:                {state.uptime_hours:.2f} h")
    in_use = f" (run {state.adapter_in_use})" if state.adapter_in_use else ""
    print(f"adapter in use:        {state.latest_adapter or '-'}{in_use}")
    if state.lineage:
        print(f"promotion gate:        {state.rejected_runs} of {state.total_training_runs} runs rejected "
              "(`codelupe-trainer adapters` lists them)")
    if state.holdout_best:
        # What promotion.max_drift measures against: run 0 is the base model.
        anchors = ", ".join(f"{language} {entry[0]:.4f} (run {entry[2]})" for language, entry in sorted(state.holdout_best.items()))
        print(f"best holdout loss:     {anchors}")
    remembered = state.micro_batch or {}
    if (record_applies(remembered, settings.training, settings.data.max_length)
            and 0 < remembered.get("micro", 0) < settings.training.batch_size):
        # Throughput a person would otherwise not know was halved: the config still says batch_size.
        since = f" on {time.ctime(remembered['backed_off_at'])}" if remembered.get("backed_off_at") else ""
        retry = ("the configured size is tried again a day after it" if settings.training.world_size == 1
                 else "kept while several processes train")
        print(f"micro-batch:           {remembered['micro']} of training.batch_size {settings.training.batch_size} "
              f"(same effective batch): an out-of-memory{since}; {retry}")
    print(f"failures:              {in_a_row} in a row, {state.total_failures + unrecorded} in all")
    if unrecorded:
        print(f"                       {unrecorded} of them could not be recorded in the state file (a full disk?): "
              "the journal has their errors")
    if in_a_row >= settings.service.alert_after_failures:
        print(f"STUCK:                 {in_a_row} cycles in a row failed at id {state.last_trained_id}; "
              "fix the cause shown below, the next cycle retries")
    if state.last_error:
        print(f"last error:            {time.ctime(state.last_error_at or 0)}: {state.last_error}")
    if state.last_run:
        last = state.last_run
        eval_loss = last.get("eval_loss")
        print(f"last run:              run {last.get('run_number')}, {last.get('samples_trained')} samples, "
              f"eval loss {'-' if eval_loss is None else f'{eval_loss:.4f}'}")
        if "promoted" in last and settings.promotion.mode == "gate":
            verdict = "promoted" if last["promoted"] else "rejected, the adapter in use stays"
            print(f"                       {verdict}: {last.get('promotion_reason')}")
    live, cycle = view["live"], view["cycle"]
    if live:
        print(f"daemon:                {live.get('phase')} (pid {live.get('pid')}), next run {live.get('next_run') or '-'}")
        if live.get("config_changed"):
            print("                       its config file changed since it read it: `systemctl reload codelupe-trainer` "
                  "(or kill -HUP its pid) applies the edit")
        if live.get("needs_restart"):
            print(f"                       {', '.join(live['needs_restart'])} changed in its config: "
                  "applies at a restart (`systemctl restart codelupe-trainer`)")
    else:
        print("daemon:                not running")
    if cycle:
        details = ", ".join(f"{key} {value}" for key, value in cycle.items() if key not in ("pid", "phase", "updated_at"))
        print(f"running cycle:         {cycle['phase']} ({details})")
    return 0
