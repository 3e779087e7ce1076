"""Disk space: whether a run has room to be saved, checked before it trains, and a full disk said as such.

A cycle on the 7B trains for many minutes and writes everything at the end: the adapter (its LoRA weights in
fp32, ~160 MB at r = 16 on all seven projections), the W&B run, the state. On a full disk it used to train,
fail at the save with a library's error (`SafetensorError: ... os error 28`) and a traceback file, fail to
record the failure in the state (so no alert and `status` said all was well), and then train again at the
next retry. Now a cycle that cannot be saved fails before it loads the model, in one line that names the
directory, its free space and what the run needs; a disk that fills up during the run is said the same way.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..config import Settings
from .flops import projection_shapes
from .model_files import base_model_config

MB = 1024 * 1024
# The state, metrics.jsonl, the W&B run folder and the duplicate store grow by far less than this per run
# (split between two disks when the state and the adapters are on different ones).
MARGIN_BYTES = 64 * MB
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")


def adapter_bytes(settings: Settings) -> int:
    """The saved adapter's size: its LoRA weights in fp32 (0 when the base model's config.json is not here yet)."""
    config = base_model_config(settings.model.base_model)
    if not config:
        return 0
    shapes = projection_shapes(config)
    per_layer = sum(settings.model.lora_r * (inputs + outputs) for name, (inputs, outputs) in shapes.items()
                    if name in settings.model.target_modules)
    return 4 * config["num_hidden_layers"] * per_layer


def free_bytes(path: Path) -> int:
    """Free space for this user on the file system that holds `path` (or its nearest existing parent)."""
    stats = os.statvfs(nearest_existing(path))
    return stats.f_bavail * stats.f_frsize


def space_needed(settings: Settings) -> dict[Path, int]:
    """Bytes a run writes, by directory: the adapter under output_dir, the rest beside the state."""
    state_dir = settings.paths.state_file.parent
    if os.stat(nearest_existing(state_dir)).st_dev == os.stat(nearest_existing(settings.paths.output_dir)).st_dev:
        return {settings.paths.output_dir: adapter_bytes(settings) + MARGIN_BYTES}
    return {settings.paths.output_dir: adapter_bytes(settings) + MARGIN_BYTES // 2, state_dir: MARGIN_BYTES // 2}


def space_problem(settings: Settings) -> str | None:
    """Why this run could not be saved, or None."""
    for directory, needed in space_needed(settings).items():
        free = free_bytes(directory)
        if free < needed:
            return (f"not enough disk space under {directory}: {free / MB:,.0f} MB free, and a run writes up to "
                    f"{needed / MB:,.0f} MB there (the adapter, the state, the metrics, the W&B run); free space "
                    f"(paths.keep_adapters keeps fewer adapters) or point paths.* at a larger disk")
    return None


def is_disk_full(error: BaseException | None) -> bool:
    """A write that failed for want of space, however the library wrapped it (safetensors' SafetensorError
    carries only the OS's text)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
            return True
        if any(text in str(error).lower() for text in _FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


def describe_disk_full(settings: Settings) -> str:
    places = {settings.paths.output_dir, settings.paths.state_file.parent}
    if not Path(settings.model.base_model).expanduser().is_dir():  # a hub model: its download may be what filled it
        from huggingface_hub import constants

        places.add(Path(constants.HF_HUB_CACHE))
    places = sorted(places)
    free = ", ".join(f"{place} {free_bytes(place) / MB:,.0f} MB free" for place in places)
    return (f"a disk filled up during this run (free now: {free}): nothing was saved or advanced; free space, "
            "and the next cycle trains these rows")


def nearest_existing(path: Path) -> Path:
    """The path, or its nearest parent that exists (a directory the first run will create)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
