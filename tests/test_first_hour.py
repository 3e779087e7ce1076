"""A new user's first hour, outside the happy path: one line and the right exit code, never a traceback."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import insert_stdlib_rows, write_config

QWEN_7B_CONFIG = {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "vocab_size": 152064,
                  "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
                  "tie_word_embeddings": False}
CLI = [sys.executable, "-m", "codelupe_trainer.cli"]
# A closed local port: the hub "cannot be reached" at once and the same way on every machine.
NO_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": "", "HF_HUB_OFFLINE": ""}


def run_cli(arguments: list[str], url: str, tmp_path: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CODELUPE_", "HF_", "WANDB_"))}
    env.update(CODELUPE_DATABASE__URL=url, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    env.update({key: value for key, value in extra.items() if value})
    env.setdefault("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return subprocess.run(CLI + arguments, env=env, capture_output=True, text=True, timeout=300)


def with_fake_torch(tmp_path: Path, url: str, body: str) -> dict[str, str]:
    """An environment whose `torch` is a stand-in running `body` on import: a poisoned one proves a path never
    imports torch (-X importtime would be noisy), a raising one plays a broken install."""
    fake = tmp_path / "fake-torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(body + "\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("CODELUPE_")}
    env.update(CODELUPE_DATABASE__URL=url, PYTHONPATH=f"{fake}:{Path(__file__).resolve().parent.parent}")
    return env


POISONED_TORCH = "raise SystemExit('torch was imported')"


@pytest.mark.slow
def test_a_hub_model_that_cannot_be_downloaded_is_one_line(crawler_table, tiny_model, tmp_path):
    insert_stdlib_rows(crawler_table, start=0, count=20)
    config = write_config(tmp_path, tiny_model, '[model]\nbase_model = "Qwen/Qwen2.5-Coder-7B-Instruct"\n')
    completed = run_cli(["run-once", "--force", "--config", str(config)], crawler_table, tmp_path, **NO_HUB)
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    errors = [line for line in completed.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "is not in the local Hugging Face cache and the hub cannot be reached" in errors[0]


def test_doctor_says_whether_a_hub_model_is_cached(crawler_table, tiny_model, tmp_path):
    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--Qwen--Qwen2.5-Coder-7B-Instruct" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(QWEN_7B_CONFIG))
    (cache / "models--Qwen--Qwen2.5-Coder-7B-Instruct" / "refs").mkdir()
    (cache / "models--Qwen--Qwen2.5-Coder-7B-Instruct" / "refs" / "main").write_text("0123abc")
    config = write_config(tmp_path, tiny_model, '[model]\nbase_model = "Qwen/Qwen2.5-Coder-7B-Instruct"\n')
    cached = run_cli(["doctor", "--config", str(config)], crawler_table, tmp_path, **NO_HUB)
    assert "ok   model: hub id 'Qwen/Qwen2.5-Coder-7B-Instruct', in the local Hugging Face cache" in cached.stdout
    assert "ok   memory estimate: ~" in cached.stdout  # from the cached config.json

    config = write_config(tmp_path, tiny_model, '[model]\nbase_model = "Qwen/Not-Downloaded"\n')
    missing = run_cli(["doctor", "--config", str(config)], crawler_table, tmp_path, **NO_HUB)
    assert missing.returncode == 1
    assert "FAIL model: model.base_model 'Qwen/Not-Downloaded' is not in the local Hugging Face cache" in missing.stdout


class FakeHub:
    """A local stand-in for huggingface.co answering as it does: `acme/coder` serves its config.json, a gated
    repository refuses without an accepted licence, anything else is `RepoNotFound` (what the hub says for a
    typo and, without a token, for a private repository); a token other than `hf_good` is refused outright."""

    def __init__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self):
                if self.headers.get("Authorization", "Bearer hf_good") != "Bearer hf_good":
                    status, headers = 401, {"X-Error-Message": "Invalid credentials in Authorization header"}
                elif self.path.startswith("/acme/coder/resolve/main/config.json"):
                    status, headers = 200, {"ETag": '"c0ffee"', "X-Repo-Commit": "0" * 40}
                elif self.path.startswith("/acme/gated/"):
                    status, headers = 401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted"}
                else:
                    status, headers = 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
                body = b"{}"
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            do_GET = do_HEAD = answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_a_hub_id_the_hub_does_not_serve_is_named_by_doctor_and_the_cycle_in_one_line(crawler_table, tiny_model,
                                                                                    tmp_path):
    """A typo in model.base_model (or a private model without a token): transformers found out only once the
    cycle began loading, with a multi-line OSError the cycle took for a bug (a traceback file each cycle), and
    `doctor` said the first run would download it. Now `doctor` FAILs naming it, and the cycle fails in one
    line before anything loads; nothing is consumed."""
    hub = FakeHub()
    try:
        insert_stdlib_rows(crawler_table, start=0, count=20)
        expected = {
            "acme/codr": "model.base_model 'acme/codr' is not a model on the Hugging Face hub, or is a private one",
            "acme/gated": "model.base_model 'acme/gated' is a gated model on the Hugging Face hub: accept its terms",
        }
        for model, message in expected.items():
            config = write_config(tmp_path, tiny_model, f'[model]\nbase_model = "{model}"\n')
            doctor = run_cli(["doctor", "--config", str(config)], crawler_table, tmp_path, HF_ENDPOINT=hub.url)
            assert doctor.returncode == 1 and f"FAIL model: {message}" in doctor.stdout, doctor.stdout
        once = run_cli(["run-once", "--config", str(config)], crawler_table, tmp_path, HF_ENDPOINT=hub.url)
        errors = [line for line in once.stderr.splitlines() if " ERROR " in line]
        assert once.returncode == 1 and len(errors) == 1 and message in errors[0], once.stderr
        assert "traceback in" not in errors[0] and not (tmp_path / "last-failure.txt").exists()
        assert "HTTP Request" not in once.stderr  # huggingface_hub's client logs each request at INFO
        assert json.loads((tmp_path / "state.json").read_text())["last_trained_id"] == 0

        config = write_config(tmp_path, tiny_model, '[model]\nbase_model = "acme/coder"\n')
        doctor = run_cli(["doctor", "--config", str(config)], crawler_table, tmp_path, HF_ENDPOINT=hub.url)
        assert "ok   model: hub id 'acme/coder', not in the local cache yet: the first run downloads it" in doctor.stdout
        # A token the hub does not know: it refuses even a public model, so the download would fail each cycle.
        doctor = run_cli(["doctor", "--config", str(config)], crawler_table, tmp_path, HF_ENDPOINT=hub.url,
                         HF_TOKEN="hf_revoked")
        assert "FAIL model: the Hugging Face hub refused HF_TOKEN (invalid credentials)" in doctor.stdout, doctor.stdout
        assert "hf_revoked" not in doctor.stdout + doctor.stderr
    finally:
        hub.close()


def test_run_once_names_a_missing_table_before_loading_torch(db_url, tiny_model, tmp_path):
    config = write_config(tmp_path, tiny_model)
    completed = subprocess.run(CLI + ["run-once", "--config", str(config)], capture_output=True, text=True,
                               env=with_fake_torch(tmp_path, db_url, POISONED_TORCH), timeout=120)
    assert completed.returncode == 2, completed.stderr
    assert "table 'processed_files' does not exist" in completed.stderr and "torch was imported" not in completed.stderr


@pytest.mark.slow
def test_a_model_without_its_tokenizer_never_consumes_rows(crawler_table, tiny_model, tmp_path, monkeypatch):
    # Without tokenizer files transformers builds an empty tokenizer from config.json alone, without a word:
    # every file of code read as no tokens, "trained" in no step, and the rows counted as consumed.
    from codelupe_trainer.config import load_settings
    from codelupe_trainer.cycle import run_cycle
    from codelupe_trainer.errors import TrainingError
    from codelupe_trainer.state import load_state
    from codelupe_trainer.training.model import load_tokenizer

    insert_stdlib_rows(crawler_table, start=0, count=20)
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bare / name).unlink(missing_ok=True)
    config = write_config(tmp_path, bare)
    completed = run_cli(["run-once", "--config", str(config)], crawler_table, tmp_path)
    assert completed.returncode == 2, completed.stderr  # a setting to fix, as `run` says at start
    assert "has no tokenizer (tokenizer.json, or vocab.json and merges.txt)" in completed.stderr
    assert "Traceback" not in completed.stderr
    doctor = run_cli(["doctor", "--config", str(config)], crawler_table, tmp_path)
    assert doctor.returncode == 1 and "FAIL model: model.base_model" in doctor.stdout
    # The daemon's cycle (files removed while it runs): a failed cycle, nothing advanced.
    monkeypatch.setenv("CODELUPE_DATABASE__URL", crawler_table)
    settings = load_settings(config)
    with pytest.raises(TrainingError, match="has no tokenizer"):
        run_cycle(settings)
    assert load_state(settings.paths.state_file).last_trained_id == 0
    # A tokenizer file that is there but empty (damaged, or another model's stub) is caught at load.
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(bare / "tokenizer.json"))
    with pytest.raises(TrainingError, match="is empty"):
        load_tokenizer(str(bare))
    with pytest.raises(TrainingError, match="is empty"):
        run_cycle(settings)
    assert load_state(settings.paths.state_file).last_trained_id == 0


@pytest.mark.slow
def test_target_modules_that_the_model_lacks_are_named_before_it_loads(crawler_table, tiny_model, tmp_path, monkeypatch):
    # GPT-2-style names on a Qwen2 model: peft refuses it only after the model has loaded, with an error the
    # cycle took for a bug (a traceback file, every cycle). Some missing: peft leaves them out without a word.
    from codelupe_trainer.config import load_settings
    from codelupe_trainer.cycle import run_cycle
    from codelupe_trainer.errors import TrainingError
    from codelupe_trainer.state import load_state

    insert_stdlib_rows(crawler_table, start=0, count=20)
    config = write_config(tmp_path, tiny_model, '[model]\nbase_model = "%s"\nquantization = "none"\nlora_r = 4\n'
                                                'target_modules = ["c_attn", "c_proj"]\n' % tiny_model)
    doctor = run_cli(["doctor", "--config", str(config)], crawler_table, tmp_path)
    assert doctor.returncode == 1
    assert ("FAIL target_modules: model.target_modules = ['c_attn', 'c_proj'] names no linear layer of model.base_model"
            in doctor.stdout and "its layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in doctor.stdout)
    monkeypatch.setenv("CODELUPE_DATABASE__URL", crawler_table)
    settings = load_settings(config)
    with pytest.raises(TrainingError, match="names no linear layer"):
        run_cycle(settings)
    assert load_state(settings.paths.state_file).last_trained_id == 0
    assert not (tmp_path / "last-failure.txt").exists()

    config = write_config(tmp_path, tiny_model, '[model]\nbase_model = "%s"\nquantization = "none"\nlora_r = 4\n'
                                                'target_modules = ["q_proj", "v_proj", "c_fc"]\n' % tiny_model)
    doctor = run_cli(["doctor", "--config", str(config)], crawler_table, tmp_path)
    assert "warn target_modules: model.target_modules: c_fc not in model.base_model" in doctor.stdout
    assert "LoRA goes on the other 2 only" in doctor.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "package", "expected"), [
    ('[model]\nattn_implementation = "flash_attention_2"', "flash_attn", 'model.attn_implementation = "flash_attention_2" needs the flash-attn package'),
    ('[training]\nloss = "fused"', "liger_kernel", 'training.loss = "fused" needs Liger-Kernel'),
])
def test_a_setting_whose_package_is_missing_is_one_line_before_the_model_loads(crawler_table, tiny_model, tmp_path,
                                                                               monkeypatch, setting, package, expected):
    # transformers found out only after reading the weights (and, for the loss, evaluating the holdout), with
    # an ImportError the cycle took for a bug: a traceback file, every cycle.
    import importlib.util

    from codelupe_trainer.config import load_settings
    from codelupe_trainer.cycle import run_cycle
    from codelupe_trainer.errors import TrainingError

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here: nothing to refuse")  # the GPU box with the gpu extra
    insert_stdlib_rows(crawler_table, start=0, count=20)
    section, line = setting.split("\n")
    extra = {"[model]": f'[model]\nbase_model = "{tiny_model}"\nquantization = "none"\nlora_r = 4\n{line}\n',
             "[training]": f"[training]\nbatch_size = 4\ngradient_accumulation_steps = 4\n{line}\n"}[section]
    config = write_config(tmp_path, tiny_model, extra)
    doctor = run_cli(["doctor", "--config", str(config)], crawler_table, tmp_path)
    assert doctor.returncode == 1 and f"FAIL packages: {expected}" in doctor.stdout
    for command in ("run", "run-once"):
        started = run_cli([command, "--config", str(config)], crawler_table, tmp_path)
        assert started.returncode == 2 and expected in started.stderr, (command, started.stderr)
    monkeypatch.setenv("CODELUPE_DATABASE__URL", crawler_table)
    with pytest.raises(TrainingError, match=expected.split(" needs")[0][:20]):
        run_cycle(load_settings(config))
    assert not (tmp_path / "last-failure.txt").exists()


def test_cuda_only_settings_are_refused_on_a_machine_without_cuda(tiny_model):
    from codelupe_trainer.config import ModelSettings
    from codelupe_trainer.errors import TrainingError
    from codelupe_trainer.training.loss import resolve_loss
    from codelupe_trainer.training.model import load_base_model

    with pytest.raises(TrainingError, match="runs on CUDA only"):
        load_base_model(ModelSettings(base_model=str(tiny_model), attn_implementation="flash_attention_2"), "cpu")
    with pytest.raises(TrainingError, match="runs on CUDA only"):
        resolve_loss("fused", "cpu")
    assert resolve_loss("auto", "cpu") == "chunked"


def test_a_cycle_with_too_few_new_rows_ends_without_loading_torch(crawler_table, tiny_model, tmp_path):
    """The daemon's usual cycle while rows trickle in: count, say so, end. Loading the training stack for it
    cost ~10 s and ~0.4 GB every interval (benchmarks/idle_cycle.py)."""
    insert_stdlib_rows(crawler_table, start=0, count=20)
    config = write_config(tmp_path, tiny_model, "[schedule]\nmin_new_samples = 1000\n")
    completed = subprocess.run(CLI + ["run-once", "--config", str(config)], capture_output=True, text=True,
                               env=with_fake_torch(tmp_path, crawler_table, POISONED_TORCH), timeout=120)
    assert completed.returncode == 0, completed.stderr
    # (and why the rest are not eligible: the breakdown is a query, not a reason to load torch)
    assert re.search(r"\d+ eligible new samples \(of the 20 rows past id 0: .*\); waiting for 1000",
                     completed.stdout + completed.stderr), completed.stdout + completed.stderr


def test_a_torch_that_cannot_load_stops_the_daemon_at_start_in_one_line(crawler_table, tiny_model, tmp_path):
    """A broken torch install (a CUDA wheel missing its libraries) would fail every cycle: `run` says so at
    start, exit 2, from its GPU self-check's own process (the daemon's never loads torch); `doctor` names it in
    its torch line instead of ending in a traceback."""
    config = write_config(tmp_path, tiny_model)
    env = with_fake_torch(tmp_path, crawler_table, "raise ImportError('libcudart.so.12: cannot open shared object file')")
    completed = subprocess.run(CLI + ["run", "--config", str(config)], env=env, capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr
    assert "cannot start: torch cannot be imported (ImportError: libcudart.so.12: cannot open shared object" \
        in completed.stderr, completed.stderr

    doctor = subprocess.run(CLI + ["doctor", "--config", str(config)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert doctor.returncode == 1 and "Traceback" not in doctor.stdout + doctor.stderr, doctor.stderr
    assert "FAIL torch: torch cannot be imported (ImportError: libcudart.so.12" in doctor.stdout
    assert "ok   database: reachable" in doctor.stdout  # every other check still runs


def test_progress_off_a_terminal_is_a_line_at_the_start_the_end_and_every_minute(caplog):
    import logging

    from codelupe_trainer.report import ProgressLine

    caplog.set_level(logging.INFO, logger="codelupe_trainer.report")
    line = ProgressLine(interactive=False)
    for step in range(1, 41):
        line.update({"progress/step": step, "progress/total_steps": 40, "train/loss": 2.0 - step / 100,
                     "performance/tokens_per_second": 1500.0, "progress/step_percent": step * 2.5,
                     "progress/eta_minutes": (40 - step) / 60})
    lines = [record.getMessage() for record in caplog.records]
    assert lines == ["training: step 1/40 (2 %), loss 1.9900, 1,500 tokens/s, ETA 0.7 min",
                     "training: step 40/40 (100 %), loss 1.6000, 1,500 tokens/s, ETA 0.0 min"]


REPO = Path(__file__).resolve().parent.parent
SHIPPED = str(REPO / "config" / "codelupe.toml")


def not_utf8(directory: Path) -> str:
    path = directory / "latin1.toml"
    path.write_bytes(b"[data]\nmin_quality = 70 # \xff\xfe\n")
    return str(path)


def unknown_key(directory: Path) -> str:
    path = directory / "typo.toml"
    path.write_text("[data]\nmin_qualty = 70\n")
    return str(path)


def state_is_a_directory(directory: Path) -> str:
    (directory / "state.json").mkdir()  # as root every file is readable: a directory stands in for it
    return SHIPPED


def a_file_where_a_directory_goes(directory: Path) -> str:
    (directory / "a-file").write_text("")  # as root every directory is writable: a file stands in for one
    return SHIPPED


@pytest.mark.parametrize(("command", "config", "environment", "expected"), [
    ("status", lambda directory: str(directory), {}, "is a directory, not a TOML file"),
    ("status", not_utf8, {}, "not UTF-8 text"),
    ("status", unknown_key, {}, "data.min_qualty: unknown key"),
    ("status", lambda directory: str(directory / "codelupe.tmol"), {}, "does not exist"),
    ("status", None, {"CODELUPE_CONFIG": "/etc/codelupe-trainer/codelupe.tmol"}, "CODELUPE_CONFIG"),
    ("status", lambda directory: SHIPPED, {"CODELUPE_DATA__LANGUAGES": "python"}, "CODELUPE_DATA__"),
    ("status", lambda directory: SHIPPED, {"CODELUPE_DATA__MIN_QUALTY": "5"},
     "environment variable CODELUPE_DATA__MIN_QUALTY: unknown key data.min_qualty"),
    ("status", state_is_a_directory, {"CODELUPE_PATHS__STATE_FILE": "{directory}/state.json"}, "cannot read"),
    ("run-once", unknown_key, {}, "data.min_qualty: unknown key"),
    # Every cycle would fail, and the daemon warned every second that it could not write its live status.
    ("run-once", a_file_where_a_directory_goes, {"CODELUPE_PATHS__STATE_FILE": "{directory}/a-file/state.json"},
     "cannot run: paths.state_file: "),
    ("run", a_file_where_a_directory_goes, {"CODELUPE_PATHS__OUTPUT_DIR": "{directory}/a-file/adapters",
                                            "CODELUPE_DATABASE__URL": "postgresql://nobody@127.0.0.1:9/none"},
     "cannot start: paths.output_dir: "),  # (a database that is down is retried, not refused)
])
def test_each_first_hour_error_is_one_line_and_exit_2_from_the_real_cli(tmp_path, command, config, environment,
                                                                       expected):
    env = {key: value for key, value in os.environ.items() if not key.startswith("CODELUPE_")}
    env.update({key: value.format(directory=tmp_path) for key, value in environment.items()},
               PYTHONPATH=str(REPO))
    arguments = [command] + (["--config", config(tmp_path)] if config else [])
    completed = subprocess.run(CLI + arguments, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in completed.stderr, completed.stderr


@pytest.mark.slow
def test_the_shipped_config_trains_as_shipped_where_only_the_machine_differs(crawler_table, tiny_model, tmp_path):
    """`config/codelupe.toml` itself, every setting as shipped (max_length 2,048, batch 4 x accumulation 4,
    checkpointing, the gate with a 256-row holdout, replay, near-duplicates, W&B online), with only what this
    machine must change given as a user would (the database, a local model, writable paths): one cycle trains
    and promotes on a CPU, falling back where it must (no 4-bit, the chunked loss, W&B offline without a key),
    each fallback said once and nothing else warned about."""
    from wandb_reader import find_run_files, read_run

    from codelupe_trainer.state import load_state

    insert_stdlib_rows(crawler_table, start=0, count=80)
    shipped = Path(__file__).resolve().parent.parent / "config" / "codelupe.toml"
    completed = run_cli(["run-once", "--force", "--config", str(shipped)], crawler_table, tmp_path,
                        CODELUPE_MODEL__BASE_MODEL=str(tiny_model), CODELUPE_WANDB__DIR=str(tmp_path),
                        CODELUPE_PATHS__STATE_FILE=str(tmp_path / "state.json"),
                        CODELUPE_PATHS__OUTPUT_DIR=str(tmp_path / "adapters"))
    assert completed.returncode == 0, completed.stderr[-4000:]
    warnings = [line for line in completed.stderr.splitlines() if " WARNING " in line or " ERROR " in line]
    assert len(warnings) == 1 and "W&B mode is online but no API key is configured" in warnings[0], warnings
    assert "Traceback" not in completed.stderr
    state = load_state(tmp_path / "state.json")
    run = state.last_run
    assert state.total_training_runs == 1 and run["promoted"] and run["device"] == "cpu"
    assert run["quantization"] == "none" and run["packing"] == "position_ids" and run["micro_batch"] == 4
    assert state.total_samples_held_out > 0 and run["holdout_loss"] is not None  # the gate compared on a holdout
    assert state.total_samples_trained + state.total_samples_held_out + sum(run["skipped"].values()) \
        + sum(run["blocked"].values()) == run["rows_examined"] == 80
    [run_file] = find_run_files(tmp_path)
    config = read_run(run_file).config
    assert config["hyperparams/effective_gradient_accumulation_steps"] == 4
    assert config["hyperparams/effective_micro_batch"] == 4


def test_version_names_the_training_stack_in_one_line_without_importing_it(tmp_path):
    """What a bug report needs (the troubleshooting table asks for these versions), on a machine where torch
    would not even import: read from the packages' metadata, one line."""
    from importlib.metadata import version

    env = with_fake_torch(tmp_path, "postgresql://unused", POISONED_TORCH)
    completed = subprocess.run(CLI + ["--version"], env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0 and completed.stderr == "", completed.stderr
    [line] = completed.stdout.strip().splitlines()
    assert line.startswith(f"codelupe-trainer {version('codelupe-trainer')} (Python ")
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        assert f"{package} {version(package)}" in line


def test_a_model_download_is_progress_while_bytes_arrive_and_a_stall_once_they_stop(tmp_path, caplog):
    """The 7B's first download (~15 GB) can outlast service.cycle_stall_minutes on a slow line: the bytes
    arriving in the hub cache move the cycle's progress (what the stall watch reads, and `status` shows),
    and once they stop, the progress stops too, so a dead download is still ended as a stall."""
    import logging
    import threading
    import time

    from codelupe_trainer.config import Settings
    from codelupe_trainer.cycle import download_progress
    from codelupe_trainer.progress import read_cycle_progress

    caplog.set_level(logging.INFO)
    settings = Settings(database={"url": "postgresql://localhost/db"}, model={"base_model": "Qwen/Qwen2.5-Coder-7B"},
                        paths={"state_file": str(tmp_path / "state.json"), "output_dir": str(tmp_path / "adapters")})
    blobs = tmp_path / "hub" / "models--Qwen--Qwen2.5-Coder-7B" / "blobs"
    blobs.mkdir(parents=True)
    seen = []
    with download_progress(settings, 3, interval_s=0.1, cache_dir=tmp_path / "hub"):
        time.sleep(0.5)  # the watcher's first look (it imports huggingface_hub, as transformers has in a cycle)
        with (blobs / "0123abcd.5f3e1a2b.incomplete").open("wb") as partial:
            for _ in range(3):
                partial.write(b"\0" * 10_000_000)
                partial.flush()
                time.sleep(0.4)
                seen.append(read_cycle_progress(settings.paths.state_file))
        stalled = read_cycle_progress(settings.paths.state_file)
        time.sleep(0.5)  # no byte arrives: five looks, no progress
        assert read_cycle_progress(settings.paths.state_file) == stalled
    assert [progress["phase"] for progress in seen] == ["downloading model"] * 3
    assert [progress["downloaded_gb"] for progress in seen] == [0.01, 0.02, 0.03] and seen[0]["run"] == 3
    assert len({progress["updated_at"] for progress in seen}) == 3
    assert "downloading Qwen/Qwen2.5-Coder-7B: 0.0 GB so far" in caplog.text
    # A local directory downloads nothing: no watcher.
    local = settings.model_copy(update={"model": settings.model.model_copy(update={"base_model": str(tmp_path)})})
    assert not any(thread.name == "download-progress" for thread in threading.enumerate())
    with download_progress(local, 3):
        assert not any(thread.name == "download-progress" for thread in threading.enumerate())


CACHED_MODEL_LOAD = """
from pathlib import Path
from codelupe_trainer.config import ModelSettings
from codelupe_trainer.training.model import load_base_model, load_tokenizer

settings = ModelSettings(base_model="codelupe-test/tiny-qwen2", quantization="none")
tokenizer = load_tokenizer(settings.base_model)
model, _ = load_base_model(settings, "cpu")
report = {"cached": {"asked": list(asked), "vocab": len(tokenizer), "layers": model.config.num_hidden_layers}}
asked.clear()
(Path(sys.argv[1]) / "model.safetensors").unlink()  # an interrupted download: the weights are not there yet
try:
    load_base_model(settings, "cpu")
    report["incomplete"] = {"asked": list(asked), "error": None}
except OSError as error:
    report["incomplete"] = {"asked": list(asked), "error": str(error)[:300]}
print(json.dumps(report))
"""


def test_a_cached_hub_model_loads_without_asking_the_hub_and_an_incomplete_one_asks_for_the_rest(tmp_path, tiny_model):
    """A model in the local Hugging Face cache is loaded from it alone: no request to the hub, so a hub outage
    costs nothing (left to transformers, 56 requests and minutes of retries against a hub answering 5xx:
    benchmarks/cached_model_load.py) and a revision pushed to the hub never replaces the base under the
    adapter in service. A model whose download was interrupted still asks the hub for what is missing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cached_model_load", REPO / "benchmarks" / "cached_model_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    snapshot = bench.cache_as_downloaded(Path(tiny_model), tmp_path / "hub", "codelupe-test/tiny-qwen2")
    # The stand-in answers 404 (the hub has nothing): no retries, so the test stays quick.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CODELUPE_", "HF_"))}
    env |= {"PYTHONPATH": str(REPO), "HUB_STATUS": "404", "STAND_IN_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-c", bench.HUB_STAND_IN + CACHED_MODEL_LOAD, str(snapshot)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # About the model: nothing (huggingface_hub's own once-a-day registry fetch is not about it).
    assert [request for request in report["cached"]["asked"] if "tiny-qwen2" in request] == []
    assert report["cached"]["layers"] >= 1 and report["cached"]["vocab"] > 100
    incomplete = report["incomplete"]
    assert any("tiny-qwen2" in request for request in incomplete["asked"]), incomplete
    assert incomplete["error"], "nothing to download from this hub: the load fails, and the next cycle tries again"


@pytest.mark.slow
def test_a_crawler_that_scores_0_to_1_is_told_why_nothing_trains_and_trains_once_min_quality_is_on_its_scale(
        crawler_table, make_settings, tmp_path, capsys, monkeypatch):
    """Scores of 0-1 (a `real` column, as many scorers write) against the shipped data.min_quality = 70: every row
    is skipped, and the daemon said "0 eligible new samples; waiting for 10" each cycle and doctor passed every
    check, for ever. Now both say why, naming the setting, and a fractional min_quality trains them; a `real`
    0.7 (0.69999999 in float8) is not below a min_quality of 0.7."""
    import psycopg

    from codelupe_trainer.cli import main
    from codelupe_trainer.state import load_state

    insert_stdlib_rows(crawler_table, start=0, count=30)
    with psycopg.connect(crawler_table, autocommit=True) as connection:
        connection.execute("ALTER TABLE processed_files ALTER COLUMN quality_score TYPE real USING quality_score / 100.0")
        scored = connection.execute("SELECT count(*) FILTER (WHERE quality_score >= 0.7::real), max(quality_score)::float8 "
                                    "FROM processed_files").fetchone()
    assert scored[0] >= 10 and scored[1] <= 1
    settings = make_settings(crawler_table, extra="[training]\nbatch_size = 4\ngradient_accumulation_steps = 4\n"
                                                  "max_steps = 1\ngradient_checkpointing = true\n")
    assert settings.data.min_quality == 70
    config = str(tmp_path / "codelupe.toml")
    assert main(["run-once", "--config", config]) == 0
    said = capsys.readouterr().out
    assert "0 eligible new samples (of the 30 rows past id 0: 30 below data.min_quality = 70; " in said
    assert "set data.min_quality on that scale, such as 0.7); waiting for 10" in said
    assert not settings.paths.state_file.exists()  # nothing consumed
    assert main(["doctor", "--config", config]) == 0
    doctor = capsys.readouterr().out
    [rows_line] = [line for line in doctor.splitlines() if " rows: " in line]
    assert rows_line.startswith("warn rows: 0 eligible new rows past id 0") and "such as 0.7" in rows_line

    monkeypatch.setenv("CODELUPE_DATA__MIN_QUALITY", "0.7")
    assert main(["doctor", "--config", config]) == 0
    [rows_line] = [line for line in capsys.readouterr().out.splitlines() if " rows: " in line]
    assert rows_line.startswith("ok   rows: at least 10 eligible new rows past id 0")
    assert main(["run-once", "--config", config]) == 0
    state = load_state(settings.paths.state_file)
    assert state.total_samples_trained > 0 and state.last_trained_id > 0
    [dataset] = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
                 if "data/avg_quality_score" in line]
    assert 0.69 < dataset["data/avg_quality_score"] <= 1  # the scorer's scale, not truncated to 0
