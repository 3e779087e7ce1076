"""Several training processes: a real 2-rank DDP cycle on the CPU (gloo), through the real CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import insert_stdlib_rows, write_config
from wandb_reader import find_run_files, read_run

from codelupe_trainer.state import load_state

pytestmark = pytest.mark.slow


def test_a_two_process_cycle_trains_once_and_reports_once(crawler_table, tiny_model, tmp_path):
    insert_stdlib_rows(crawler_table, start=0, count=40)
    config = write_config(tmp_path, tiny_model, (
        "[training]\nbatch_size = 4\ngradient_accumulation_steps = 4\nlearning_rate = 5e-3\nlogging_steps = 1\n"
        "gradient_checkpointing = true\nnum_processes = 2\n"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("CODELUPE_")}
    env.update(CODELUPE_DATABASE__URL=crawler_table, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    completed = subprocess.run([sys.executable, "-m", "codelupe_trainer.cli", "run-once", "--force", "--config",
                                str(config)], env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "training on 2 processes" in completed.stderr

    state = load_state(tmp_path / "state.json")
    assert state.total_training_runs == 1 and state.last_trained_id > 0
    assert (tmp_path / "adapters" / "run-000001" / "adapter_model.safetensors").exists()
    runs = find_run_files(tmp_path)
    assert len(runs) == 1  # only rank 0 talks to W&B
    run = read_run(runs[0])
    blocks = run.values("dataset/train_blocks")[0][1]
    # Each rank takes half the blocks: the global step count is that of one rank's share.
    two_ranks = math.ceil(math.ceil(math.ceil(blocks / 2) / 4) / 4)
    assert two_ranks < math.ceil(math.ceil(blocks / 4) / 4)  # the data really was split
    assert state.last_run["steps"] == two_ranks == run.values("progress/step")[-1][1]
    # Tokens per step count both ranks' micro-batches: 2 x 4 x 4 blocks of at most 256 tokens.
    tokens_per_step = [value for _, value in run.values("performance/tokens_per_step")]
    assert max(tokens_per_step) > 4 * 4 * 256
