"""Operating the daemon: the systemd unit, the health endpoint, retention, doctor and status."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from codelupe_trainer.cli import main
from codelupe_trainer.config import load_settings
from codelupe_trainer.service.health import start_health_server
from codelupe_trainer.metrics import prune_wandb_runs
from codelupe_trainer.training.adapters import prune_adapters
from codelupe_trainer.state import TrainerState, load_state, save_state

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "codelupe-trainer.service"
JOIN_UNIT = REPO / "systemd" / "codelupe-trainer-join@.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("source, name", [(UNIT, "codelupe-trainer.service"),
                                          (JOIN_UNIT, "codelupe-trainer-join@1.service")])  # a template's instance
def test_unit_file_passes_systemd_analyze_verify(tmp_path, source, name):
    executable = shutil.which("codelupe-trainer") or str(REPO / ".venv" / "bin" / "codelupe-trainer")
    unit = tmp_path / name
    # verify checks that ExecStart exists: point it at this checkout's console script.
    unit.write_text(source.read_text().replace("/opt/codelupe-trainer/.venv/bin/codelupe-trainer", executable))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


def test_unit_file_keeps_the_gpu_reachable_and_the_service_hardened():
    text = UNIT.read_text()
    for required in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StartLimitBurst=", "User=codelupe",
                     "StateDirectory=codelupe-trainer", "LogsDirectory=codelupe-trainer", "EnvironmentFile=",
                     "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=", "ProtectHome=yes", "PrivateTmp=yes"):
        assert required in text, required
    assert not [line for line in text.splitlines() if line.startswith("PrivateDevices")], "it would hide /dev/nvidia*"


def test_health_endpoint_serves_state_as_json_and_prometheus(tmp_path):
    state_file = tmp_path / "state.json"
    save_state(TrainerState(total_training_runs=3, total_samples_trained=1234, total_failures=2, last_trained_id=99,
                            last_run={"finished_at": 1700000000.0}), state_file)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start_health_server(port, state_file, lambda: "idle")
    try:
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read())
        assert health["status"] == "ok" and health["total_training_runs"] == 3 and health["phase"] == "idle"
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "codelupe_training_runs_total 3.0" in scrape
        assert "codelupe_samples_trained_total 1234.0" in scrape
        assert "codelupe_training_failures_total 2.0" in scrape
        assert "codelupe_last_success_timestamp_seconds 1.7e+09" in scrape
        save_state(TrainerState(consecutive_failures=5, last_error="boom"), state_file)
        with pytest.raises(urllib.error.HTTPError) as failing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        assert failing.value.code == 503
    finally:
        server.shutdown()


def test_retention_keeps_latest_and_the_state_adapter(tmp_path):
    output = tmp_path / "adapters"
    for number in range(1, 8):
        (output / f"run-{number:06d}").mkdir(parents=True)
    (output / ".staging-run-000008-abc").mkdir()
    os.symlink("run-000007", output / "latest")
    removed = prune_adapters(output, keep=2, protected=[output / "run-000002"])
    assert sorted(path.name for path in output.iterdir()) == ["latest", "run-000002", "run-000006", "run-000007"]
    assert len(removed) == 5

    runs = tmp_path / "wandb"
    old, synced, fresh = (runs / "offline-run-1-a", runs / "offline-run-2-b", runs / "offline-run-3-c")
    for folder in (old, synced, fresh):
        folder.mkdir(parents=True)
    (synced / "run-b.wandb.synced").touch()
    os.utime(old, (time.time() - 30 * 86400,) * 2)
    prune_wandb_runs(tmp_path, max_age_days=14)
    assert sorted(path.name for path in runs.iterdir()) == ["offline-run-3-c"]


def test_doctor_names_each_problem(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("CODELUPE_DATABASE__URL", "postgresql://u:NotShown1@127.0.0.1:1/none?connect_timeout=1")
    monkeypatch.setenv("CODELUPE_MODEL__BASE_MODEL", str(tmp_path / "no-such-model"))
    monkeypatch.setenv("CODELUPE_PATHS__STATE_FILE", str(tmp_path / "state.json"))
    monkeypatch.setenv("CODELUPE_PATHS__OUTPUT_DIR", str(tmp_path / "adapters"))
    monkeypatch.setenv("CODELUPE_DATABASE__CONNECT_TIMEOUT_S", "1")
    assert main(["doctor", "--config", str(REPO / "config" / "codelupe.toml")]) == 1
    output = capsys.readouterr().out
    assert "FAIL database: cannot connect" in output
    assert "FAIL model:" in output and "no-such-model" in output
    assert "ok   output_dir" in output and "does not exist yet" in output
    assert not (tmp_path / "adapters").exists()  # doctor creates nothing
    assert "wandb: mode offline (no API key" in output
    assert "W&B mode is online but no API key" not in caplog.text, "said once, on its own line, not also as a log warning"
    assert "NotShown1" not in output


def test_doctor_passes_on_a_good_setup(crawler_table, make_settings, tmp_path, capsys):
    make_settings(crawler_table)
    assert main(["doctor", "--config", str(tmp_path / "codelupe.toml")]) == 0
    output = capsys.readouterr().out
    assert "FAIL" not in output
    assert "ok   memory estimate: ~" in output and "micro-batch 4 x 256 tokens" in output
    assert "ok   torch: torch 2." in output  # which build: the first thing to know on a GPU box
    assert f"ok   config: {tmp_path / 'codelupe.toml'} loaded and valid" in output  # which file, not just "a" file
    assert "ok   adapter: none in service yet" in output
    assert f"ok   state: {tmp_path / 'state.json'} does not exist yet" in output
    assert "ok   index: id is indexed" in output
    # Without the primary key's index it still works, slowly: a warning, and doctor still passes.
    with psycopg.connect(crawler_table, autocommit=True) as connection:
        connection.execute("ALTER TABLE processed_files DROP CONSTRAINT processed_files_pkey")
    assert main(["doctor", "--config", str(tmp_path / "codelupe.toml")]) == 0
    assert "warn index: table 'processed_files' has no index on database.id_column='id'" in capsys.readouterr().out
    from codelupe_trainer.service.doctor import startup_problems

    problems, warnings = startup_problems(load_settings(tmp_path / "codelupe.toml"))  # what `run` says at start
    assert problems == [] and len(warnings) == 1 and "CREATE UNIQUE INDEX ON processed_files (id)" in warnings[0]


def test_settings_without_a_config_file_say_so(tmp_path, monkeypatch):
    """Run from a directory without config/codelupe.toml (a shell in $HOME, a unit without --config), the
    defaults apply: `doctor` and the daemon's first line say so instead of "loaded and valid"."""
    from codelupe_trainer.config import load_settings

    monkeypatch.chdir(tmp_path)
    settings = load_settings(None)
    assert settings.config_file is None
    assert settings.config_source().startswith(f"no config file (config/codelupe.toml is not in {tmp_path})")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "codelupe.toml").write_text("[schedule]\nmin_new_samples = 5\n")
    found = load_settings(None)
    assert found.config_file == tmp_path / "config" / "codelupe.toml" and found.schedule.min_new_samples == 5
    assert found.model_copy().config_source() == str(tmp_path / "config" / "codelupe.toml")


@pytest.mark.parametrize(("gpus", "available", "cuda", "expected"), [
    (["NVIDIA GeForce RTX 5090"], False, None, "that torch 2.13.0+cpu cannot use (a CPU-only build)"),
    (["NVIDIA GeForce RTX 5090"], False, "12.8", "(built for CUDA 12.8: the NVIDIA driver may be older"),
    (["NVIDIA GeForce RTX 5090"], True, "12.8", None),
    ([], False, None, None),  # no GPU: a CPU build is right
])
def test_a_torch_that_cannot_use_the_machines_gpus_is_named(gpus, available, cuda, expected):
    from codelupe_trainer.service.doctor import unusable_gpus

    problem = unusable_gpus(gpus, available, "2.13.0+cpu", cuda)
    if expected is None:
        assert problem is None
    else:
        assert expected in problem and "1 NVIDIA GPU(s) (NVIDIA GeForce RTX 5090)" in problem
        assert "every cycle would train on the CPU" in problem


QWEN_7B_CONFIG = {"hidden_size": 3584, "num_hidden_layers": 28, "vocab_size": 152064, "intermediate_size": 18944,
                  "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False}


@pytest.mark.parametrize(("loss", "quantized", "frozen_dtype", "measured_gb"), [
    ("chunked", True, "float32", 16.72), ("fused", True, "float32", 15.13), ("standard", True, "float32", 27.69),
    ("chunked", True, "bfloat16", 11.56), ("chunked", False, "float32", 21.25), ("fused", False, "float32", 20.06),
])
def test_the_memory_estimate_covers_the_measured_7b_peak(loss, quantized, frozen_dtype, measured_gb):
    """Peaks measured on an H200 under the Trainer's bf16 autocast with benchmarks/train_throughput.py
    (Qwen2.5-Coder-7B architecture, 4-bit or a bf16 base, batch 4 x 2,048, checkpointing;
    benchmarks/results/2026-11-30-h200-gpu-check.txt): the estimate must not promise less than the run needs,
    nor be far above. The peaks count allocated memory only; the estimate's 2.5 GB of overhead adds the CUDA
    context and allocator slack they leave out."""
    from codelupe_trainer.config import load_settings
    from codelupe_trainer.training.gpu_check import estimate_memory_gb

    settings = load_settings(REPO / "config" / "codelupe.toml")
    settings.model.frozen_dtype = frozen_dtype
    parts = estimate_memory_gb(QWEN_7B_CONFIG, settings, quantized=quantized, loss=loss)
    assert measured_gb - 0.5 <= parts["total"] <= measured_gb + 3.5
    if loss != "standard":
        assert parts["total"] <= 28  # the shipped defaults fit a 32 GB card with a margin


@pytest.mark.parametrize(("loss", "measured_gb"), [("chunked", 5.04), ("standard", 8.70)])
def test_the_cpu_memory_estimate_covers_the_measured_cpu_peak(loss, measured_gb):
    """Peak RSS measured on the 2-core CPU box with benchmarks/train_throughput.py (README;
    benchmarks/results/2026-11-30-cpu-train-throughput.txt): the tiny Qwen2 with the 7B's 152,064-token
    vocabulary, batch 4 x 1,024, checkpointing, LoRA dropout 0.05. On the CPU everything is fp32."""
    from codelupe_trainer.training.gpu_check import estimate_memory_gb

    settings = load_settings(REPO / "config" / "codelupe.toml")
    settings.training.batch_size, settings.data.max_length = 4, 1024
    tiny_big_vocab = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "vocab_size": 152064,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
    parts = estimate_memory_gb(tiny_big_vocab, settings, quantized=False, loss=loss, device="cpu")
    assert measured_gb <= parts["total"] <= measured_gb * 1.15
    # The 7B on the CPU in fp32 is more than twice what it takes on the GPU in 4-bit.
    on_the_cpu = estimate_memory_gb(QWEN_7B_CONFIG, settings, quantized=False, loss=loss, device="cpu")["total"]
    assert on_the_cpu > 2 * estimate_memory_gb(QWEN_7B_CONFIG, settings, quantized=True, loss=loss)["total"]


def test_doctor_on_a_machine_without_cuda_says_whether_the_run_fits_its_ram(db_url, make_settings, tmp_path, capsys,
                                                                            tiny_model):
    from codelupe_trainer.training.gpu_check import host_memory_gb

    total, _ = host_memory_gb()
    seven_b = tmp_path / "coder-7b"
    seven_b.mkdir()
    (seven_b / "config.json").write_text(json.dumps({"model_type": "qwen2", **QWEN_7B_CONFIG}))
    make_settings(db_url, model_dir=seven_b)
    assert main(["doctor", "--config", str(tmp_path / "codelupe.toml")]) == 1
    output = capsys.readouterr().out
    [memory] = [line for line in output.splitlines() if line[5:].startswith("memory:")]
    needed = float(memory.split("needs ~")[1].split(" GB")[0]) if "needs ~" in memory else None
    if total < 40:  # this box (24 GB): the fp32 7B cannot fit, and doctor fails on it
        assert memory.startswith("FAIL memory: the run needs ~") and "out-of-memory killer" in memory, memory
        assert needed > total
    assert "warn cpu: 7.6 B parameters to train on the CPU" in output

    make_settings(db_url)  # the tiny model: fits, and no word about the CPU
    main(["doctor", "--config", str(tmp_path / "codelupe.toml")])
    output = capsys.readouterr().out
    assert [line for line in output.splitlines() if line.startswith("ok   memory: ~")] and "warn cpu" not in output


def test_status_shows_the_persisted_state(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CODELUPE_PATHS__STATE_FILE", str(tmp_path / "state.json"))
    save_state(TrainerState(total_training_runs=4, last_trained_id=77, total_samples_trained=500, uptime_seconds=7200,
                            last_error="cannot connect to the database: refused", last_error_at=1.0,
                            consecutive_failures=1, pending_gaps=[[40, 42, time.time() - 600], [50, 50, time.time()]]),
               tmp_path / "state.json")
    assert main(["status", "--config", str(REPO / "config" / "codelupe.toml"), "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert (view["total_training_runs"], view["last_trained_id"], view["total_samples_trained"], view["uptime_hours"]) == (4, 77, 500, 2.0)
    assert view["live"] is None
    assert main(["status", "--config", str(REPO / "config" / "codelupe.toml")]) == 0
    text = capsys.readouterr().out
    assert "last trained id:       77" in text and "cannot connect" in text and "daemon:                not running" in text
    # Ids the watermark passed but still waits for (late commits, rows not scored yet), and for how long.
    assert "4 id(s) below it still watched (not committed or not scored yet), the oldest for 10 min" in text, text


def test_status_counts_the_failures_the_running_daemon_could_not_record_in_the_state(tmp_path, monkeypatch, capsys):
    """The state took 1 failure; the daemon (alive: this process stands in for it) counted 2 more it could
    not write there. `status` says 3 in a row, STUCK at the default threshold of 3, and why the state shows less."""
    from codelupe_trainer.progress import write_live_status

    state_file = tmp_path / "state.json"
    monkeypatch.setenv("CODELUPE_PATHS__STATE_FILE", str(state_file))
    save_state(TrainerState(last_trained_id=77, consecutive_failures=1, total_failures=1, last_error="x"), state_file)
    write_live_status(state_file, phase="idle", next_run=None, unrecorded_failures=2)
    assert main(["status", "--config", str(REPO / "config" / "codelupe.toml")]) == 0
    text = capsys.readouterr().out
    assert "failures:              3 in a row, 3 in all" in text, text
    assert "2 of them could not be recorded in the state file" in text, text
    assert "STUCK:                 3 cycles in a row failed at id 77" in text, text
    assert main(["status", "--config", str(REPO / "config" / "codelupe.toml"), "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert (view["consecutive_failures"], view["unrecorded_failures"], view["stuck"]) == (3, 2, True)


def test_daemon_refuses_to_start_on_a_missing_table_or_model(db_url, make_settings, tmp_path, capsys, monkeypatch):
    make_settings(db_url)
    monkeypatch.setenv("CODELUPE_MODEL__BASE_MODEL", str(tmp_path / "missing-model"))
    assert main(["run", "--config", str(tmp_path / "codelupe.toml")]) == 2
    errors = capsys.readouterr().err
    assert "cannot start: table 'processed_files' does not exist" in errors
    assert "missing-model" in errors and "not a directory with a config.json" in errors


def test_daemon_refuses_to_start_when_the_rendezvous_names_another_machine(crawler_table, make_settings, tmp_path,
                                                                            capsys, monkeypatch):
    make_settings(crawler_table, "[training]\nnum_nodes = 2\nrendezvous_endpoint = \"192.0.2.1:29400\"\n")
    assert main(["run", "--config", str(tmp_path / "codelupe.toml")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == ["codelupe-trainer: cannot start: training.rendezvous_endpoint: 192.0.2.1 (192.0.2.1) is not "
                      "an address of this machine; it must name node 0, where the daemon runs"]


def test_run_once_names_a_missing_model_path(crawler_table, make_settings, tmp_path, monkeypatch, capsys):
    from conftest import insert_stdlib_rows

    insert_stdlib_rows(crawler_table, start=0, count=20)
    settings = make_settings(crawler_table)
    monkeypatch.setenv("CODELUPE_MODEL__BASE_MODEL", str(tmp_path / "gone"))
    assert main(["run-once", "--config", str(tmp_path / "codelupe.toml")]) == 2  # a setting to fix, as `run` says
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and f"model.base_model '{tmp_path / 'gone'}' is not a directory with a config.json" in errors[0]
    from codelupe_trainer.state import load_state

    assert load_state(settings.paths.state_file).last_trained_id == 0


@pytest.mark.parametrize(("failures", "interval", "expected"), [(0, 300, 300), (1, 300, 30), (2, 300, 60), (4, 300, 240), (5, 300, 300), (3, 3, 3)])
def test_backoff_doubles_and_is_capped_at_the_interval(failures, interval, expected):
    from codelupe_trainer.service.scheduler import backoff_seconds

    assert backoff_seconds(failures, interval) == expected


def test_a_non_finite_adapter_is_never_saved(tiny_model, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from codelupe_trainer.errors import TrainingError
    from codelupe_trainer.training.adapters import save_adapter

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        next(parameter for parameter in model.parameters() if parameter.requires_grad).fill_(float("nan"))
    with pytest.raises(TrainingError, match="NaN or infinite"):
        save_adapter(model, tmp_path / "adapters", 1)
    assert not (tmp_path / "adapters").exists() or list((tmp_path / "adapters").iterdir()) == []


def test_training_arguments_never_hide_nan_and_never_report_to_wandb(tmp_path):
    from codelupe_trainer.config import TrainingSettings
    from codelupe_trainer.training.loop import build_training_arguments

    arguments = build_training_arguments(TrainingSettings(), tmp_path, "cpu", seed=1, has_eval=True)
    assert arguments.logging_nan_inf_filter is False
    assert arguments.report_to in ([], "none", ["none"]) or not arguments.report_to
    assert arguments.save_strategy == "no"


@pytest.mark.parametrize("endpoint, ok, expected", [
    ("localhost:29400", True, "is this machine (loopback: no other machine can reach it); on each other machine run "
                              "`codelupe-trainer join --node-rank K` for K in 1..2"),
    ("192.0.2.1:29400", False, "192.0.2.1 (192.0.2.1) is not an address of this machine"),  # TEST-NET-1
    ("no-such-host.invalid:29400", False, "'no-such-host.invalid' does not resolve"),
])
def test_doctor_checks_that_the_rendezvous_endpoint_names_this_machine(endpoint, ok, expected):
    from codelupe_trainer.service.doctor import check_rendezvous

    name, passed, detail = check_rendezvous(endpoint, 3)
    assert (name, passed) == ("rendezvous", ok) and expected in detail, detail


def test_a_rollback_while_a_cycle_runs_waits_and_says_how_to_roll_back_now(tmp_path, capsys):
    """README: `rollback` exits 3 while a cycle runs (the cycle would write its own state over the rollback's).
    On the shipped settings a cycle trains for hours, so the line says what is running and how to roll back
    at once (stop the service, roll back, start it) instead of only "try again"; nothing changes meanwhile."""
    from codelupe_trainer.lock import trainer_lock
    from codelupe_trainer.progress import write_cycle_progress

    config = tmp_path / "codelupe.toml"
    state_file = tmp_path / "var" / "state.json"
    config.write_text(f'[paths]\nstate_file = "{state_file}"\noutput_dir = "{tmp_path / "adapters"}"\n')
    adapter = tmp_path / "adapters" / "run-000001"
    adapter.mkdir(parents=True)
    save_state(TrainerState(total_training_runs=2, adapter_in_use=2, latest_adapter=str(tmp_path / "adapters" / "run-000002"),
                            lineage=[{"run": 1, "promoted": True, "adapter": str(adapter)},
                                     {"run": 2, "promoted": True, "adapter": str(tmp_path / "adapters" / "run-000002")}]),
               state_file)
    before = state_file.read_text()
    with trainer_lock(state_file):  # what a running cycle holds
        write_cycle_progress(state_file, "training", run=3, step=120, percent=13.3, eta_minutes=95.2)
        assert main(["rollback", "1", "--config", str(config)]) == 3
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "another codelupe-trainer cycle is running" in said
    assert ": run 3, training, 13.3 %, ETA 95.2 min;" in said
    assert "`systemctl stop codelupe-trainer`" in said and "then this rollback" in said
    assert state_file.read_text() == before


def test_rollback_where_nothing_was_trained_says_so_and_creates_nothing(tmp_path, capsys):
    """`rollback` with the wrong --config (or none) names the state it looked for and leaves no directory
    behind (its lock would have created the state's directory)."""
    state_dir = tmp_path / "var-not-here"
    config = tmp_path / "codelupe.toml"
    config.write_text(f'[paths]\nstate_file = "{state_dir / "state.json"}"\noutput_dir = "{tmp_path / "adapters"}"\n')
    assert main(["rollback", "3", "--config", str(config)]) == 1
    assert f"no state at {state_dir / 'state.json'}: nothing was trained here" in capsys.readouterr().err
    assert not state_dir.exists()


def test_on_promote_is_killed_whole_at_its_timeout_and_a_process_it_leaves_behind_never_holds_us(tmp_path, caplog):
    """The hand-off is bounded by on_promote_timeout_s, its children included (a shell script's own commands
    are killed with it); and a command that starts something in the background and exits (a server it
    restarts) is done when it exits, not when the background process closes its output."""
    import logging

    from codelupe_trainer.config import PromotionSettings
    from codelupe_trainer.hooks import run_on_promote

    caplog.set_level(logging.INFO)
    marker = tmp_path / "grandchild-ran-on"
    hung = PromotionSettings(on_promote=["sh", "-c", f"sh -c 'sleep 2; touch {marker}' & sleep 30"],
                             on_promote_timeout_s=0.5)
    started = time.monotonic()
    assert run_on_promote(hung, "promote", tmp_path, 1) == "killed after promotion.on_promote_timeout_s = 0.5 s"
    assert time.monotonic() - started < 5
    time.sleep(2.5)
    assert not marker.exists()  # the script's own child went with it

    restarts = PromotionSettings(on_promote=["sh", "-c", "sleep 20 & echo reloaded"], on_promote_timeout_s=10)
    started = time.monotonic()
    assert run_on_promote(restarts, "promote", tmp_path, 2) == "ok"
    assert time.monotonic() - started < 5 and "on_promote output: reloaded" in caplog.text


def test_the_readmes_vllm_and_sglang_hand_offs_load_the_promoted_adapter_under_one_name(tmp_path):
    """README, "The hand-off": both scripts, exactly as written there, run by the daemon's hook runner against a
    stand-in server on the port they name: the old adapter is unloaded (none loaded yet is an error that must
    not fail the hand-off) and the promoted folder loaded under the one name clients ask for; a server that
    refuses the load fails the hand-off."""
    import re
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from codelupe_trainer.config import PromotionSettings
    from codelupe_trainer.hooks import run_on_promote

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    scripts = re.findall(r"```sh\n(#!/bin/sh\n.*?)```", readme, re.S)
    assert len(scripts) == 2 and "vLLM" in scripts[0] and "SGLang" in scripts[1]
    received: list[tuple[str, dict]] = []
    refuse_load = threading.Event()

    class StandIn(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            # vLLM answers 404 (SGLang 400) to unloading a name it does not hold: the first promotion's case.
            status = 404 if "unload" in self.path else 500 if refuse_load.is_set() else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    adapter = tmp_path / "adapters" / "run-000007"
    adapter.mkdir(parents=True)
    try:
        for script, api in zip(scripts, ["/v1/", "/"]):
            port = re.search(r"http://127\.0\.0\.1:(\d+)/", script).group(1)
            path = tmp_path / f"reload-lora-{port}"
            path.write_text(script.replace(f"127.0.0.1:{port}", f"127.0.0.1:{server.server_port}"))
            path.chmod(0o755)
            settings = PromotionSettings(on_promote=[str(path)])
            refuse_load.clear()
            received.clear()
            assert run_on_promote(settings, "promote", adapter, 7, 0.9, 1.0) == "ok"
            assert received == [(f"{api}unload_lora_adapter", {"lora_name": "codelupe"}),
                                (f"{api}load_lora_adapter", {"lora_name": "codelupe", "lora_path": str(adapter.resolve())})]
            refuse_load.set()
            assert run_on_promote(settings, "rollback", adapter, 7) == "exited with status 22"  # curl -f
    finally:
        server.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("text, says", [
    ('{"last_trained_id": 1200,\n', "it is not JSON (Expecting property name"),
    ('{"last_trained_id": "1200", "total_training_runs": 3}\n', 'last_trained_id is "1200": input should be a valid integer'),
    ('[{"last_trained_id": 1200}]\n', "it holds a JSON list, not an object"),
])
def test_a_state_file_broken_by_hand_stops_every_command_in_one_line_and_is_never_overwritten(
        crawler_table, make_settings, tmp_path, capsys, caplog, text, says):
    """A state edited by hand into something unusable: guessing would retrain or skip rows, so every command
    names the file and the problem in one line (exit 2), a cycle fails without recording anything in it (the
    failure counters live there too), nothing is saved beside it, and /health says stuck."""
    from codelupe_trainer.cycle import run_cycle
    from codelupe_trainer.errors import StateError
    from codelupe_trainer.service.health import health_document

    from conftest import insert_stdlib_rows

    insert_stdlib_rows(crawler_table, 0, 20)
    settings = make_settings(crawler_table)
    config = str(tmp_path / "codelupe.toml")
    state_file = tmp_path / "state.json"
    state_file.write_text(text)
    line = f"the state file {state_file} cannot be used: {says}"

    for command, code, prefix in ((["run-once", "--force"], 2, "cannot run: "), (["run"], 2, "cannot start: "),
                                  (["status"], 2, ""), (["adapters"], 2, ""), (["rollback", "1"], 2, "")):
        assert main([*command, "--config", config]) == code, command
        captured = capsys.readouterr()
        assert f"codelupe-trainer: {prefix}{line}" in captured.err, command
        assert "Traceback" not in captured.err + captured.out
    assert main(["doctor", "--config", config]) == 1
    assert f"FAIL state: {line}" in capsys.readouterr().out

    with pytest.raises(StateError, match="fix it by hand, or restore it from a backup"):
        run_cycle(settings, force=True)
    assert health_document(state_file, lambda: "idle")["status"] == "stuck"
    assert state_file.read_text() == text, "never overwritten"
    assert not (tmp_path / "last-failure.txt").exists(), "an expected failure: no traceback kept"
    assert not (tmp_path / "adapters").exists()


def test_a_table_created_again_below_the_watermark_is_said_each_idle_cycle_and_by_doctor(
        crawler_table, make_settings, tmp_path, capsys, caplog):
    """The crawler's table dropped and created again: its ids start over at 1, below the watermark, and the
    daemon would wait for new rows in silence forever. Each idle cycle warns and doctor says it (and the
    README's remedy for a restored backup trains the rows since); an emptied table, or one whose rows above the
    watermark were deleted but whose next ids go on, is not taken for it."""
    import logging

    from conftest import insert_stdlib_rows

    from codelupe_trainer.cycle import run_cycle
    from codelupe_trainer.data.source import ids_behind_watermark, open_connection

    settings = make_settings(crawler_table)
    save_state(TrainerState(last_trained_id=500, total_training_runs=3), settings.paths.state_file)
    with open_connection(settings.database) as connection:
        assert ids_behind_watermark(connection, settings.database, 500) is None, "an empty table: nothing to say"
    insert_stdlib_rows(crawler_table, 0, 20)  # ids 1-20: a table created again
    with caplog.at_level(logging.WARNING, logger="codelupe_trainer"):
        outcome = run_cycle(settings)
    assert outcome.status == "nothing_to_do"
    said = "every id in 'processed_files' is at most 20, below the watermark (last_trained_id 500)"
    assert said in caplog.text
    assert main(["doctor", "--config", str(tmp_path / "codelupe.toml")]) == 0
    assert f"warn watermark: {said}" in capsys.readouterr().out
    # README's remedy for a database restored from an older backup: the watermark set back to N by hand; the
    # rows inserted since then train at the next cycle.
    # A range still watched above the new watermark (ids the old table had handed out) must not read its rows
    # a second time beside the new ones.
    written = json.loads(settings.paths.state_file.read_text())
    settings.paths.state_file.write_text(json.dumps(written | {"last_trained_id": 20,
                                                               "pending_gaps": [[30, 40, time.time()]]}))
    insert_stdlib_rows(crawler_table, 100, 30)
    assert run_cycle(settings, force=True).status == "trained"
    restored = load_state(settings.paths.state_file)
    assert restored.last_trained_id == 50 and restored.gap_ranges() == []
    with psycopg.connect(crawler_table) as connection:
        eligible = connection.execute("SELECT count(*) FROM processed_files WHERE id > 20 AND quality_score >= 70 "
                                      "AND char_length(content) BETWEEN 50 AND 8000").fetchone()[0]
    assert eligible > 10
    assert (restored.total_samples_trained + restored.total_samples_held_out
            + sum(restored.last_run["blocked"].values())) == eligible
    with psycopg.connect(crawler_table, autocommit=True) as connection:
        connection.execute("SELECT setval(pg_get_serial_sequence('processed_files', 'id'), 600)")
    insert_stdlib_rows(crawler_table, 20, 1)  # the next id goes on above the watermark: trainable, nothing to say
    with open_connection(settings.database) as connection:
        assert ids_behind_watermark(connection, settings.database, 500) is None


def test_another_table_filled_past_the_watermark_is_refused_instead_of_taken_as_trained(
        crawler_table, make_settings, tmp_path, capsys):
    """The crawler's table created again and refilled past the watermark before the daemon looked (or
    database.url pointed at another database with the same table): the ids go on above the watermark, so no
    warning fired, and rows 1..watermark of the new table were taken as trained without a word. The state
    keeps a few rows below its watermark as they were trained (id and content digest); another table is
    refused, one line, nothing advanced, and `doctor` fails on it. The same table with a row edited in place,
    or rows deleted, is not taken for another."""
    from conftest import insert_stdlib_rows

    from codelupe_trainer.cycle import run_cycle
    from codelupe_trainer.data.source import SourceError
    from codelupe_trainer.service.doctor import settings_problems

    settings = make_settings(crawler_table)
    config = str(tmp_path / "codelupe.toml")
    insert_stdlib_rows(crawler_table, 0, 30)
    assert run_cycle(settings, force=True).status == "trained"
    trained = load_state(settings.paths.state_file)
    recorded = [row_id for row_id, _ in trained.watermark_rows]
    assert len(recorded) == 3 and max(recorded) == trained.last_trained_id == 30 and min(recorded) <= 10

    with psycopg.connect(crawler_table, autocommit=True) as connection:
        connection.execute("UPDATE processed_files SET content = content || '# edited' WHERE id = 30")
        connection.execute("DELETE FROM processed_files WHERE id = %s", (min(recorded),))
    assert main(["doctor", "--config", config]) == 0
    assert "watermark" not in capsys.readouterr().out
    assert not [problem for problem in settings_problems(settings)[0] if "watermark" in problem]
    assert run_cycle(settings).status == "nothing_to_do"

    with psycopg.connect(crawler_table, autocommit=True) as connection:
        connection.execute("TRUNCATE processed_files RESTART IDENTITY")
    insert_stdlib_rows(crawler_table, 300, 60)  # other files, ids 1-60: past the watermark of 30
    said = "'processed_files' is not the table this state trained on: its rows"
    with pytest.raises(SourceError, match=said):
        run_cycle(settings, force=True)
    after = load_state(settings.paths.state_file)
    assert (after.last_trained_id, after.total_training_runs, after.watermark_rows) == (30, 1, trained.watermark_rows)
    assert said in after.last_error and "nothing was trained or advanced" in after.last_error
    assert main(["doctor", "--config", config]) == 1
    assert f"FAIL watermark: {said}" in capsys.readouterr().out
    # `run` refuses to start on it, and a reload that points there keeps the settings the daemon has.
    assert [problem for problem in settings_problems(settings)[0] if said in problem]
    # The watermark set back by hand below the rows it recorded (README's remedy for a restored backup): those
    # rows are no longer counted as trained, and their ids may be handed out again.
    written = json.loads(settings.paths.state_file.read_text())
    settings.paths.state_file.write_text(json.dumps(written | {"last_trained_id": min(recorded) - 1}))
    assert not [problem for problem in settings_problems(settings)[0] if "watermark" in problem]


def test_a_person_whose_user_may_not_read_the_services_files_gets_one_line_naming_whose_they_are():
    """`codelupe-trainer adapters` or `rollback` typed by a person on the box, not as the `codelupe` user the
    service runs as: the state (0640) and its lock are not theirs. One line, exit 2, naming the file, whose it
    is and how to run the command as them; never a traceback. As root (CI), a forked process that became
    `nobody`; as another user, files made unreadable."""
    import tempfile

    place = Path(tempfile.mkdtemp(prefix="codelupe-person-", dir="/tmp"))
    try:
        os.chmod(place, 0o755)
        state_file = place / "state.json"
        save_state(TrainerState(last_trained_id=7), state_file)
        (place / "state.lock").write_text("")
        config = place / "codelupe.toml"
        config.write_text(f'[database]\nurl = "postgresql://trainer@127.0.0.1:1/code"\n'
                          f'[paths]\nstate_file = "{state_file}"\noutput_dir = "{place / "adapters"}"\n')
        errors = place / "stderr.txt"
        errors.write_text("")
        os.chmod(errors, 0o666)
        as_root = os.geteuid() == 0
        if not as_root:
            os.chmod(state_file, 0o000)
            os.chmod(place / "state.lock", 0o000)
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through its exit code and the file
            try:
                if as_root:
                    os.setgid(65534)
                    os.setuid(65534)
                with errors.open("a") as stream:
                    sys.stderr = stream  # where the commands print (pytest holds the process's own)
                    codes = [main([*command, "--config", str(config)]) for command in (["status"], ["adapters"],
                                                                                        ["rollback", "1"])]
                os._exit(0 if codes == [2, 2, 2] else 10 + sum(codes))
            except BaseException:
                os._exit(99)
        _, status = os.waitpid(child, 0)
        said = errors.read_text()
    finally:
        shutil.rmtree(place, ignore_errors=True)
    assert os.waitstatus_to_exitcode(status) == 0, said
    lines = said.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in said, said
    for line, command, path in zip(lines, ("status", "adapters", "rollback"), (state_file, state_file, place / "state.lock")):
        assert line.startswith(f"codelupe-trainer: {path}: permission denied ("), line
        assert f"run `codelupe-trainer {command}` " in line, line
    if as_root:
        assert f"{state_file}: permission denied (root:root -rw-r-----): run `codelupe-trainer status` with sudo" in lines[0]


def test_files_a_command_run_as_root_left_behind_are_named_with_the_chown_that_fixes_them(tmp_path):
    """`sudo codelupe-trainer run-once` leaves root's state, stores and adapters where the service's user must
    write: each `run`/`run-once` refuses to start with one line naming the owner and the `chown` that fixes
    it, instead of a cycle failing later on a store it cannot write. Judged as the service's user: a forked
    process that became `nobody` (as root, which CI is); as another user, a file made read-only."""
    import tempfile

    from codelupe_trainer.config import Settings
    from codelupe_trainer.service.doctor import check_state, check_writable, unwritable_paths

    place = Path(tempfile.mkdtemp(prefix="codelupe-owner-", dir="/tmp"))
    try:
        state_dir = place / "state"
        state_dir.mkdir()
        save_state(TrainerState(last_trained_id=7), state_dir / "state.json")
        (state_dir / "dedup.sqlite3").write_bytes(b"")
        (state_dir / "lost+found").mkdir(mode=0o700)  # a mount point's: not the daemon's, never judged
        settings = Settings(paths={"state_file": state_dir / "state.json", "output_dir": state_dir / "adapters"})
        as_root = os.geteuid() == 0
        if as_root:
            os.chmod(place, 0o755)
            os.chown(state_dir, 65534, 65534)  # the service's user owns its directory; root's files are inside
        else:
            os.chmod(state_dir / "dedup.sqlite3", 0o444)
        reader, writer = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe
            try:
                if as_root:
                    os.setgid(65534)
                    os.setuid(65534)
                verdict = [check_writable("state_dir", state_dir), check_state(settings), unwritable_paths(settings)]
                os.write(writer, json.dumps(verdict).encode())
            finally:
                os._exit(0)
        os.close(writer)
        with os.fdopen(reader) as pipe:
            (name, ok, detail), state_line, problems = json.loads(pipe.read())
        os.waitpid(child, 0)
    finally:
        shutil.rmtree(place, ignore_errors=True)
    assert name == "state_dir" and ok is False
    assert f"{state_dir} holds {2 if as_root else 1} file(s) this user" in detail and "cannot write, such as " in detail
    assert problems and problems[0].startswith("paths.state_file: ")
    if as_root:
        assert detail.endswith(f", owned by root: left by a command run as root? `sudo chown -R nobody: {state_dir}`")
        assert state_line[1] is False and state_line[2].endswith(f"owned by root: left by a command run as root? "
                                                                 f"`sudo chown -R nobody: {state_dir}`")


@pytest.mark.slow
def test_a_damaged_duplicate_store_stops_the_start_in_one_line_and_a_lost_one_is_warned_about(
        crawler_table, make_settings, tmp_path, capsys):
    """`dedup.sqlite3` overwritten (a disk error, a restore gone wrong): every cycle failed on "file is not a
    database" with a traceback kept, and doctor said nothing. Now run/run-once refuse in one line naming the
    file and what it holds, doctor fails its store line, a cycle fails as an expected failure; a store
    deleted after runs is a doctor warning (the holdout would be chosen again)."""
    from conftest import insert_stdlib_rows

    from codelupe_trainer.cycle import run_cycle
    from codelupe_trainer.errors import StoreError

    insert_stdlib_rows(crawler_table, 0, 20)
    settings = make_settings(crawler_table)
    config = str(tmp_path / "codelupe.toml")
    save_state(TrainerState(last_trained_id=5, total_training_runs=2), settings.paths.state_file)
    store = tmp_path / "dedup.sqlite3"
    assert main(["doctor", "--config", config]) == 0
    assert f"warn store: {store} is gone after 2 runs" in capsys.readouterr().out
    store.write_bytes(b"not a database, a restore gone wrong " * 100)
    said = f"the duplicate store {store} cannot be used (file is not a database)"
    for command, prefix in ((["run-once", "--force"], "cannot run: "), (["run"], "cannot start: ")):
        assert main([*command, "--config", config]) == 2
        assert f"codelupe-trainer: {prefix}{said}" in capsys.readouterr().err
    assert main(["doctor", "--config", config]) == 1
    assert f"FAIL store: {said}" in capsys.readouterr().out
    with pytest.raises(StoreError, match="Restore it from a backup, or move it aside"):
        run_cycle(settings, force=True)
    assert not (tmp_path / "last-failure.txt").exists(), "an expected failure: no traceback kept"
    assert store.read_bytes().startswith(b"not a database"), "left as it was for the user to restore"


def test_status_without_a_state_file_says_so_instead_of_showing_zeros(tmp_path, monkeypatch, capsys):
    """`status` run without the service's --config reads another (missing) state file: zero runs there must
    not read as a lost state, so it says the file is not there and which configuration it looked with."""
    monkeypatch.setenv("CODELUPE_PATHS__STATE_FILE", str(tmp_path / "state.json"))
    assert main(["status", "--config", str(REPO / "config" / "codelupe.toml")]) == 0
    text = capsys.readouterr().out
    assert ("not there yet: nothing was trained with this configuration "
            f"({REPO / 'config' / 'codelupe.toml'})") in text
    assert main(["status", "--config", str(REPO / "config" / "codelupe.toml"), "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["state_exists"] is False and view["first_started_at"] is None and view["total_training_runs"] == 0
    save_state(TrainerState(total_training_runs=1), tmp_path / "state.json")
    assert main(["status", "--config", str(REPO / "config" / "codelupe.toml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state_exists"] is True
    assert main(["status", "--config", str(REPO / "config" / "codelupe.toml")]) == 0
    assert "not there yet" not in capsys.readouterr().out


def test_a_wandb_dir_that_cannot_be_written_is_warned_about_by_doctor_and_at_start(crawler_table, make_settings,
                                                                                    tmp_path, capsys):
    """W&B never fails a run, so an unwritable `wandb.dir` (a path through a file, a folder root left behind)
    showed only as one warning per cycle while no run reached W&B; `doctor` said `ok wandb`. Now `doctor`
    warns (it still passes: training works) and `run` says it once at start."""
    from codelupe_trainer.service.doctor import startup_problems

    (tmp_path / "a-file").write_text("")
    settings = make_settings(crawler_table, f'[wandb]\nmode = "offline"\ndir = "{tmp_path / "a-file" / "wandb"}"\n')
    assert main(["doctor", "--config", str(tmp_path / "codelupe.toml")]) == 0
    output = capsys.readouterr().out
    assert (f"warn wandb: mode offline, but wandb.dir: {tmp_path / 'a-file' / 'wandb'} cannot be created: "
            f"{tmp_path / 'a-file'} is not a directory: W&B cannot start") in output, output
    problems, warnings = startup_problems(settings)
    assert problems == [] and any(warning.startswith("wandb: mode offline, but wandb.dir:") for warning in warnings)

    settings = make_settings(crawler_table, f'[wandb]\nmode = "offline"\ndir = "{tmp_path / "w"}"\n')
    assert main(["doctor", "--config", str(tmp_path / "codelupe.toml")]) == 0
    assert "ok   wandb: mode offline\n" in capsys.readouterr().out
    assert not any(warning.startswith("wandb") for warning in startup_problems(settings)[1])
