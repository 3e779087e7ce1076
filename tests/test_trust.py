"""Smaller promises a daemon left alone depends on: failures are told apart and alerted on, a missing adapter is
said out loud, 4-bit parameters are counted whole, retention bounds the local files."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import pytest
from conftest import insert_stdlib_rows
from wandb_reader import find_run_files, read_records, read_run

from codelupe_trainer.cli import main
from codelupe_trainer.metrics import prune_wandb_runs, rotate_metrics_file
from codelupe_trainer.state import load_state

pytestmark = pytest.mark.slow


def test_failed_attempts_are_distinct_runs_and_a_stuck_daemon_alerts_once(crawler_table, make_settings, tmp_path,
                                                                          monkeypatch, capsys, caplog):
    insert_stdlib_rows(crawler_table, start=0, count=30)
    settings = make_settings(crawler_table, extra="[service]\nalert_after_failures = 2\n")
    config = str(tmp_path / "codelupe.toml")
    monkeypatch.setenv("CODELUPE_FAULT", "train:error")
    for _ in range(3):
        assert main(["run-once", "--config", config, "--force"]) == 1
    state = load_state(settings.paths.state_file)
    assert state.consecutive_failures == 3 and state.last_trained_id == 0
    capsys.readouterr()
    assert main(["status", "--config", config]) == 0
    assert "STUCK" in capsys.readouterr().out
    monkeypatch.delenv("CODELUPE_FAULT")
    assert main(["run-once", "--config", config, "--force"]) == 0
    assert load_state(settings.paths.state_file).consecutive_failures == 0

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    alerts = [record for record in records if record.get("event") == "alert"]
    assert len(alerts) == 1  # once, when the count reached 2; not again at 3
    assert "2 cycles in a row failed at last_trained_id 0 (InjectedFault)" in alerts[0]["text"]
    runs = [read_run(path) for path in find_run_files(tmp_path)]
    names = sorted(run.run["name"] for run in runs if not run.run["name"].startswith("alert-"))
    assert names == ["run-1", "run-1-attempt-2", "run-1-attempt-3", "run-1-attempt-4"]
    [alert_run] = [path for path in find_run_files(tmp_path) if read_run(path).run["name"].startswith("alert-")]
    kinds = {record.WhichOneof("record_type") for record in read_records(alert_run)}
    assert "alert" in kinds
    for path in find_run_files(tmp_path):
        assert "host" not in read_run(path).run or read_run(path).run["host"] in ("", "codelupe-trainer")


def test_a_missing_previous_adapter_is_said_and_recorded(crawler_table, make_settings, tmp_path, caplog):
    insert_stdlib_rows(crawler_table, start=0, count=30)
    settings = make_settings(crawler_table)
    config = str(tmp_path / "codelupe.toml")
    assert main(["run-once", "--config", config, "--force"]) == 0
    shutil.rmtree(settings.paths.output_dir)
    insert_stdlib_rows(crawler_table, start=300, count=60, repo="more")
    caplog.set_level(logging.WARNING)
    assert main(["run-once", "--config", config, "--force"]) == 0
    state = load_state(settings.paths.state_file)
    assert state.last_run["previous_adapter_missing"] is True and state.last_run["continued_from"] is None
    assert "previous adapter" in caplog.text and "missing" in caplog.text


def test_four_bit_parameters_are_counted_whole(crawler_table, make_settings, tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    insert_stdlib_rows(crawler_table, start=0, count=30)
    make_settings(crawler_table, extra=(
        f'[model]\nbase_model = "{tiny_model}"\nquantization = "4bit"\nlora_r = 4\nlora_alpha = 8\nlora_dropout = 0.0\n'
        '[training]\nbatch_size = 4\nmax_steps = 2\nlogging_steps = 1\ngradient_checkpointing = false\n'
    ))
    assert main(["run-once", "--config", str(tmp_path / "codelupe.toml"), "--force"]) == 0
    [run_file] = find_run_files(tmp_path)
    config = read_run(run_file).config
    base = sum(parameter.numel() for parameter in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    assert config["model/total_params"] == base + config["model/trainable_params"]


def test_retention_bounds_the_metrics_file_and_old_online_runs(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("x" * 100)
    assert not rotate_metrics_file(metrics, max_bytes=200)
    metrics.write_text("x" * 300)
    assert rotate_metrics_file(metrics, max_bytes=200)
    assert not metrics.exists() and (tmp_path / "metrics.jsonl.1").stat().st_size == 300
    runs = tmp_path / "wandb"
    for name in ("run-20260101_000000-old", "offline-run-20260101_000000-old", "run-20261125_000000-new"):
        (runs / name).mkdir(parents=True)
    old = time.time() - 30 * 86400
    for name in ("run-20260101_000000-old", "offline-run-20260101_000000-old"):
        os.utime(runs / name, (old, old))
    removed = sorted(path.name for path in prune_wandb_runs(tmp_path, max_age_days=14))
    assert removed == ["offline-run-20260101_000000-old", "run-20260101_000000-old"]
    assert (runs / "run-20261125_000000-new").exists()


def test_out_of_memory_backs_off_to_a_smaller_micro_batch_with_the_same_effective_batch(
        crawler_table, make_settings, tmp_path, monkeypatch, capsys):
    """A real torch.OutOfMemoryError from every forward over more than 2 rows: the run retries at micro-batch
    4, then 2 (accumulation 2, then 4), trains every row once, and later cycles start at 2."""
    insert_stdlib_rows(crawler_table, start=0, count=40)
    settings = make_settings(crawler_table, extra=(
        "[training]\nbatch_size = 8\ngradient_accumulation_steps = 1\nlearning_rate = 5e-3\nlogging_steps = 1\n"
        "gradient_checkpointing = true\n"
    ))
    config = str(tmp_path / "codelupe.toml")
    monkeypatch.setenv("CODELUPE_FAULT", "oom-above:2")
    assert main(["run-once", "--config", config, "--force"]) == 0
    state = load_state(settings.paths.state_file)
    assert state.last_run["oom_backoffs"] == 2 and state.last_run["micro_batch"] == 2
    backed_off_at = state.micro_batch.pop("backed_off_at")
    assert state.micro_batch == {"micro": 2, "max_length": 256, "effective": 8}
    assert 0 <= time.time() - backed_off_at < 600
    capsys.readouterr()
    assert main(["status", "--config", config]) == 0
    assert "micro-batch:           2 of training.batch_size 8 (same effective batch): an out-of-memory on " in \
        capsys.readouterr().out
    monkeypatch.setenv("CODELUPE_TRAINING__GRADIENT_ACCUMULATION_STEPS", "2")  # another effective batch: not applied
    assert main(["status", "--config", config]) == 0
    assert "micro-batch:" not in capsys.readouterr().out
    monkeypatch.delenv("CODELUPE_TRAINING__GRADIENT_ACCUMULATION_STEPS")
    [run_file] = find_run_files(tmp_path)
    run = read_run(run_file)
    assert run.config["hyperparams/effective_micro_batch"] == 2
    assert run.config["hyperparams/effective_gradient_accumulation_steps"] == 4
    assert [value for _, value in run.values("performance/oom_backoffs")] == [2]
    assert all(value <= 8 * 256 for _, value in run.values("performance/tokens_per_step"))
    eligible = state.total_samples_trained + state.total_samples_held_out
    assert eligible > 0 and state.last_trained_id > 0

    insert_stdlib_rows(crawler_table, start=300, count=60, repo="more")
    assert main(["run-once", "--config", config, "--force"]) == 0
    again = load_state(settings.paths.state_file)
    assert again.total_training_runs == 2
    assert again.last_run["oom_backoffs"] == 0 and again.last_run["micro_batch"] == 2  # started at the size that fits
    assert again.micro_batch["backed_off_at"] == backed_off_at  # remembered since the back-off, not since this run

    # A day later, what ran out of memory may be gone (another process on the GPU): the configured size is tried
    # again, and, fitting now, the daemon no longer trains at a quarter of it for good.
    monkeypatch.delenv("CODELUPE_FAULT")
    raw = json.loads(settings.paths.state_file.read_text())
    raw["micro_batch"]["backed_off_at"] -= 25 * 3600
    settings.paths.state_file.write_text(json.dumps(raw))
    insert_stdlib_rows(crawler_table, start=400, count=40, repo="later")
    assert main(["run-once", "--config", config, "--force"]) == 0
    third = load_state(settings.paths.state_file)
    assert third.total_training_runs == 3
    assert third.last_run["oom_backoffs"] == 0 and third.last_run["micro_batch"] == 8
    assert third.micro_batch is None
    assert main(["status", "--config", config]) == 0
    assert "micro-batch:" not in capsys.readouterr().out


def test_out_of_memory_at_micro_batch_1_is_one_clear_failure(crawler_table, make_settings, tmp_path, monkeypatch):
    insert_stdlib_rows(crawler_table, start=0, count=20)
    settings = make_settings(crawler_table)
    monkeypatch.setenv("CODELUPE_FAULT", "oom-above:0")
    assert main(["run-once", "--config", str(tmp_path / "codelupe.toml"), "--force"]) == 1
    state = load_state(settings.paths.state_file)
    assert "out of GPU memory even at micro-batch 1" in state.last_error and state.last_trained_id == 0


def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_saves_nothing(crawler_table, make_settings, tmp_path):
    insert_stdlib_rows(crawler_table, start=0, count=30)
    settings = make_settings(crawler_table, extra=(
        "[training]\nbatch_size = 4\ngradient_accumulation_steps = 4\nlearning_rate = 1e30\nmax_grad_norm = 0\n"
        "logging_steps = 1\nepochs = 50\ngradient_checkpointing = true\n"
    ))
    assert main(["run-once", "--config", str(tmp_path / "codelupe.toml"), "--force"]) == 1
    state = load_state(settings.paths.state_file)
    assert "NaN or infinite at step" in state.last_error and state.last_trained_id == 0
    step = int(state.last_error.split("at step ")[1].split(";")[0])
    assert step < 20  # stopped there, not 50 epochs later
    assert not (settings.paths.output_dir / "run-000001").exists()


def test_the_daemon_records_a_failure_only_under_the_trainer_lock(tmp_path, monkeypatch):
    """A run-once holding the lock may be saving its state: the daemon must not overwrite it."""
    from codelupe_trainer.config import load_settings
    from codelupe_trainer.lock import trainer_lock
    from codelupe_trainer.service.scheduler import Daemon

    monkeypatch.setenv("CODELUPE_PATHS__STATE_FILE", str(tmp_path / "state.json"))
    settings = load_settings(None)
    daemon = Daemon(settings)
    with trainer_lock(settings.paths.state_file):
        daemon._record_failure("cycle process died with exit code -9")
    assert load_state(settings.paths.state_file).total_failures == 0
    daemon._record_failure("cycle process died with exit code -9")
    assert load_state(settings.paths.state_file).total_failures == 1


def test_an_unexpected_failure_is_one_line_with_its_traceback_kept_beside_the_state(
        crawler_table, make_settings, tiny_model, tmp_path, monkeypatch, caplog, capsys):
    """A bug (here an injected RuntimeError mid-training) stays one ERROR line in the log, and that line says
    where its traceback is; an expected failure, whose message says what to change, writes none."""
    from conftest import TEST_PASSWORD

    insert_stdlib_rows(crawler_table, start=0, count=30)
    settings = make_settings(crawler_table)
    config = str(tmp_path / "codelupe.toml")
    saved = tmp_path / "last-failure.txt"
    monkeypatch.setenv("CODELUPE_FAULT", "train:error")
    caplog.set_level(logging.INFO)
    assert main(["run-once", "--config", config, "--force"]) == 1
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == [f"run failed: InjectedFault: injected fault at train (traceback in {saved})"]
    assert "Traceback" not in capsys.readouterr().err
    text = saved.read_text()
    assert "Traceback (most recent call last)" in text and "in crash_point" in text and "InjectedFault" in text
    assert saved.stat().st_mode & 0o777 == 0o600
    assert TEST_PASSWORD in settings.database.url.get_secret_value() and TEST_PASSWORD not in text
    assert load_state(settings.paths.state_file).last_error == "InjectedFault: injected fault at train"

    # Expected: a TrainingError names what to change; nothing new is written, the line has no pointer. (A
    # tokenizer file that is there but empty: found only when the cycle loads it.)
    from tokenizers import Tokenizer, models

    saved.unlink()
    monkeypatch.delenv("CODELUPE_FAULT")
    damaged = tmp_path / "damaged-model"
    shutil.copytree(tiny_model, damaged)
    Tokenizer(models.BPE()).save(str(damaged / "tokenizer.json"))
    monkeypatch.setenv("CODELUPE_MODEL__BASE_MODEL", str(damaged))
    caplog.clear()
    assert main(["run-once", "--config", config, "--force"]) == 1
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and "is empty" in errors[0] and "traceback" not in errors[0], errors
    assert not saved.exists()


def test_a_saved_traceback_keeps_no_secret(tmp_path, monkeypatch):
    from codelupe_trainer.config import load_settings
    from codelupe_trainer.failures import describe, save_traceback

    dsn = "host=127.0.0.1 user=trainer password=hunter22 dbname=code"
    monkeypatch.setenv("CODELUPE_DATABASE__URL", dsn)
    monkeypatch.setenv("WANDB_API_KEY", "wandb-key-0123456789abcdef")
    monkeypatch.setenv("HF_TOKEN", "hf_TokenOfAGatedModel42")
    monkeypatch.setenv("CODELUPE_PATHS__STATE_FILE", str(tmp_path / "state" / "state.json"))
    settings = load_settings(None)
    try:
        raise ValueError(f"a library quoting its arguments: {dsn!r}, api_key=wandb-key-0123456789abcdef, "
                         "headers={'authorization': 'Bearer hf_TokenOfAGatedModel42'}")
    except ValueError as error:
        path = save_traceback(settings, error)
        line = describe(error)
    assert path == tmp_path / "state" / "last-failure.txt"
    text = path.read_text()
    assert "hunter22" not in text and "wandb-key-0123456789abcdef" not in text and "hf_TokenOfAGatedModel42" not in text
    assert "password=***" in text and "api_key=***" in text and "Bearer ***" in text and "Traceback (most recent call last)" in text
    assert line.endswith(f"(traceback in {path})") and line.startswith("ValueError: a library quoting")


@pytest.mark.parametrize(("hours_ago", "processes", "starts_at"), [
    (1, 1, 2),     # within the day: the size that fits
    (25, 1, 8),    # a day later: the configured size again (it backs off again within the run if need be)
    (25, 2, 2),    # several processes keep it: each try that failed again would cost a failed cycle
])
def test_a_backed_off_micro_batch_is_kept_for_a_day_then_the_configured_size_is_tried_again(hours_ago, processes,
                                                                                           starts_at):
    from codelupe_trainer.config import TrainingSettings
    from codelupe_trainer.training.backoff import memory_record, start_micro_batch

    training = TrainingSettings(batch_size=8, gradient_accumulation_steps=1, num_processes=processes)
    now = time.time()
    remembered = memory_record(training, 256, 2, now - hours_ago * 3600)
    assert start_micro_batch(remembered, training, 256, now) == starts_at
    # Measured for another effective batch or length, it does not apply at all.
    assert start_micro_batch(remembered, training.model_copy(update={"gradient_accumulation_steps": 2}), 256, now) == 8
    assert start_micro_batch(remembered, training, 512, now) == 8
