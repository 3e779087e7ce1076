"""Shared fixtures: a real PostgreSQL database per test, a tiny Qwen2 model, settings in a temp folder."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from codelupe_trainer.config import load_settings  # noqa: E402
from codelupe_trainer.demo.demo import crawler_rows, create_table, insert_rows, standard_library_files  # noqa: E402
from codelupe_trainer.demo.pgserver import start_throwaway_postgres, wait_for_postgres  # noqa: E402

# W&B never talks to a server from the tests, and keeps its own files out of ~.
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("WANDB_LOG_MODEL", None)
for name in ("CODELUPE_CONFIG", "CODELUPE_DATABASE__URL"):
    os.environ.pop(name, None)

# The password in the test DSNs: trust auth ignores it, so it is only there to prove it never leaks.
TEST_PASSWORD = "Sup3rSecretPw-xyz"


@pytest.fixture(scope="session", autouse=True)
def wandb_sandbox(tmp_path_factory):
    home = tmp_path_factory.mktemp("wandb-home")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        os.environ[name] = str(home / name.lower())
    os.environ["NETRC"] = str(home / "no-netrc")
    yield


@pytest.fixture(scope="session")
def server_url():
    """CODELUPE_TEST_DATABASE_URL when set, else a throwaway server for the whole session."""
    url = os.environ.get("CODELUPE_TEST_DATABASE_URL")
    if url:
        wait_for_postgres(url)
        yield url
        return
    server = start_throwaway_postgres()
    wait_for_postgres(server.url)
    yield server.url
    server.destroy()


def with_database(url: str, database: str, password: str | None = None) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = parts.netloc
    if password:
        userinfo, _, host = netloc.rpartition("@")
        user = (userinfo.split(":", 1)[0] or "postgres") if userinfo else "postgres"
        netloc = f"{user}:{password}@{host}"
    return urlunsplit((parts.scheme, netloc, f"/{database}", parts.query, parts.fragment))


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new database on the server, dropped afterwards; its URL carries a (harmless) password."""
    name = f"codelupe_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(server_url, name, TEST_PASSWORD)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(server_url):
    """A fresh database per test."""
    with fresh_database(server_url) as url:
        yield url


@pytest.fixture
def crawler_table(db_url):
    with psycopg.connect(db_url, autocommit=True) as connection:
        create_table(connection)
    return db_url


def insert_stdlib_rows(url: str, start: int, count: int, repo: str = "cpython") -> int:
    """Insert `count` real standard-library files (by position in the sorted file list)."""
    rows = list(crawler_rows(standard_library_files(start + count * 3), repo_name=repo))[start : start + count]
    with psycopg.connect(url, autocommit=True) as connection:
        return insert_rows(connection, rows)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from codelupe_trainer.demo.tinymodel import build_tiny_model

    directory = tmp_path_factory.mktemp("tiny-qwen2")
    corpus = [path.read_text(encoding="utf-8", errors="replace") for path in standard_library_files(200)]
    return build_tiny_model(directory, corpus)


@pytest.fixture(scope="session")
def learned_model(tmp_path_factory, tiny_model):
    """The tiny model after a few seconds of full training on Python and C, so a LoRA run on it can measurably
    help or hurt (the random-init model sits at the uniform loss, where nothing gets worse)."""
    import shutil

    from codelupe_trainer.demo.tinymodel import pretrain_tiny_model

    directory = tmp_path_factory.mktemp("learned-qwen2")
    shutil.copytree(tiny_model, directory, dirs_exist_ok=True)
    python = [path.read_text(encoding="utf-8", errors="replace") for path in standard_library_files(100)]
    c_code = [path.read_text(encoding="utf-8", errors="replace") for path in sorted(Path("/usr/include").glob("*.h"))[:60]]
    return pretrain_tiny_model(directory, python + c_code, steps=150)


def write_config(directory: Path, model_dir: Path, extra: str = "") -> Path:
    """A small, fast configuration in the production shape (gradient accumulation 4, gradient checkpointing,
    by epochs as shipped; tests of a step budget set max_steps); `extra` TOML sections replace these defaults."""
    sections = {
        "schedule": "min_new_samples = 10",
        "data": "max_length = 256\nmax_samples_per_run = 400\neval_fraction = 0.1\nmin_quality = 70",
        "model": f'base_model = "{model_dir}"\nquantization = "none"\nlora_r = 4\nlora_alpha = 8\nlora_dropout = 0.0',
        "training": "batch_size = 4\ngradient_accumulation_steps = 4\nlearning_rate = 5e-3\nmax_steps = -1\nlogging_steps = 2\ngradient_checkpointing = true",
        "metrics": "system_every_steps = 2\ngradient_metrics_every_steps = 2\nper_layer_sample = 4",
        "wandb": f'mode = "offline"\ndir = "{directory}"\ninit_timeout_s = 60',
        "paths": f'state_file = "{directory / "state.json"}"\noutput_dir = "{directory / "adapters"}"',
        # The gate, the holdout and replay have their own tests (test_promotion.py), in the shipped shape.
        "promotion": 'mode = "always"\nholdout_samples = 0\nreplay_fraction = 0.0',
    }
    current = None
    for line in extra.strip().splitlines():
        if line.strip().startswith("["):
            current = line.strip()[1:-1]
            sections[current] = ""
        elif current:
            sections[current] += line + "\n"
    text = "\n".join(f"[{name}]\n{body}\n" for name, body in sections.items())
    path = directory / "codelupe.toml"
    path.write_text(text)
    return path


@pytest.fixture
def make_settings(tmp_path, tiny_model, monkeypatch):
    def factory(url: str, extra: str = "", model_dir: Path | None = None):
        monkeypatch.setenv("CODELUPE_DATABASE__URL", url)
        return load_settings(write_config(tmp_path, model_dir or tiny_model, extra))

    return factory


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run wherever CUDA exists and are skipped elsewhere (they never make a GPU necessary)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
