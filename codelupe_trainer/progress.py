"""Progress files beside the state: the daemon's live status (phase, next run) and the running cycle's
progress (phase, step, ETA), written by those processes and read by `status` and `/health`.

Separate from the state file on purpose: it changes every few seconds and may be lost at any time.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .state import write_json_atomically


def live_status_path(state_file: Path) -> Path:
    return state_file.parent / "daemon-status.json"


def write_live_status(state_file: Path, **fields: Any) -> None:
    write_json_atomically({"pid": os.getpid(), "updated_at": time.time(), **fields}, live_status_path(state_file),
                          durable=False)


def read_live_status(state_file: Path) -> dict[str, Any] | None:
    """The daemon's last report, or None when no daemon is alive to have written it."""
    return _read_if_alive(live_status_path(state_file))


def _read_if_alive(path: Path) -> dict[str, Any] | None:
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(status.get("pid", -1)), 0)
    except (OSError, ValueError):
        return None
    return status


def cycle_progress_path(state_file: Path) -> Path:
    return state_file.parent / "cycle-progress.json"


def write_cycle_progress(state_file: Path, phase: str, **fields: Any) -> None:
    """What the running cycle is doing; written by the cycle's own process, read by `status`."""
    try:
        write_json_atomically({"pid": os.getpid(), "phase": phase, "updated_at": time.time(), **fields},
                              cycle_progress_path(state_file), durable=False)
    except OSError:
        pass  # progress is a courtesy; a full disk must not fail the cycle here


def read_cycle_progress(state_file: Path) -> dict[str, Any] | None:
    return _read_if_alive(cycle_progress_path(state_file))
