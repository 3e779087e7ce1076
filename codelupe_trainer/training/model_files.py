"""Where the base model lives (a local directory or a hub id), checked without importing torch."""

from __future__ import annotations

from pathlib import Path


def check_model_path(base_model: str) -> tuple[str, bool, str]:
    path = Path(base_model)
    looks_local = base_model.startswith((".", "/", "~")) or path.exists()
    if looks_local:
        if (path.expanduser() / "config.json").exists():
            return ("model", True, f"local model at {path}")
        return ("model", False, f"model.base_model {base_model!r} is not a directory with a config.json")
    return ("model", True, f"hub id {base_model!r} (downloaded or read from the Hugging Face cache on first use)")
