"""The daemon and its faults, each with real child processes and a real PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from conftest import insert_stdlib_rows, write_config

from codelupe_trainer.demo.demo import create_table, crawler_rows, standard_library_files
from codelupe_trainer.demo.pgserver import start_throwaway_postgres, wait_for_postgres
from codelupe_trainer.progress import read_live_status
from codelupe_trainer.state import load_state

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "codelupe_trainer.cli"]
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.\-]+: ")
# Many epochs keep a cycle training until the test stops it.
LONG_TRAINING = "[training]\nbatch_size = 2\ngradient_accumulation_steps = 2\nlearning_rate = 1e-3\nepochs = 1000\nlogging_steps = 1\ngradient_checkpointing = true\n"


def environment(url: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CODELUPE_", "PYTEST"))}
    env.update(CODELUPE_DATABASE__URL=url, PYTHONPATH=str(Path(__file__).resolve().parent.parent), **extra)
    return env


def eligible_count(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as connection:
        count = connection.execute(
            "SELECT count(*) FROM processed_files WHERE quality_score >= 70 AND char_length(content) BETWEEN 50 AND 8000"
        ).fetchone()[0]
        top = connection.execute("SELECT max(id) FROM processed_files").fetchone()[0]
    return count, top


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    def details() -> str:
        return log.read_text()[-4000:] if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process exited ({process.returncode}) while waiting for {what}:\n{details()}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}:\n{details()}")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stop_daemon(daemon: subprocess.Popen, log: Path, timeout: float = 60) -> int:
    daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["ps", "-ef", "--forest"], check=False)
        raise AssertionError(f"daemon still running {timeout} s after SIGTERM:\n{log.read_text()[-6000:]}") from None


def start_daemon(config: Path, env: dict[str, str], log_file: Path) -> subprocess.Popen:
    return subprocess.Popen(CLI + ["run", "--config", str(config)], env=env, stdout=log_file.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_sigterm_mid_training_changes_nothing_and_the_next_run_trains_those_rows(crawler_table, tiny_model, tmp_path):
    insert_stdlib_rows(crawler_table, start=0, count=60)
    # A 1.2 s interval under a long cycle: APScheduler would note every skipped tick.
    config = write_config(tmp_path, tiny_model, LONG_TRAINING + "[schedule]\ninterval_minutes = 0.02\nmin_new_samples = 10\n")
    env = environment(crawler_table)
    daemon = start_daemon(config, env, tmp_path / "daemon.log")
    try:
        progress = tmp_path / "cycle-progress.json"
        wait_for(lambda: (read_json(progress) or {}).get("step", 0) >= 3, 120, "training to start", daemon, tmp_path / "daemon.log")

        # One trainer at a time: a hand-run cycle is refused while the daemon trains.
        refused = subprocess.run(CLI + ["run-once", "--config", str(config), "--force"], env=env, capture_output=True, text=True)
        assert refused.returncode == 3, refused.stderr
        assert "another codelupe-trainer cycle is running" in refused.stderr

        status = subprocess.run(CLI + ["status", "--config", str(config), "--json"], env=env, capture_output=True, text=True)
        view = json.loads(status.stdout)
        assert view["live"]["phase"] == "training" and view["cycle"]["phase"] == "training"

        stopped_at = time.monotonic()
        assert stop_daemon(daemon, tmp_path / "daemon.log", timeout=90) == 0
        assert time.monotonic() - stopped_at < 60
    finally:
        if daemon.poll() is None:
            daemon.kill()
    log = (tmp_path / "daemon.log").read_text()
    assert "cycle: interrupted: stopped" in log
    # Every line in the project's format (library warnings included), and none of the known noise.
    assert [line for line in log.splitlines() if not LOG_LINE.match(line)] == [], log[-3000:]
    assert "maximum number of running instances" not in log and "gemm_4bit_forward" not in log
    assert "stopping: waiting" not in log
    state = load_state(tmp_path / "state.json")
    assert state.total_training_runs == 0 and state.last_trained_id == 0 and state.total_samples_trained == 0
    finish = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"finish"' in line]
    assert finish[-1]["exit_code"] != 0  # the W&B run was closed as not successful

    env["CODELUPE_TRAINING__EPOCHS"] = "1"
    done = subprocess.run(CLI + ["run-once", "--config", str(config)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    count, top = eligible_count(crawler_table)
    state = load_state(tmp_path / "state.json")
    assert state.total_samples_trained + state.total_samples_held_out == count and state.last_trained_id == top


def test_kill_9_in_any_phase_loses_no_row_and_counts_none_twice(crawler_table, tiny_model, tmp_path):
    """One installation SIGKILLed in every phase in turn (a box that keeps crashing): each kill leaves the
    state and the adapter in use as they were, and the next clean run trains every row exactly once."""
    insert_stdlib_rows(crawler_table, start=0, count=30)
    config = write_config(tmp_path, tiny_model)
    env = environment(crawler_table)
    first = subprocess.run(CLI + ["run-once", "--config", str(config)], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    before = load_state(tmp_path / "state.json")
    in_use = (tmp_path / "adapters" / "latest").resolve()

    insert_stdlib_rows(crawler_table, start=200, count=30, repo="second")
    for phase in ["fetch", "tokenize", "train", "save", "state"]:
        killed = subprocess.run(CLI + ["run-once", "--config", str(config)],
                                env={**env, "CODELUPE_FAULT": f"{phase}:kill"}, capture_output=True, text=True)
        assert killed.returncode == -signal.SIGKILL, (phase, killed.stderr)
        state = load_state(tmp_path / "state.json")  # valid JSON, old or new
        latest = (tmp_path / "adapters" / "latest").resolve()
        if phase in ("fetch", "tokenize", "train"):
            assert latest == in_use, phase  # from "save" on, the new adapter may be published (state not yet)
        assert (latest / "adapter_model.safetensors").exists() and (latest / "adapter_config.json").exists()
        assert state == before, f"killed in {phase}: nothing is written before the new state's rename"
        assert not list((tmp_path / "adapters").glob(".staging-*")), phase

    again = subprocess.run(CLI + ["run-once", "--config", str(config)], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    count, top = eligible_count(crawler_table)
    final = load_state(tmp_path / "state.json")
    assert final.total_samples_trained + final.total_samples_held_out == count
    assert final.last_trained_id == top
    assert final.total_training_runs == 2
    assert Path(final.latest_adapter).resolve() == (tmp_path / "adapters" / "latest").resolve() != in_use


def test_a_tick_while_a_hand_run_cycle_holds_the_lock_is_a_skip_not_a_failure(crawler_table, tiny_model, tmp_path):
    """README's "Train now, by hand" runs `run-once` beside the service: the daemon's ticks meanwhile find the
    trainer lock held. They said `cycle failed (exit 3, ...)` with two warnings each; no cycle ran and nothing
    failed: one line says the tick was skipped, and the daemon takes over once the lock is free."""
    from codelupe_trainer.lock import trainer_lock

    insert_stdlib_rows(crawler_table, start=0, count=5)
    config = write_config(tmp_path, tiny_model, "[schedule]\ninterval_minutes = 0.02\nmin_new_samples = 1000\n")
    log = tmp_path / "daemon.log"
    with trainer_lock(tmp_path / "state.json"):  # the hand-run cycle
        daemon = start_daemon(config, environment(crawler_table), log)
        try:
            wait_for(lambda: log.read_text().count("cycle skipped") >= 2, 120, "two skipped ticks", daemon, log)
        except BaseException:
            daemon.kill()
            raise
    try:
        wait_for(lambda: "cycle: nothing_to_do" in log.read_text(), 60, "a cycle once the lock is free", daemon, log)
        assert stop_daemon(daemon, log) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    output = log.read_text()
    assert "cycle skipped: another codelupe-trainer cycle holds the trainer lock" in output
    assert "failed" not in output and " WARNING " not in output and " ERROR " not in output, output
    assert not (tmp_path / "state.json").exists() or load_state(tmp_path / "state.json").total_failures == 0


# A real full disk for one test: a tmpfs mounted in a mount namespace of its own (root, as in CI, or an
# unprivileged user namespace), so nothing outside the script sees it and it vanishes with the script.
FULL_DISK_SCRIPT = r"""
set -u
mount -t tmpfs -o size=100m tmpfs "$DISK" || exit 97
# 0. A first run with room: an adapter in service.
"$@" run-once > "$OUT/zero.log" 2>&1; echo $? > "$OUT/zero.rc"
cp -r "$DISK/var" "$OUT/zero-var"
psql -q "$CODELUPE_DATABASE__URL" -f "$OUT/more-rows.sql"
# 1. Too little room (40 MB free): the cycle fails before it loads the model, and says so.
dd if=/dev/zero of="$DISK/filler" bs=1M count=60 2>/dev/null
"$@" run-once > "$OUT/first.log" 2>&1; echo $? > "$OUT/first.rc"
"$@" doctor > "$OUT/doctor.log" 2>&1
cp "$DISK/var/state.json" "$OUT/first-state.json"
rm "$DISK/filler"
# 2. Room at the start; the disk fills up while the finished run waits to be written.
CODELUPE_FAULT="publish:wait=$OUT/resume" "$@" run-once > "$OUT/second.log" 2>&1 &
pid=$!
while ! grep -q "waiting at publish" "$OUT/second.log"; do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
dd if=/dev/zero of="$DISK/filler" bs=1M count=200 2>/dev/null
touch "$OUT/resume"
wait $pid; echo $? > "$OUT/second.rc"
cp -r "$DISK/var" "$OUT/second-var"
rm "$DISK/filler"
# 3. Room again: the new rows train, once.
"$@" run-once > "$OUT/third.log" 2>&1; echo $? > "$OUT/third.rc"
cp -r "$DISK/var" "$OUT/third-var"
"""

def namespace_prefix() -> list[str]:
    for prefix in (["unshare", "-m"], ["unshare", "-Urm"]):
        try:
            if subprocess.run(prefix + ["sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True).returncode == 0:
                return prefix
        except FileNotFoundError:
            break
    pytest.skip("no mount namespace here (needs root or unprivileged user namespaces) for a real small disk")


def test_a_disk_too_full_for_the_run_fails_before_training_and_one_that_fills_during_it_is_said_as_such(
        crawler_table, tiny_model, tmp_path):
    prefix = namespace_prefix()
    insert_stdlib_rows(crawler_table, start=0, count=30)
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir(), out.mkdir()
    # The second batch, inserted by the script once the first run is saved.
    rows = list(crawler_rows(standard_library_files(300)))[200:230]
    with psycopg.connect(crawler_table) as connection, psycopg.ClientCursor(connection) as cursor:
        values = [cursor.mogrify("(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", row) for row in rows]
    (out / "more-rows.sql").write_text(
        "INSERT INTO processed_files (job_id, file_path, relative_path, content, language, lines, size, hash, "
        "repo_name, quality_score) VALUES " + ",\n".join(values) + ";\n")
    config = write_config(tmp_path, tiny_model, f'[paths]\nstate_file = "{disk}/var/state.json"\n'
                                                 f'output_dir = "{disk}/var/adapters"\n'
                                                 f'[wandb]\nmode = "offline"\ndir = "{disk}/var"\n')
    env = environment(crawler_table, DISK=str(disk), OUT=str(out), CODELUPE_CONFIG=str(config))
    script = subprocess.run(prefix + ["sh", "-c", FULL_DISK_SCRIPT, "full-disk", *CLI],
                            env=env, capture_output=True, text=True, timeout=600)
    assert script.returncode == 0, script.stdout + script.stderr
    logs = {name: (out / f"{name}.log").read_text() for name in ("zero", "first", "doctor", "second", "third")}
    assert (out / "zero.rc").read_text().strip() == "0", logs["zero"]
    before = load_state(out / "zero-var" / "state.json")
    assert before.total_training_runs == 1

    # 1. Before anything loads: one line naming the directory, its free space and the run's needs; recorded.
    assert (out / "first.rc").read_text().strip() == "1", logs["first"]
    assert "not enough disk space under" in logs["first"] and "MB free" in logs["first"]
    assert "loading" not in logs["first"] and "Traceback" not in logs["first"]
    first = json.loads((out / "first-state.json").read_text())
    assert first["consecutive_failures"] == 1 and "not enough disk space" in first["last_error"]
    assert (first["total_training_runs"], first["last_trained_id"]) == (1, before.last_trained_id)
    assert re.search(r"^FAIL disk: not enough disk space under .*/var/adapters", logs["doctor"], re.MULTILINE), logs["doctor"]

    # 2. Full while writing: said as a full disk (not a library's error with a traceback file), nothing
    # saved or advanced, `latest` still the adapter in service; the state could not take the failure
    # either, and that is said too.
    assert (out / "second.rc").read_text().strip() == "1", logs["second"]
    assert "a disk filled up during this run" in logs["second"], logs["second"]
    assert "could not record this failure" in logs["second"] and "Traceback" not in logs["second"]
    assert not (out / "second-var" / "last-failure.txt").exists()
    second = load_state(out / "second-var" / "state.json")
    assert (second.total_training_runs, second.last_trained_id, second.latest_adapter) == \
        (1, before.last_trained_id, before.latest_adapter)
    adapters = out / "second-var" / "adapters"
    assert sorted(path.name for path in adapters.iterdir()) == ["latest", "run-000001"]
    assert (adapters / "latest").readlink().name == "run-000001"

    # 3. With room again, every row is consumed once.
    assert (out / "third.rc").read_text().strip() == "0", logs["third"]
    third = load_state(out / "third-var" / "state.json")
    count, top = eligible_count(crawler_table)
    assert third.total_training_runs == 2 and third.consecutive_failures == 0 and third.last_trained_id == top
    assert third.total_samples_trained + third.total_samples_held_out == count


# The daemon on a disk with no room left at all, in a mount namespace of its own: no cycle can even record
# its failure. The test outside asks its /health endpoint over the network, which the namespace shares.
DAEMON_ON_A_FULL_DISK = r"""
set -u
mount -t tmpfs -o size=20m tmpfs "$DISK" || exit 97
mkdir -p "$DISK/var"
dd if=/dev/zero of="$DISK/filler" bs=1M count=40 2>/dev/null
"$@" run > "$OUT/daemon.log" 2>&1 &
pid=$!
while [ ! -e "$OUT/stop" ]; do kill -0 $pid 2>/dev/null || break; sleep 0.2; done
kill -TERM $pid; wait $pid; echo $? > "$OUT/daemon.rc"
"""


def test_failures_a_full_disk_keeps_out_of_the_state_still_make_health_say_stuck(crawler_table, tiny_model, tmp_path):
    """A full disk fails every cycle and also the state's record of it: /health said "ok" with 0 failures
    through the outage that most needs a person, and no alert could follow. The daemon counts the failures
    the state did not take: /health turns "stuck" after service.alert_after_failures and says why."""
    import socket
    import urllib.error
    import urllib.request

    prefix = namespace_prefix()
    insert_stdlib_rows(crawler_table, start=0, count=30)
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir(), out.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_config(tmp_path, tiny_model, f'[schedule]\ninterval_minutes = 0.05\nmin_new_samples = 10\n'
                                                f'[paths]\nstate_file = "{disk}/var/state.json"\n'
                                                f'output_dir = "{disk}/var/adapters"\n'
                                                f'[wandb]\nmode = "offline"\ndir = "{disk}/var"\n'
                                                f'[service]\nmetrics_port = {port}\nalert_after_failures = 2\n')
    env = environment(crawler_table, DISK=str(disk), OUT=str(out), CODELUPE_CONFIG=str(config))
    script = subprocess.Popen(prefix + ["sh", "-c", DAEMON_ON_A_FULL_DISK, "full-disk", *CLI], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "daemon.log"

    def health() -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as error:  # 503 once stuck: the document is the body
            return json.loads(error.read())
        except OSError:  # not listening yet
            return None

    try:
        seen = wait_for(lambda: (lambda document: document if document and document["status"] == "stuck" else None)(
            health()), 180, "/health to say stuck", script, log)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            metrics = answer.read().decode()
    finally:
        (out / "stop").touch()
        script.wait(timeout=90)
    text = log.read_text()
    assert (out / "daemon.rc").read_text().strip() == "0", text
    assert seen["consecutive_failures"] >= 2 and seen["unrecorded_failures"] >= 2, seen
    assert "could not be recorded" in seen["last_error"], seen
    gauge = next(line for line in metrics.splitlines() if line.startswith("codelupe_consecutive_failures "))
    assert float(gauge.split()[1]) >= 2, gauge
    assert "could not record this failure" in text, text[-3000:]
    assert text.count("this failure could not be recorded in") == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


@pytest.fixture
def own_server():
    """A server this test may stop and start (never the shared one)."""
    server = start_throwaway_postgres()
    wait_for_postgres(server.url)
    yield server
    server.destroy()


def test_daemon_survives_a_database_outage_and_resumes(own_server, tiny_model, tmp_path):
    with psycopg.connect(own_server.url, autocommit=True) as connection:
        create_table(connection)
    own_server.stop()
    config = write_config(tmp_path, tiny_model, "[schedule]\ninterval_minutes = 0.05\nmin_new_samples = 10\n")
    env = environment(own_server.url)
    daemon = start_daemon(config, env, tmp_path / "daemon.log")
    try:
        state_file = tmp_path / "state.json"
        wait_for(lambda: load_state(state_file).consecutive_failures >= 2, 120, "two failed cycles", daemon, tmp_path / "daemon.log")
        assert "cannot connect" in load_state(state_file).last_error
        assert daemon.poll() is None
        status = subprocess.run(CLI + ["status", "--config", str(config)], env=env, capture_output=True, text=True)
        assert "cannot connect" in status.stdout

        own_server.start()
        insert_stdlib_rows(own_server.url, start=0, count=40)
        wait_for(lambda: load_state(state_file).total_training_runs == 1, 180, "training after the outage", daemon, tmp_path / "daemon.log")
        assert load_state(state_file).consecutive_failures == 0
        assert stop_daemon(daemon, tmp_path / "daemon.log") == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()


def test_a_cycle_that_raises_cuda_oom_leaves_the_daemon_running(crawler_table, tiny_model, tmp_path):
    insert_stdlib_rows(crawler_table, start=0, count=40)
    # Micro-batch 1: the back-off has nowhere to go, so each cycle fails at its first out-of-memory error.
    config = write_config(tmp_path, tiny_model, "[schedule]\ninterval_minutes = 0.05\nmin_new_samples = 10\n"
                          "[training]\nbatch_size = 1\ngradient_accumulation_steps = 4\ngradient_checkpointing = true\n")
    daemon = start_daemon(config, environment(crawler_table, CODELUPE_FAULT="train:oom"), tmp_path / "daemon.log")
    try:
        state_file = tmp_path / "state.json"
        wait_for(lambda: load_state(state_file).consecutive_failures >= 2, 180, "two failed cycles", daemon, tmp_path / "daemon.log")
        state = load_state(state_file)
        # The back-off ends in one clear error, and the daemon lives on to run the next cycle.
        assert "out of GPU memory even at micro-batch 1" in state.last_error
        assert state.last_trained_id == 0 and state.total_training_runs == 0
        assert daemon.poll() is None
        assert stop_daemon(daemon, tmp_path / "daemon.log") == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()


def test_a_cycle_killed_by_sigkill_is_named_as_the_out_of_memory_killer_would_be(crawler_table, tiny_model, tmp_path):
    """A cycle process killed by SIGKILL out of nowhere (what the kernel's OOM killer does when a 7B's load
    outgrows host RAM) is recorded in words that point there, not as "exit code -9"; the daemon lives on."""
    insert_stdlib_rows(crawler_table, start=0, count=40)
    config = write_config(tmp_path, tiny_model, "[schedule]\ninterval_minutes = 60\nmin_new_samples = 10\n")
    daemon = start_daemon(config, environment(crawler_table, CODELUPE_FAULT="load:kill"), tmp_path / "daemon.log")
    try:
        state_file = tmp_path / "state.json"
        wait_for(lambda: load_state(state_file).consecutive_failures >= 1, 180, "the killed cycle", daemon,
                 tmp_path / "daemon.log")
        state = load_state(state_file)
        assert state.last_error.startswith("cycle process was killed by SIGKILL: usually the kernel's out-of-memory "
                                           "killer (host RAM, not GPU memory; `journalctl -k | grep -i oom` says)")
        assert state.last_trained_id == 0 and daemon.poll() is None
        assert stop_daemon(daemon, tmp_path / "daemon.log") == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()


@pytest.mark.parametrize("action, said", [("kill", "cycle process was killed by SIGKILL"),
                                          ("hang", "cycle stalled: no progress for")])
def test_a_cycle_that_dies_on_its_way_out_after_saving_its_state_is_not_a_failure(crawler_table, tiny_model, tmp_path,
                                                                                   action, said):
    """A cycle process killed after the state was saved (rank 0's process-group teardown or a library's exit
    aborting), or hung there until the stall watch ended it (a teardown waiting on a peer that is gone),
    trained and published: counted as a failure, it would make the next cycle wait out a back-off and count
    towards the stuck alert. A kill before the state moved is still one
    (test_a_cycle_killed_by_sigkill_is_named_as_the_out_of_memory_killer_would_be)."""
    insert_stdlib_rows(crawler_table, start=0, count=40)
    stall = "[service]\ncycle_stall_minutes = 0.4\n" if action == "hang" else ""  # the stall watch ends the hang
    config = write_config(tmp_path, tiny_model, "[schedule]\ninterval_minutes = 60\nmin_new_samples = 10\n" + stall)
    log_file = tmp_path / "daemon.log"
    daemon = start_daemon(config, environment(crawler_table, CODELUPE_FAULT=f"teardown:{action}"), log_file)
    try:
        wait_for(lambda: re.search("the cycle counts as done|retrying in", log_file.read_text()), 180, "the cycle's end",
                 daemon, log_file)
        state = load_state(tmp_path / "state.json")
        assert state.total_training_runs == 1 and state.last_trained_id > 0
        assert (state.consecutive_failures, state.total_failures, state.last_error) == (0, 0, None)
        log = log_file.read_text()
        assert said in log and "the cycle counts as done" in log
        assert "cycle failed" not in log and "retrying in" not in log
        assert stop_daemon(daemon, log_file) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()


def test_the_health_endpoint_listens_where_configured_and_a_taken_port_stops_the_start_in_one_line(
        crawler_table, tiny_model, tmp_path):
    """`service.metrics_host` is where /health listens (0.0.0.0: a Prometheus server on another machine can
    scrape it); a port another program holds stops `run` at start with one line and exit 2, never a
    traceback with the first cycle already running."""
    import socket
    import urllib.request

    import psutil

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        config = write_config(tmp_path, tiny_model, f"[schedule]\ninterval_minutes = 60\nmin_new_samples = 1000\n"
                              f"[service]\nmetrics_port = {taken}\n")
        refused = subprocess.run(CLI + ["run", "--config", str(config)], env=environment(crawler_table),
                                 capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"cannot start: service.metrics_port: 127.0.0.1:{taken} cannot be served (Address already in use)" \
        in refused.stderr and "Traceback" not in refused.stderr

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_config(tmp_path, tiny_model, f"[schedule]\ninterval_minutes = 60\nmin_new_samples = 1000\n"
                          f'[service]\nmetrics_port = {port}\nmetrics_host = "0.0.0.0"\n')
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, environment(crawler_table), log)
    try:
        wait_for(lambda: "waiting for 1000" in log.read_text(), 60, "the first cycle", daemon, log)
        listening = {(connection.laddr.ip, connection.laddr.port) for connection in
                     psutil.Process(daemon.pid).net_connections(kind="tcp") if connection.status == psutil.CONN_LISTEN}
        assert ("0.0.0.0", port) in listening
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
            assert json.loads(answer.read())["status"] == "ok"
        assert stop_daemon(daemon, log) == 0
        assert log.read_text().rstrip().endswith("daemon stopped"), "the journal's last word says the stop ended"
    finally:
        if daemon.poll() is None:
            daemon.kill()


def test_a_live_status_that_cannot_be_written_is_said_once_not_every_second(crawler_table, tiny_model, tmp_path):
    """The daemon writes its live status every second; when it cannot (a full disk, a directory in the way), the
    journal gets one warning, and one line when it works again, not 86,400 warnings a day."""
    config = write_config(tmp_path, tiny_model, "[schedule]\ninterval_minutes = 60\nmin_new_samples = 1000\n")
    log = tmp_path / "daemon.log"
    blocker = tmp_path / "daemon-status.json"
    daemon = start_daemon(config, environment(crawler_table), log)
    try:
        wait_for(lambda: "waiting for 1000" in log.read_text(), 60, "the first cycle", daemon, log)
        while not blocker.is_dir():  # the status file's place is taken: every write fails
            blocker.unlink(missing_ok=True)
            try:
                blocker.mkdir()
            except FileExistsError:  # the daemon wrote it again in between
                pass
        time.sleep(4)
        blocker.rmdir()
        wait_for(lambda: "the live status is written again" in log.read_text(), 10, "recovery", daemon, log)
        assert stop_daemon(daemon, log) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    text = log.read_text()
    assert text.count("could not write the live status") == 1, text
    assert read_json(blocker)["phase"] == "stopped"


def test_an_edited_config_is_said_once_and_a_reload_applies_it_or_keeps_what_works(crawler_table, tiny_model, tmp_path):
    """The daemon keeps the settings it has until SIGHUP (`systemctl reload`): an edit is said once in the log
    (however many follow) and shown by `status`. A reload applies the file from the next cycle (a new interval
    reschedules at once); a file that does not load, or names a table that is not there, changes nothing and is
    said in one line; a setting the daemon holds for its life (the endpoint's port) waits for a restart."""
    config = write_config(tmp_path, tiny_model, "[schedule]\ninterval_minutes = 60\nmin_new_samples = 1000\n")
    original = config.read_text()
    log = tmp_path / "daemon.log"
    env = environment(crawler_table)
    daemon = start_daemon(config, env, log)

    def status() -> str:
        return subprocess.run(CLI + ["status", "--config", str(config)], env=env, capture_output=True, text=True).stdout

    try:
        wait_for(lambda: "waiting for 1000" in log.read_text(), 60, "the first cycle", daemon, log)
        assert "changed since the daemon read it" not in log.read_text()
        for minimum in (500, 200):  # two edits, one line
            config.write_text(original.replace("min_new_samples = 1000", f"min_new_samples = {minimum}"))
            time.sleep(2.5)
        assert log.read_text().count(f"{config} changed since the daemon read it") == 1, log.read_text()
        assert "`systemctl reload codelupe-trainer` (or kill -HUP its pid) applies the edit" in status()

        config.write_text(original.replace("min_new_samples = 1000", "min_new_samples = 900")
                          .replace("interval_minutes = 60", "interval_minutes = 0.05")
                          + "[service]\nmetrics_port = 18231\n")  # never bound: held for a restart
        daemon.send_signal(signal.SIGHUP)
        # Applied: the 60-minute wait is rescheduled to 3 s, and that cycle waits for 900 rows, not 1000.
        wait_for(lambda: "waiting for 900" in log.read_text(), 60, "a cycle with the reloaded settings", daemon, log)
        text = log.read_text()
        assert "schedule.interval_minutes, schedule.min_new_samples, service.metrics_port changed" not in text
        assert "schedule.interval_minutes, schedule.min_new_samples changed; the next cycle uses them" in text, text
        assert "service.metrics_port changed too, but the daemon holds it until a restart" in text, text
        shown = status()
        assert "service.metrics_port changed in its config: applies at a restart" in shown, shown
        assert "its config file changed since it read it" not in shown, shown

        config.write_text(original.replace("min_new_samples = 1000", "min_new_samples = 0"))  # below its minimum
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "config reload failed" in log.read_text(), 30, "the failed reload", daemon, log)
        config.write_text(original + '[database]\ntable = "processed_filez"\n')  # a typo in the table's name
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "config reload refused" in log.read_text(), 60, "the refused reload", daemon, log)
        waits = log.read_text().count("waiting for 900")
        wait_for(lambda: log.read_text().count("waiting for 900") > waits, 60, "a cycle after both", daemon, log)
        assert stop_daemon(daemon, log) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    text = log.read_text()
    failed = next(line for line in text.splitlines() if "config reload failed" in line)
    assert "the daemon keeps the settings it has" in failed and "schedule.min_new_samples" in failed, failed
    refused = next(line for line in text.splitlines() if "config reload refused" in line)
    assert "processed_filez" in refused, refused
    assert "waiting for 1000" not in text.split("config reload failed")[1], "a failed reload kept the last good settings"
    assert "Traceback" not in text, text
    assert all(LOG_LINE.match(line) for line in text.splitlines() if line.strip()), text


def test_a_time_zone_the_scheduler_library_cannot_name_does_not_stop_the_daemon(crawler_table, tiny_model, tmp_path):
    """TZ in the POSIX form libc reads ("JST-9"; a container's, a systemd Environment=), or /etc/timezone and
    /etc/localtime that disagree, made tzlocal raise inside APScheduler: `run` died at start with a traceback.
    The interval needs no time zone: the scheduler runs in UTC, and the journal says when in local time."""
    insert_stdlib_rows(crawler_table, start=0, count=5)
    config = write_config(tmp_path, tiny_model, "[schedule]\ninterval_minutes = 60\nmin_new_samples = 1000\n")
    log_file = tmp_path / "daemon.log"
    daemon = start_daemon(config, environment(crawler_table, TZ="JST-9"), log_file)
    try:
        wait_for(lambda: "nothing_to_do" in log_file.read_text(), 120, "an idle cycle", daemon, log_file)
        live = wait_for(lambda: read_live_status(tmp_path / "state.json"), 30, "the live status", daemon, log_file)
        # The next run an hour on, said with this machine's offset (+09:00 under JST-9).
        assert live["next_run"].endswith("+09:00"), live
        assert stop_daemon(daemon, log_file) == 0
        assert "Traceback" not in log_file.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
