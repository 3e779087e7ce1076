"""Adapters on disk: saved complete before they become visible, `latest` moved atomically, old ones pruned.

Never pruned: the adapter `latest` points to and the one the state names (they are the same after a
successful run, but not after a crash between publishing an adapter and writing the state).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ..errors import TrainingError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
LATEST_LINK = "latest"
CARD = "README.md"
# Readable by the owner and its group (the `codelupe` group under systemd), so an inference server running
# as another user in that group can load `latest`; never world-readable (an adapter can recite its data).
FILE_MODE, FOLDER_MODE = 0o640, 0o750


def adapter_is_finite(model) -> bool:
    import torch  # here, so `rollback` and `adapters` start without loading torch

    return all(torch.isfinite(parameter).all() for parameter in model.parameters() if parameter.requires_grad)


def save_adapter(model, output_dir: Path, run_number: int, promote: bool = True, card: str | None = None) -> Path:
    """Write the adapter to a new folder, complete before it becomes visible, and point `latest` at it
    (unless the promotion gate rejected it: then it is kept for inspection, `latest` stays)."""
    if not adapter_is_finite(model):
        raise TrainingError("adapter weights are NaN or infinite; nothing was saved")
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"run-{run_number:06d}"
    staging = output_dir / f".staging-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        if card is not None:  # ours, instead of peft's template full of "[More Information Needed]"
            (staging / CARD).write_text(card, encoding="utf-8")
        os.chmod(staging, FOLDER_MODE)
        for path in staging.iterdir():
            os.chmod(path, FILE_MODE)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            # A folder from a run that crashed after saving but before the state was written: replace it.
            shutil.rmtree(final)
        os.replace(staging, final)
        if promote:
            point_latest(output_dir, final.name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def point_latest(output_dir: Path, target_name: str) -> None:
    temporary = output_dir / f".{LATEST_LINK}-{uuid.uuid4().hex[:8]}"
    os.symlink(target_name, temporary)
    os.replace(temporary, output_dir / LATEST_LINK)
    descriptor = os.open(output_dir, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
