"""`codelupe-trainer adapters` and `codelupe-trainer rollback RUN`: the adapters' lineage from the state, and
pointing `latest` back at an earlier promoted adapter.

A rollback holds the trainer lock (no cycle runs meanwhile), moves `latest` atomically, then records the
change in the state; the next run continues from the adapter it points at. Then `on_promote` runs, as after
a promotion, so the server that uses the adapter loads it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .. import stop
from ..config import Settings
from ..hooks import run_on_promote
from ..lock import trainer_lock
from ..state import TrainerState, load_state, save_state, with_hand_off
from ..training.adapter_fit import adapter_incomplete, adapter_misfit
from ..training.adapters import point_latest

log = logging.getLogger(__name__)


class RollbackError(Exception):
    """The rollback cannot be done as asked; one line, nothing changed."""


def adapter_rows(state: TrainerState) -> list[dict]:
    rows = []
    for entry in state.lineage:
        if entry.get("event") == "rollback":
            continue
        rows.append({
            "run": entry["run"],
            "in_use": entry["run"] == state.adapter_in_use,
            "promoted": bool(entry.get("promoted")),
            "parent": entry.get("parent"),
            "ids": [entry.get("first_id"), entry.get("last_id")],
            "samples_trained": entry.get("samples_trained"),
            "holdout_loss": entry.get("holdout_loss"),
            "holdout_loss_in_use": entry.get("holdout_loss_in_use"),
            "reason": entry.get("reason"),
            "on_promote": entry.get("on_promote"),
            "on_disk": Path(entry["adapter"]).is_dir(),
            "adapter": entry["adapter"],
        })
    return rows


def print_adapters(settings: Settings, as_json: bool) -> int:
    rows = adapter_rows(load_state(settings.paths.state_file))
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no adapter trained yet")
        return 0
    print(f"{'run':>5}  {'status':<9} {'parent':>6}  {'row ids':<17} {'holdout loss':<17}  reason")

    def loss(value):
        return "-" if value is None else f"{value:.4f}"

    for row in rows:
        status = "IN USE" if row["in_use"] else ("promoted" if row["promoted"] else "rejected")
        if not row["on_disk"]:
            status += "*"
        ids = f"{row['ids'][0]}-{row['ids'][1]}"
        losses = f"{loss(row['holdout_loss_in_use'])} -> {loss(row['holdout_loss'])}"
        print(f"{row['run']:>5}  {status:<9} {row['parent'] or '-':>6}  {ids:<17} {losses:<17}  {row['reason'] or ''}")
    if any(not row["on_disk"] for row in rows):
        print("* pruned from disk (paths.keep_adapters)")
    return 0


def rollback(settings: Settings, run_number: int) -> Path:
    """Point `latest` (and the state) at the adapter of promoted run `run_number`; returns its folder."""
    if not settings.paths.state_file.exists():  # before the lock, which would create the state's directory
        raise RollbackError(f"no state at {settings.paths.state_file}: nothing was trained here "
                            "(is --config the service's file?)")
    with trainer_lock(settings.paths.state_file):
        state = load_state(settings.paths.state_file)
        entry = next((item for item in state.lineage if item.get("run") == run_number and "event" not in item), None)
        if entry is None:
            raise RollbackError(f"run {run_number} is not in the adapters' lineage (`codelupe-trainer adapters` lists them)")
        if not entry.get("promoted"):
            raise RollbackError(f"run {run_number} was rejected by the promotion gate ({entry.get('reason')}); "
                                "only a promoted adapter can be put back in use")
        adapter = Path(entry["adapter"])
        if not adapter.exists():
            raise RollbackError(f"the adapter of run {run_number} is no longer on disk ({adapter}); "
                                "paths.keep_adapters decides how many are kept")
        broken = adapter_incomplete(adapter)
        if broken:
            raise RollbackError(f"the adapter of run {run_number} is incomplete ({adapter}: {broken})")
        misfit = adapter_misfit(adapter, settings.model)
        if misfit:
            raise RollbackError(f"the adapter of run {run_number} was trained with other model settings ({misfit}): "
                                "every run would fail to continue it; set them back first")
        # From `latest` to the hand-off, as one: a Ctrl-C here waits (stop.py), so `latest`, the state and the
        # served adapter never disagree; before it, a Ctrl-C changes nothing. The hand-off runs under the lock,
        # as a cycle's does: a cycle that published meanwhile could otherwise run its own hand-off while this one
        # still runs, and the server could end on the adapter put back while `latest` names the newer one.
        with stop.CURRENT.deferred():
            point_latest(adapter.parent, adapter.name)
            previous = state.adapter_in_use
            state.latest_adapter = str(adapter)
            state.adapter_in_use = run_number
            # A rollback is a person's word on what is good enough: the anchors start again from the adapter
            # put back (the next run measures it), or a run continuing from an older adapter could never come
            # within promotion.max_drift of the best the newer one reached, and every run would be rejected.
            state.holdout_best = {}
            state.lineage.append({"event": "rollback", "run": run_number, "from_run": previous, "at": time.time()})
            save_state(state, settings.paths.state_file)
            log.info("rolled back: the adapter in use is run %d (was run %s)", run_number, previous)
            outcome = run_on_promote(settings.promotion, "rollback", adapter, run_number, entry.get("holdout_loss"))
            if outcome is not None:  # recorded, so the next cycle knows the hand-off ran (cycle.catch_up_hand_off)
                save_state(with_hand_off(state, run_number, outcome), settings.paths.state_file)
    if outcome is not None:
        print(f"on_promote: {outcome}")
    return adapter
