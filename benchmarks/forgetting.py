"""Forgetting benchmark: does the adapter in use forget language A while later cycles train language B?

    .venv/bin/python benchmarks/forgetting.py            # a throwaway PostgreSQL, ~5 min on 2 CPU cores

The tiny Qwen2 model (pre-trained for a few seconds on Python and C, so it has something to lose) is
fine-tuned by the real cycle (`run_cycle`, the shipped gradient accumulation 4 and gradient checkpointing):
one cycle on language A (the standard library's Python), then three cycles on language B (this machine's C
headers). Seven variants side by side, each with its own database, state and adapters: replay off/on, the
promotion gate off/on, and its anchor against compounding tolerances (`max_drift`) off/on. For each it
prints A's holdout loss with the adapter in use after the A cycle and after the B cycles, and the change in
percent; plus B's holdout loss at the end and the runs rejected.

All numbers come from the daemon's own holdout (the same rows, evaluated in the same way, every run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = [  # (name, promotion mode, replay fraction, per-language tolerance, max_drift: 10 = no anchor)
    ("no gate, no replay", "always", 0.0, 0.03, 10.0),
    ("no gate, replay 0.5", "always", 0.5, 0.03, 10.0),
    ("no gate, replay 1.0", "always", 1.0, 0.03, 10.0),
    ("gate, no replay", "gate", 0.0, 0.03, 10.0),
    ("gate, replay 0.5", "gate", 0.5, 0.03, 10.0),
    ("gate+anchor, replay 0.5", "gate", 0.5, 0.03, 0.03),
    ("gate 0 %, replay 0.5", "gate", 0.5, 0.0, 10.0),
]


def python_files(count: int, skip: int = 0) -> list[tuple[str, str]]:
    from codelupe_trainer.demo.demo import standard_library_files

    files = []
    for path in standard_library_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if 10 <= text.count("\n") <= 500 and 50 <= len(text) <= 8000:
            files.append((str(path), text))
        if len(files) == skip + count:
            break
    return files[skip:]


def c_files(count: int, skip: int = 0) -> list[tuple[str, str]]:
    files = []
    for path in sorted(Path("/usr/include").rglob("*.h")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if 10 <= text.count("\n") <= 500 and 50 <= len(text) <= 8000 and "GPL" not in text:
            files.append((str(path), text))
        if len(files) == skip + count:
            break
    return files[skip:]


def insert(url: str, files: list[tuple[str, str]], language: str) -> None:
    import hashlib

    import psycopg

    from codelupe_trainer.demo.demo import insert_rows

    rows = [(1, name, name, text, language, text.count("\n") + 1, len(text.encode()),
             hashlib.sha256(f"{language}:{name}:{text}".encode()).hexdigest(), "bench", 70) for name, text in files]
    with psycopg.connect(url, autocommit=True) as connection:
        insert_rows(connection, rows)


def config_text(directory: Path, model_dir: Path, mode: str, replay: float, learning_rate: float, epochs: int,
                language_tolerance: float, max_drift: float) -> str:
    return f"""
[schedule]
min_new_samples = 10
[data]
max_length = 256
max_samples_per_run = 1000
eval_fraction = 0.05
[model]
base_model = "{model_dir}"
quantization = "none"
lora_r = 8
lora_alpha = 16
lora_dropout = 0.0
[training]
batch_size = 4
gradient_accumulation_steps = 4
learning_rate = {learning_rate}
epochs = {epochs}
logging_steps = 5
gradient_checkpointing = true
[metrics]
system_every_steps = 0
gradient_metrics_every_steps = 0
[wandb]
mode = "disabled"
[paths]
state_file = "{directory / 'state.json'}"
output_dir = "{directory / 'adapters'}"
[promotion]
mode = "{mode}"
holdout_samples = 48
holdout_min_per_language = 16
replay_fraction = {replay}
max_language_loss_increase = {language_tolerance}
max_loss_increase = {min(language_tolerance, 0.01)}
max_drift = {max_drift}
"""


def run_variant(name: str, mode: str, replay: float, language_tolerance: float, max_drift: float, admin_url: str,
                model_dir: Path, work: Path, arguments) -> dict:
    import psycopg

    from codelupe_trainer.config import load_settings
    from codelupe_trainer.cycle import run_cycle
    from codelupe_trainer.demo.pgserver import CREATE_PROCESSED_FILES, database_url
    from codelupe_trainer.state import load_state

    database = f"forgetting_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    url = database_url(admin_url, database)
    directory = work / database
    directory.mkdir()
    config = directory / "codelupe.toml"
    config.write_text(config_text(directory, model_dir, mode, replay, arguments.learning_rate, arguments.epochs,
                                  language_tolerance, max_drift))
    os.environ["CODELUPE_DATABASE__URL"] = url
    settings = load_settings(config)
    try:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(CREATE_PROCESSED_FILES)
        insert(url, python_files(arguments.a_rows), "python")
        run_cycle(settings, force=True)
        state = load_state(settings.paths.state_file)
        a_after_a = state.lineage[-1]["holdout_losses"]["python"]
        for cycle in range(arguments.b_cycles):
            insert(url, c_files(arguments.b_rows, skip=cycle * arguments.b_rows), "c")
            run_cycle(settings, force=True)
        state = load_state(settings.paths.state_file)
        in_use = next(entry for entry in state.lineage if entry.get("run") == state.adapter_in_use and "event" not in entry)
        a_final = in_use["holdout_losses"]["python"]
        # The adapter in use as the last run measured it (an adapter from before B existed was measured on
        # B's holdout rows only once they were in the holdout).
        b_final = state.lineage[-1].get("holdout_losses_in_use", {}).get("c") if in_use is not state.lineage[-1] \
            else in_use["holdout_losses"].get("c")
        b_first = next((entry["holdout_losses"]["c"] for entry in state.lineage if "c" in entry.get("holdout_losses", {})), None)
        # Worse than the adapter in use, and promoted anyway: what the gate exists to prevent.
        worse_promoted = sum(1 for entry in state.lineage if entry.get("promoted") and entry.get("holdout_loss_in_use")
                             and entry["holdout_loss"] > entry["holdout_loss_in_use"] * (1 + settings.promotion.max_loss_increase))
        return {"variant": name, "a_after_a": a_after_a, "a_final": a_final,
                "a_change_percent": 100.0 * (a_final - a_after_a) / a_after_a,
                "b_first_measured": b_first, "b_final": b_final, "rejected": state.rejected_runs,
                "adapter_in_use": state.adapter_in_use, "runs": state.total_training_runs,
                "replayed": state.total_replay_samples, "worse_promoted": worse_promoted}
    finally:
        os.environ.pop("CODELUPE_DATABASE__URL", None)
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=os.environ.get("CODELUPE_TEST_DATABASE_URL"))
    parser.add_argument("--a-rows", type=int, default=150)
    parser.add_argument("--b-rows", type=int, default=80)
    parser.add_argument("--b-cycles", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", action="append", help="run only the variants whose name contains this (repeatable)")
    arguments = parser.parse_args()

    import logging

    import torch

    from codelupe_trainer.demo.demo import standard_library_files
    from codelupe_trainer.demo.pgserver import postgres_at
    from codelupe_trainer.demo.tinymodel import build_tiny_model, pretrain_tiny_model

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = Path(tempfile.mkdtemp(prefix="codelupe-forgetting-"))
    try:
        with postgres_at(arguments.url) as url:
            corpus = [path.read_text(encoding="utf-8", errors="replace") for path in standard_library_files(200)]
            model_dir = build_tiny_model(work / "model", corpus + [text for _, text in c_files(100, skip=400)])
            pretrain_tiny_model(model_dir, corpus[:100] + [text for _, text in c_files(60, skip=400)], steps=150)
            results = [run_variant(name, mode, replay, tolerance, drift, url, model_dir, work, arguments)
                       for name, mode, replay, tolerance, drift in VARIANTS
                       if not arguments.only or any(part in name for part in arguments.only)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"A = Python ({arguments.a_rows} files, 1 cycle), then B = C headers ({arguments.b_cycles} cycles x "
          f"{arguments.b_rows} files); lr {arguments.learning_rate}, {arguments.epochs} epochs, LoRA r 8")
    print(f"{'variant':<24} {'A loss after A':>14} {'A loss at end':>14} {'A change':>9} {'B loss at end':>14} "
          f"{'in use':>7} {'rejected':>9} {'replayed':>9}")
    for row in results:
        print(f"{row['variant']:<24} {row['a_after_a']:>14.4f} {row['a_final']:>14.4f} {row['a_change_percent']:>+8.2f}% "
              f"{row['b_final'] if row['b_final'] is not None else float('nan'):>14.4f} {'run ' + str(row['adapter_in_use']):>7} "
              f"{row['rejected']:>9} {row['replayed']:>9}")
    print("adapters promoted although worse than the one in use: "
          + ", ".join(f"{row['variant']}: {row['worse_promoted']}" for row in results))
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
