"""Stops in every phase, a stalled cycle, a locked table: real processes, real signals, real PostgreSQL.

Each stop is paused at a phase by fault injection (`CODELUPE_FAULT=<phase>:pause`, which waits in Python the
way a long fetch, model load or evaluation does), then signalled.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from conftest import insert_stdlib_rows, write_config
from test_daemon import CLI, environment, start_daemon, stop_daemon, wait_for

from codelupe_trainer.state import load_state

pytestmark = pytest.mark.slow

# Long enough that the evaluation and the training both take a while; accumulation 4 and checkpointing as shipped.
SHAPE = "[data]\nmax_length = 256\nmax_samples_per_run = 400\neval_fraction = 0.3\nmin_quality = 70\n"


def start_paused(command: list[str], env: dict, phase: str, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, env={**env, "CODELUPE_FAULT": f"{phase}:pause"}, stdout=subprocess.DEVNULL,
                               stderr=log.open("w"), start_new_session=True)
    wait_for(lambda: f"paused at {phase}" in log.read_text(), 120, f"the cycle to reach {phase}", process, log)
    return process


def finish_records(tmp_path: Path) -> list[dict]:
    path = tmp_path / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"finish"' in line]


@pytest.mark.parametrize(("phase", "signal_number"), [
    ("fetch", signal.SIGTERM), ("load", signal.SIGTERM), ("train", signal.SIGTERM), ("eval", signal.SIGTERM),
    ("eval", signal.SIGINT),  # one handler serves both signals: SIGINT once, in the longest phase
])
def test_run_once_stops_in_any_phase_within_seconds(phase, signal_number, crawler_table, tiny_model, tmp_path):
    insert_stdlib_rows(crawler_table, start=0, count=40)
    config = write_config(tmp_path, tiny_model, SHAPE)
    log = tmp_path / "run-once.log"
    process = start_paused(CLI + ["run-once", "--config", str(config), "--force"], environment(crawler_table), phase, log)
    signalled = time.monotonic()
    process.send_signal(signal_number)
    assert process.wait(timeout=30) == 0, log.read_text()
    assert time.monotonic() - signalled < 30
    output = log.read_text()
    assert f"stopped on {signal.Signals(signal_number).name}" in output and "nothing was saved" in output
    assert "Traceback" not in output
    assert not (tmp_path / "state.json").exists() or load_state(tmp_path / "state.json").last_trained_id == 0
    assert not list((tmp_path / "adapters").glob("run-*")) if (tmp_path / "adapters").exists() else True
    if phase in ("load", "train", "eval"):  # the W&B run was open: it is closed as not successful
        assert finish_records(tmp_path) and finish_records(tmp_path)[-1]["exit_code"] != 0


# The cycle's own stop in each phase is proved through run-once above (the daemon's cycle is the same code
# with the same handler); here, the daemon passing the stop on, in the slowest phase to start and mid-training.
@pytest.mark.parametrize("phase", ["load", "train"])
def test_the_daemon_stops_in_any_phase_within_seconds(phase, crawler_table, tiny_model, tmp_path):
    insert_stdlib_rows(crawler_table, start=0, count=40)
    config = write_config(tmp_path, tiny_model, SHAPE + "[schedule]\ninterval_minutes = 60\nmin_new_samples = 1\n")
    log = tmp_path / "daemon.log"
    daemon = start_paused(CLI + ["run", "--config", str(config)], environment(crawler_table), phase, log)
    try:
        signalled = time.monotonic()
        assert stop_daemon(daemon, log, timeout=30) == 0
        assert time.monotonic() - signalled < 30
    finally:
        if daemon.poll() is None:
            daemon.kill()
    state = load_state(tmp_path / "state.json")
    assert state.last_trained_id == 0 and state.total_training_runs == 0 and state.consecutive_failures == 0
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_during_the_start_up_checks_is_one_line_and_exit_0(signal_number, crawler_table, tiny_model, tmp_path):
    """`systemctl stop` or Ctrl-C while `run` checks its settings, the table and the GPU (torch's import and
    CUDA's start take seconds on the GPU box) ends as a stop anywhere else does: one line, exit 0, nothing written
    (it was a silent death by SIGTERM, and Ctrl-C said `interrupted` with exit 130)."""
    config = write_config(tmp_path, tiny_model, "[schedule]\ninterval_minutes = 60\n")
    log = tmp_path / "daemon.log"
    daemon = start_paused(CLI + ["run", "--config", str(config)], environment(crawler_table), "startup", log)
    try:
        daemon.send_signal(signal_number)
        assert daemon.wait(timeout=30) == 0, log.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
    output = log.read_text()
    assert f"daemon stopped on {signal.Signals(signal_number).name} before its first cycle" in output
    assert "Traceback" not in output and "interrupted" not in output
    assert not (tmp_path / "state.json").exists()


def test_ctrl_c_on_the_terminal_while_a_cycle_process_starts_stops_the_daemon_without_a_traceback(
        crawler_table, tiny_model, tmp_path):
    """A terminal's Ctrl-C goes to the whole process group: the daemon run by hand and its cycle process. A
    cycle process still importing (its first second, at every cycle) died of it with a KeyboardInterrupt
    traceback in the output. It now starts with SIGINT ignored until its stop handler is in place; the daemon
    passes the stop on (here the cycle process is held at that point, and the group gets SIGINT)."""
    insert_stdlib_rows(crawler_table, start=0, count=5)
    config = write_config(tmp_path, tiny_model, "[schedule]\ninterval_minutes = 60\n")
    log = tmp_path / "daemon.log"
    daemon = start_paused(CLI + ["run", "--config", str(config)], environment(crawler_table), "cycle-start", log)
    try:
        os.killpg(daemon.pid, signal.SIGINT)  # as the terminal does
        assert daemon.wait(timeout=30) == 0, log.read_text()
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)
    output = log.read_text()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert "daemon stopped" in output and "cycle failed" not in output
    assert not (tmp_path / "state.json").exists() or load_state(tmp_path / "state.json").total_failures == 0


def test_a_reload_during_the_start_up_checks_is_applied_by_the_daemon_not_its_death(crawler_table, tiny_model,
                                                                                    tmp_path):
    """SIGHUP's default action ends a process: a `systemctl reload` (or `kill -HUP`) during the start-up checks
    killed the daemon. It is now kept and applied once the daemon runs."""
    config = write_config(tmp_path, tiny_model, "[schedule]\ninterval_minutes = 60\nmin_new_samples = 1000\n")
    log, go_on = tmp_path / "daemon.log", tmp_path / "go-on"
    env = environment(crawler_table, CODELUPE_FAULT=f"startup:wait={go_on}")
    daemon = subprocess.Popen(CLI + ["run", "--config", str(config)], env=env, stdout=subprocess.DEVNULL,
                              stderr=log.open("w"), start_new_session=True)
    try:
        wait_for(lambda: "waiting at startup" in log.read_text(), 60, "the start-up checks", daemon, log)
        config.write_text(config.read_text().replace("interval_minutes = 60", "interval_minutes = 30"))
        daemon.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        go_on.touch()
        wait_for(lambda: "config reloaded" in log.read_text(), 60, "the reload", daemon, log)
        assert "schedule.interval_minutes changed" in log.read_text()
        assert stop_daemon(daemon, log, timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert "Traceback" not in log.read_text()


def test_a_stop_while_join_checks_the_machine_is_one_line_and_exit_0(tiny_model, tmp_path):
    config = write_config(tmp_path, tiny_model, "[training]\nnum_nodes = 2\nrendezvous_endpoint = \"127.0.0.1:29400\"\n")
    log = tmp_path / "join.log"
    node = start_paused(CLI + ["join", "--node-rank", "1", "--config", str(config)],
                        environment("postgresql://unused@127.0.0.1:9/none"), "startup", log)
    try:
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=30) == 0, log.read_text()
    finally:
        if node.poll() is None:
            node.kill()
    assert "join stopped on SIGTERM" in log.read_text() and "Traceback" not in log.read_text()


class NotifySocket:
    """A systemd notification socket standing in for systemd: records each message the daemon sends and when."""

    def __init__(self) -> None:
        self.address = f"@codelupe-test-notify-{uuid.uuid4().hex}"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind("\0" + self.address[1:])
        self.socket.settimeout(0.5)
        self.messages: list[tuple[float, str]] = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while not self.closed.is_set():
            try:
                self.messages.append((time.monotonic(), self.socket.recv(4096).decode()))
            except TimeoutError:
                continue

    def close(self) -> None:
        self.closed.set()
        self.thread.join()
        self.socket.close()


def unit_watchdog_seconds() -> float:
    unit = (Path(__file__).resolve().parent.parent / "systemd" / "codelupe-trainer.service").read_text()
    return float(re.search(r"^WatchdogSec=(\d+)$", unit, re.MULTILINE).group(1))


def test_a_hung_cycle_is_detected_ended_and_recorded(crawler_table, tiny_model, tmp_path):
    """The cycle hangs where no signal handler runs (SIGTERM ignored, no progress): the daemon's stall watch
    ends it, records why, and stays up for the next cycle. All the while the daemon keeps systemd's watchdog
    fed (a hung cycle is the stall watch's to end, not a reason to restart the daemon): READY=1 first,
    WATCHDOG=1 far more often than the unit's WatchdogSec, STOPPING=1 last. The daemon's own process never
    loads torch."""
    insert_stdlib_rows(crawler_table, start=0, count=40)
    config = write_config(tmp_path, tiny_model, SHAPE + "[schedule]\ninterval_minutes = 60\nmin_new_samples = 1\n"
                          "[service]\ncycle_stall_minutes = 0.4\n")
    log = tmp_path / "daemon.log"
    notify = NotifySocket()
    env = {**environment(crawler_table), "CODELUPE_FAULT": "train:hang", "NOTIFY_SOCKET": notify.address}
    daemon = start_daemon(config, env, log)
    try:
        wait_for(lambda: "stalled" in (load_state(tmp_path / "state.json").last_error or ""), 150,
                 "the stall to be recorded", daemon, log)
        state = load_state(tmp_path / "state.json")
        assert state.consecutive_failures == 1 and state.last_trained_id == 0
        assert "no progress for" in state.last_error and "in phase '" in state.last_error
        assert daemon.poll() is None  # the daemon carries on
        # The daemon itself never loads torch (its GPU self-check runs in a child): a CUDA context, once made,
        # would hold GPU memory for the daemon's whole life, away from every cycle's training.
        assert "libtorch" not in Path(f"/proc/{daemon.pid}/maps").read_text()

        def daemon_phase():
            status = subprocess.run(CLI + ["status", "--config", str(config), "--json"], env=environment(crawler_table),
                                    capture_output=True, text=True)
            return json.loads(status.stdout)["live"]["phase"] == "idle"

        wait_for(daemon_phase, 30, "the daemon to be idle again", daemon, log)
        assert stop_daemon(daemon, log, timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        notify.close()
    sent = [message for _, message in notify.messages]
    assert sent[0] == "READY=1" and sent[-1] == "STOPPING=1", sent[:3] + sent[-3:]
    pings = [at for at, message in notify.messages if message == "WATCHDOG=1"]
    assert len(pings) >= 20  # the stall alone (0.4 min) spans ~24 of them
    longest_gap = max(later - earlier for earlier, later in zip(pings, pings[1:]))
    assert longest_gap < unit_watchdog_seconds() / 4, longest_gap


def test_a_locked_table_fails_the_cycle_within_the_statement_timeout(crawler_table, tiny_model, tmp_path):
    insert_stdlib_rows(crawler_table, start=0, count=20)
    config = write_config(tmp_path, tiny_model, "[database]\nstatement_timeout_s = 2\n"
                          "[schedule]\ninterval_minutes = 60\nmin_new_samples = 1\n")
    env = environment(crawler_table)
    locker = psycopg.connect(crawler_table)
    locker.execute("LOCK TABLE processed_files IN ACCESS EXCLUSIVE MODE")  # held until rollback
    try:
        started = time.monotonic()
        once = subprocess.run(CLI + ["run-once", "--config", str(config)], env=env, capture_output=True, text=True,
                              timeout=60)
        assert once.returncode == 1
        assert time.monotonic() - started < 30
        assert "ran past database.statement_timeout_s (2 s)" in once.stderr and "locked" in once.stderr
        assert "Traceback" not in once.stderr

        log = tmp_path / "daemon.log"
        daemon = start_daemon(config, env, log)
        try:
            wait_for(lambda: load_state(tmp_path / "state.json").consecutive_failures >= 2, 60,
                     "the daemon's cycle to fail", daemon, log)
            assert "statement_timeout_s" in load_state(tmp_path / "state.json").last_error
            time.sleep(2)
            assert daemon.poll() is None  # carries on, with the next cycle scheduled
            assert stop_daemon(daemon, log, timeout=30) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
    finally:
        locker.rollback()
        locker.close()


def test_a_stop_during_the_hand_off_to_on_promote_lets_it_finish_and_says_what_was_saved(crawler_table, tiny_model,
                                                                                          tmp_path):
    """Once a run is published (adapter, state, store), the `on_promote` hand-off to the inference server is
    part of it: a stop that arrives while the command runs lets it finish (it is bounded by
    promotion.on_promote_timeout_s), and run-once reports the promoted run, not "nothing was saved"."""
    insert_stdlib_rows(crawler_table, start=0, count=40)
    started, finished = tmp_path / "hook-started", tmp_path / "hook-finished"
    hook = f"touch {started}; sleep 4; touch {finished}"
    config = write_config(tmp_path, tiny_model, '[promotion]\nmode = "always"\nholdout_samples = 0\n'
                          f'replay_fraction = 0.0\non_promote = ["sh", "-c", "{hook}"]\n')
    log = tmp_path / "run-once.log"
    process = subprocess.Popen(CLI + ["run-once", "--config", str(config), "--force"], env=environment(crawler_table),
                               stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(started.exists, 180, "the on_promote command to start", process, log)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, log.read_text()
    assert time.monotonic() - signalled < 15
    output = log.read_text()
    assert finished.exists(), output  # the hand-off ran to its end
    assert "nothing was saved" not in output and "Traceback" not in output, output
    assert "on_promote ran for run 1 (promote)" in output
    state = load_state(tmp_path / "state.json")
    assert state.total_training_runs == 1 and state.adapter_in_use == 1 and state.last_trained_id > 0


def test_ctrl_c_during_a_rollbacks_hand_off_lets_it_finish_and_elsewhere_is_one_line(tmp_path, tiny_model):
    """`rollback` by hand: a Ctrl-C while on_promote reloads the server lets it finish (the state already
    names the adapter; a hand-off cut short would leave the server on another one), and no cycle can publish
    and hand off its own adapter meanwhile (the lock is held to the end). Ctrl-C in a command with
    nothing to protect (doctor, waiting on an unreachable hub here) is one line and exit 130, no traceback."""
    from test_adapter_fit import save_lora

    from codelupe_trainer.config import ModelSettings
    from codelupe_trainer.lock import AlreadyRunning, trainer_lock
    from codelupe_trainer.state import TrainerState, save_state

    model = ModelSettings(base_model=str(tiny_model), lora_r=4, lora_alpha=8, lora_dropout=0.0)
    adapter = save_lora(tiny_model, tmp_path / "adapters", model)
    save_state(TrainerState(last_trained_id=5, latest_adapter=None, adapter_in_use=None, total_training_runs=1,
                            lineage=[{"run": 1, "adapter": str(adapter), "promoted": True}]), tmp_path / "state.json")
    started, finished = tmp_path / "hook-started", tmp_path / "hook-finished"
    config = write_config(tmp_path, tiny_model, f'[promotion]\nmode = "always"\nholdout_samples = 0\n'
                          f'on_promote = ["sh", "-c", "touch {started}; sleep 3; touch {finished}"]\n')
    env = {**environment("postgresql://unused"), "PYTHONUNBUFFERED": "1"}
    rollback = subprocess.Popen(CLI + ["rollback", "1", "--config", str(config)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(started.exists, 60, "the on_promote command to start", rollback, None)
    # The hand-off holds the trainer lock, as a cycle's does: no cycle can publish, and hand its own adapter
    # to the server, while this one is still loading the adapter put back.
    with pytest.raises(AlreadyRunning):
        with trainer_lock(tmp_path / "state.json"):
            pass
    rollback.send_signal(signal.SIGINT)
    output = rollback.communicate(timeout=30)[0]
    assert rollback.returncode == 0 and finished.exists(), output
    with trainer_lock(tmp_path / "state.json"):  # and lets it go when the hand-off is done
        pass
    assert "the adapter in use is now run 1" in output and "Traceback" not in output
    assert load_state(tmp_path / "state.json").adapter_in_use == 1

    # A hub id that is not cached, behind a server that takes the connection and never answers: doctor waits
    # on its probe (5 s) while it is interrupted.
    silent_hub = socket.create_server(("127.0.0.1", 0))
    hub_config = write_config(tmp_path, tiny_model, '[model]\nbase_model = "Qwen/Qwen2.5-Coder-7B"\n')
    try:
        doctor = subprocess.Popen(CLI + ["doctor", "--config", str(hub_config)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True,
                                  env={**env, "HF_ENDPOINT": f"http://127.0.0.1:{silent_hub.getsockname()[1]}",
                                       "HF_HUB_CACHE": str(tmp_path / "hub")})
        time.sleep(3)
        doctor.send_signal(signal.SIGINT)
        _, errors = doctor.communicate(timeout=30)
    finally:
        silent_hub.close()
    assert doctor.returncode == 130 and errors.strip().splitlines()[-1] == "codelupe-trainer: interrupted", errors
    assert "Traceback" not in errors
