"""Several training processes: a real 2-rank DDP cycle on the CPU (gloo), through the real CLI."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import insert_stdlib_rows, write_config
from test_daemon import start_daemon, stop_daemon, wait_for
from wandb_reader import find_run_files, read_run

from codelupe_trainer.state import load_state

pytestmark = pytest.mark.slow
TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) [\w.]+: ")
REPO = Path(__file__).resolve().parent.parent


def cli_environment(**extra: str) -> dict[str, str]:
    """This process's environment without our settings, plus `extra`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CODELUPE_")}
    return env | {"PYTHONPATH": str(REPO)} | extra


def run_cli(*arguments: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codelupe_trainer.cli", *arguments], env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_join(config: Path, log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """`codelupe-trainer join --node-rank 1`, its output in `log_path`, once it is waiting for node 0."""
    with open(log_path, "w") as log_file:
        joiner = subprocess.Popen([sys.executable, "-m", "codelupe_trainer.cli", "join", "--node-rank", "1",
                                   "--config", str(config)], stdout=log_file, stderr=subprocess.STDOUT, env=env)
    wait_for_line(log_path, "waiting for node 0's next training")
    return joiner


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_node_config(directory: Path, model: Path, timeout_s: int = 60) -> Path:
    """Two machines of one process each, node 0 on this one's loopback."""
    return write_config(directory, model, (
        "[training]\nbatch_size = 4\ngradient_accumulation_steps = 4\nnum_nodes = 2\n"
        f'rendezvous_endpoint = "127.0.0.1:{free_port()}"\nrendezvous_timeout_s = {timeout_s}\n'))


def start_faulty_node_1(directory: Path, model: Path, fault: str):
    """Two one-process nodes on this box and node 1's `join` running with `fault` injected in its ranks:
    (config, environment for node 0, join log, join process)."""
    config = two_node_config(directory, model)
    env = cli_environment(OMP_NUM_THREADS="1")  # two torch process trees on 2 cores
    join_log = directory / "join.log"
    return config, env, join_log, start_join(config, join_log, env | {"CODELUPE_FAULT": fault})


def wait_for_line(path: Path, text: str, timeout_s: float = 60.0, count: int = 1) -> None:
    """Until `text` is in the file `count` times."""
    import time

    deadline = time.monotonic() + timeout_s
    while path.read_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not in {path.read_text()[-2000:]}"
        time.sleep(0.2)


def test_ranks_average_their_gradients_with_the_chunked_loss_as_with_the_models_own(tiny_model):
    """The chunked loss once called the decoder past DDP's forward, which is what arms DDP's gradient
    averaging: each rank kept its own gradients and the adapter rank 0 saved had learned only its share."""
    import json

    import torch

    completed = subprocess.run([sys.executable, str(Path(__file__).parent / "ddp_gradients.py"), str(tiny_model),
                                str(free_port())], capture_output=True, text=True, timeout=300,
                               env=cli_environment(OMP_NUM_THREADS="1"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    gathered = {loss: [torch.tensor(values) for values in per_rank]
                for loss, per_rank in json.loads(completed.stdout.strip().splitlines()[-1]).items()}
    for loss, (rank_0, rank_1) in gathered.items():
        assert rank_0.abs().sum() > 0
        assert torch.equal(rank_0, rank_1), f"{loss}: the ranks' gradients differ, they were not averaged"
    assert torch.allclose(gathered["chunked"][0], gathered["standard"][0], rtol=1e-4, atol=1e-7)


def test_a_two_process_cycle_trains_once_and_reports_once(crawler_table, tiny_model, tmp_path):
    """Rank 1 is killed as it tears its process group down, after it trained (gloo has aborted a rank at exit
    when its peer closed first): the cycle that trained is published all the same. Its result was once
    reported after the teardown, so a teardown that died failed a whole cycle ("training rank 1 failed")."""
    insert_stdlib_rows(crawler_table, start=0, count=40)
    config = write_config(tmp_path, tiny_model, (
        "[training]\nbatch_size = 4\ngradient_accumulation_steps = 4\nlearning_rate = 5e-3\nlogging_steps = 1\n"
        "gradient_checkpointing = true\nnum_processes = 2\n[metrics]\ngpu_peak_tflops = 1.0\n"))
    completed = run_cli("run-once", "--force", "--config", str(config),
                        env=cli_environment(CODELUPE_DATABASE__URL=crawler_table, CODELUPE_FAULT="rank-teardown:kill"))
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
    # MFU is the group's model FLOPs over both ranks' peaks.
    rows = [row for row in run.history if "performance/mfu_percent" in row]
    assert rows and all(row["performance/mfu_percent"] == pytest.approx(100 * row["performance/model_tflops"] / 2.0)
                        for row in rows)
    # The loss is the global mean token loss, on the scale of the evaluation's: the tiny model is untrained
    # and the adapter starts as the identity, so the first step's loss is the loss before training. (The
    # chunked loss once left out the rank count the stock loss multiplies by: half of it, and half gradients.)
    first_loss = run.values("train/loss")[0][1]
    before = state.last_run["eval_loss_before"]
    assert before and first_loss == pytest.approx(before, rel=0.1), (first_loss, before)


def test_two_nodes_train_each_cycle_together_and_only_node_0_writes(crawler_table, tiny_model, tmp_path):
    """Two machines, stood in for by two process trees on this one, as they run in production: node 0 runs the
    daemon (`run`, each cycle in its own child process), node 1 runs `join` with its own directory and no
    database. In the shipped shape: the promotion gate with a holdout, replay in run 2, gradient accumulation 4
    and checkpointing."""
    import signal

    insert_stdlib_rows(crawler_table, start=0, count=60)
    training = ("[schedule]\ninterval_minutes = 0.05\nmin_new_samples = 10\n"
                "[training]\nbatch_size = 4\ngradient_accumulation_steps = 4\nlearning_rate = 5e-3\nlogging_steps = 1\n"
                f"gradient_checkpointing = true\nnum_processes = 1\nnum_nodes = 2\n"
                f'rendezvous_endpoint = "127.0.0.1:{free_port()}"\nrendezvous_timeout_s = 120\n'
                "[promotion]\nmode = \"gate\"\nholdout_samples = 12\nholdout_min_per_language = 6\n"
                "replay_fraction = 0.5\n")
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir(), node1.mkdir()
    config0, config1 = write_config(node0, tiny_model, training), write_config(node1, tiny_model, training)
    # Two torch process trees on this box's 2 cores: one thread each, or they slow each other ~10x.
    env = cli_environment(OMP_NUM_THREADS="1")
    join_log, daemon_log = tmp_path / "join.log", tmp_path / "daemon.log"
    # Node 1 has no database at all (a closed port): it must not need one.
    joiner = start_join(config1, join_log, env | {"CODELUPE_DATABASE__URL": "postgresql://nobody@127.0.0.1:9/none"})
    daemon = start_daemon(config0, env | {"CODELUPE_DATABASE__URL": crawler_table}, daemon_log)
    try:
        runs_done = lambda: load_state(node0 / "state.json").total_training_runs  # noqa: E731
        wait_for(lambda: runs_done() == 1, 240, "run 1 on two nodes", daemon, daemon_log)
        wait_for_line(join_log, "node 1: run 1 trained")
        insert_stdlib_rows(crawler_table, start=60, count=40)
        wait_for(lambda: runs_done() == 2, 240, "run 2 on two nodes", daemon, daemon_log)
        wait_for_line(join_log, "node 1: run 2 trained")
        assert stop_daemon(daemon, daemon_log) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        joiner.send_signal(signal.SIGTERM)
        code = joiner.wait(timeout=30)
    daemon_text = daemon_log.read_text()
    assert daemon_text.count("training on 2 processes (2 node(s) x 1, gloo)") == 2
    assert all(TIMESTAMPED.match(line) for line in daemon_text.splitlines()), daemon_text[-3000:]
    log_text = join_log.read_text()
    assert code == 0, log_text[-3000:]
    # Quiet and in one format: no traceback, no library warning, no C++ store chatter.
    assert all(TIMESTAMPED.match(line) for line in log_text.splitlines()), log_text[-3000:]
    # Run 2 continued from run 1's adapter on both nodes: node 1 received its files over the group.
    assert "rank 1: continuing from the previous adapter (" in log_text
    assert list(node1.iterdir()) == [config1]  # node 1 wrote nothing: no adapter, state, store or W&B run

    state = load_state(node0 / "state.json")
    assert state.total_training_runs == 2 and state.lineage[-1]["parent"] == 1
    assert state.total_replay_samples > 0
    runs = find_run_files(node0)
    assert len(runs) == 2  # one W&B run per cycle, from node 0 only
    run = read_run(sorted(runs)[-1])
    blocks = run.values("dataset/train_blocks")[0][1]
    two_ranks = math.ceil(math.ceil(math.ceil(blocks / 2) / 4) / 4)
    assert state.last_run["steps"] == two_ranks < math.ceil(math.ceil(blocks / 4) / 4)
    assert run.values("holdout/loss")  # the gate's evaluation ran on node 0


def test_a_node_that_never_joins_fails_the_cycle_in_one_line_and_trains_nothing(crawler_table, tiny_model,
                                                                                    tmp_path):
    insert_stdlib_rows(crawler_table, start=0, count=20)
    config = two_node_config(tmp_path, tiny_model, timeout_s=5)
    completed = run_cli("run-once", "--force", "--config", str(config),
                        env=cli_environment(CODELUPE_DATABASE__URL=crawler_table))
    assert completed.returncode == 1
    errors = [line for line in completed.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "node 1 did not join the training within 5 s" in errors[0], completed.stderr[-2000:]
    assert "`codelupe-trainer join --node-rank 1`" in errors[0]
    assert "Traceback" not in completed.stderr
    state = load_state(tmp_path / "state.json")
    assert state.last_trained_id == 0 and state.total_training_runs == 0 and state.total_failures == 1


def test_a_rank_that_fails_on_another_node_fails_the_cycle_with_its_reason(crawler_table, tiny_model, tmp_path):
    """Node 1's rank fails after the group formed (here: an injected error where the base model loads, as a
    missing model on that machine would): node 0's cycle fails with that rank's reason, trains nothing, and
    node 1's `join` survives to serve the next cycle."""
    import signal

    insert_stdlib_rows(crawler_table, start=0, count=20)
    config, env, join_log, joiner = start_faulty_node_1(tmp_path, tiny_model, "load:error")
    try:
        completed = run_cli("run-once", "--force", "--config", str(config),
                            env=env | {"CODELUPE_DATABASE__URL": crawler_table})
        wait_for_line(join_log, "node 1: run 1 failed here")
        assert joiner.poll() is None  # still serving
    finally:
        joiner.send_signal(signal.SIGTERM)
        joiner.wait(timeout=30)
    assert completed.returncode == 1
    errors = [line for line in completed.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, completed.stderr[-3000:]
    assert "training rank 1 (node 1) failed: InjectedFault: injected fault at load" in errors[0]
    state = load_state(tmp_path / "state.json")
    assert state.last_trained_id == 0 and state.total_training_runs == 0 and state.total_failures == 1


def test_ranks_that_end_with_different_adapters_fail_the_cycle_and_train_nothing(crawler_table, tiny_model, tmp_path):
    """Rank 0 saves its own copy and records every rank's rows as trained, so the ranks must end with one
    adapter; ranks that did not (injected: each shifts its weights by its own amount after training, as ranks
    whose gradients were never averaged end) fail the cycle in one line with nothing saved or advanced."""
    insert_stdlib_rows(crawler_table, start=0, count=40)
    config = write_config(tmp_path, tiny_model, "[training]\nbatch_size = 4\ngradient_accumulation_steps = 4\nnum_processes = 2\n")
    completed = run_cli("run-once", "--force", "--config", str(config),
                        env=cli_environment(CODELUPE_DATABASE__URL=crawler_table, CODELUPE_FAULT="diverge"))
    assert completed.returncode == 1
    errors = [line for line in completed.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "the training ranks ended with different adapters" in errors[0], completed.stderr[-3000:]
    state = load_state(tmp_path / "state.json")
    assert state.last_trained_id == 0 and state.total_training_runs == 0
    assert not (tmp_path / "adapters" / "run-000001").exists()


@pytest.mark.parametrize("nodes, rank, model, expected", [
    (1, 1, None, "join needs training.num_nodes > 1"),
    (2, 2, None, "--node-rank must be 1..1"),
    (3, 0, None, "--node-rank must be 1..2"),
    (2, 1, "missing-model", "cannot join: model.base_model"),  # this machine lacks the base model
])
def test_join_with_settings_that_cannot_work_is_one_line_and_exit_2(tmp_path, tiny_model, nodes, rank, model,
                                                                    expected):
    endpoint = 'rendezvous_endpoint = "127.0.0.1:29400"\n' if nodes > 1 else ""
    config = write_config(tmp_path, tmp_path / model if model else tiny_model,
                          f"[training]\nnum_nodes = {nodes}\n{endpoint}")
    completed = run_cli("join", "--node-rank", str(rank), "--config", str(config), env=cli_environment(), timeout=60)
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and expected in completed.stderr, completed.stderr


def test_a_node_whose_cycle_ended_stops_its_stuck_ranks_and_waits_for_the_next(crawler_table, tiny_model, tmp_path):
    """Node 0 dies mid-cycle (SIGKILL, as the daemon's stop timeout does) while node 1's rank is stuck where no
    signal reaches it (a hung CUDA call, or NCCL waiting on a dead peer): `join` sees the cycle's store close,
    kills the rank and is ready for the next cycle, instead of sitting out the collective's timeout."""
    import signal

    import psutil

    insert_stdlib_rows(crawler_table, start=0, count=20)
    config, env, join_log, joiner = start_faulty_node_1(tmp_path, tiny_model, "train:hang")
    try:
        node0 = subprocess.Popen([sys.executable, "-m", "codelupe_trainer.cli", "run-once", "--force", "--config",
                                  str(config)], env=env | {"CODELUPE_DATABASE__URL": crawler_table},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_line(join_log, "codelupe-fault: hanging at train")  # rank 1 is stuck; node 0 waits on it
        ranks = psutil.Process(joiner.pid).children()
        assert len(ranks) == 1
        node0.kill()
        node0.wait()
        wait_for_line(join_log, "node 1: node 0 ended run 1 while this node's ranks still ran; they were stopped")
        assert not ranks[0].is_running() or ranks[0].status() == psutil.STATUS_ZOMBIE
        wait_for_line(join_log, "waiting for node 0's next training", timeout_s=10, count=2)  # ready again
        assert joiner.poll() is None
    finally:
        joiner.send_signal(signal.SIGTERM)
        assert joiner.wait(timeout=30) == 0
    state = load_state(tmp_path / "state.json")
    assert state.last_trained_id == 0 and state.total_training_runs == 0


def test_an_out_of_memory_on_several_ranks_trains_the_next_cycle_smaller_instead_of_failing_forever(
        crawler_table, tiny_model, tmp_path):
    """Every rank's forward over more than 2 rows raises CUDA's real OutOfMemoryError (`oom-above:2`, inherited by
    rank 1). The ranks cannot retry within a run, so the cycle fails with nothing trained and leaves micro-batch
    2 in the state; the next cycle trains 2 x 8 (the same effective batch of 16) and every row is trained."""
    insert_stdlib_rows(crawler_table, start=0, count=40)
    config = write_config(tmp_path, tiny_model, (
        "[training]\nbatch_size = 4\ngradient_accumulation_steps = 4\nlearning_rate = 5e-3\nlogging_steps = 1\n"
        "gradient_checkpointing = true\nnum_processes = 2\n"))
    env = cli_environment(CODELUPE_DATABASE__URL=crawler_table, CODELUPE_FAULT="oom-above:2")

    failed = run_cli("run-once", "--force", "--config", str(config), env=env)
    assert failed.returncode == 1
    errors = [line for line in failed.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "CUDA out of memory at micro-batch 4 on several ranks: the next cycle trains with " \
        "micro-batch 2 x accumulation 8 (same effective batch)" in errors[0], failed.stderr[-3000:]
    state = load_state(tmp_path / "state.json")
    assert state.last_trained_id == 0 and state.total_training_runs == 0
    assert {key: value for key, value in state.micro_batch.items() if key != "backed_off_at"} == \
        {"micro": 2, "max_length": 256, "effective": 16}

    trained = run_cli("run-once", "--force", "--config", str(config), env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    state = load_state(tmp_path / "state.json")
    assert state.total_training_runs == 1 and state.consecutive_failures == 0
    assert state.last_trained_id == 40  # every row, in the second cycle
    assert state.last_run["micro_batch"] == 2 and state.micro_batch["micro"] == 2
    run = read_run(find_run_files(tmp_path)[-1])
    assert run.config["hyperparams/effective_gradient_accumulation_steps"] == 8
    blocks = run.values("dataset/train_blocks")[0][1]
    assert state.last_run["steps"] == math.ceil(math.ceil(math.ceil(blocks / 2) / 2) / 8)
