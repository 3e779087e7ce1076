"""Keeps the disk bounded: old adapters and old W&B offline run folders are removed.

Never removed: the adapter `latest` points to and the one the state names (they are the same after a
successful run, but not after a crash between publishing an adapter and writing the state).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path


def prune_adapters(output_dir: Path, keep: int, protected: list[Path]) -> list[Path]:
    """Remove run-* folders beyond the newest `keep`, and staging leftovers of crashed saves."""
    if not output_dir.exists():
        return []
    keep_paths = {path.resolve() for path in protected if path.exists()}
    latest = output_dir / "latest"
    if latest.exists():
        keep_paths.add(latest.resolve())
    runs = sorted(path for path in output_dir.glob("run-*") if path.is_dir())
    removed = []
    for path in runs[:-keep] if keep > 0 else runs:
        if path.resolve() not in keep_paths:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for leftover in output_dir.glob(".staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    return removed


def prune_wandb_runs(wandb_root: Path, max_age_days: float, now: float | None = None) -> list[Path]:
    """Remove offline run folders that were synced (`wandb sync` leaves a .synced marker) or are too old."""
    folder = wandb_root / "wandb"
    if not folder.exists():
        return []
    now = time.time() if now is None else now
    removed = []
    for run_dir in folder.glob("offline-run-*"):
        if not run_dir.is_dir() or run_dir.is_symlink():
            continue
        synced = any(run_dir.glob("*.wandb.synced"))
        too_old = now - run_dir.stat().st_mtime > max_age_days * 86400
        if synced or too_old:
            shutil.rmtree(run_dir, ignore_errors=True)
            removed.append(run_dir)
    return removed
