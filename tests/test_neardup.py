"""Near-duplicate filtering (MinHash LSH over 5-token shingles) on real code: which edits of a trained file
are caught, across a restart, within a run, and against the holdout; counts read back from W&B."""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path

import psycopg
import pytest
from conftest import insert_stdlib_rows
from wandb_reader import find_run_files, read_run

from codelupe_trainer.cycle import run_cycle
from codelupe_trainer.data.neardup import NearDuplicateIndex, shingle_hashes
from codelupe_trainer.demo.demo import insert_rows
from codelupe_trainer.state import load_state

STDLIB = Path(sysconfig.get_paths()["stdlib"])
ORIGINAL = (STDLIB / "colorsys.py").read_text()
OTHER = (STDLIB / "bisect.py").read_text()
APACHE = ('# Copyright (c) 2024 Example Corp.\n# Licensed under the Apache License, Version 2.0 (the "License");\n'
          '# you may not use this file except in compliance with the License.\n')


def changed_header(text: str) -> str:
    return APACHE + text.split("\n", 3)[3]


def renamed_locals(text: str) -> str:
    return re.sub(r"\bsumc\b", "total", re.sub(r"\brangec\b", "spread", text))


def reordered_functions(text: str) -> str:
    head, *functions = re.split(r"(?m)^(?=def )", text)
    return head + "".join(reversed(functions))


def substantially_changed(text: str) -> str:
    """The same file's first half, the rest rewritten (here: another module's code)."""
    return text[: len(text) // 2] + OTHER


def test_shingles_ignore_formatting_and_punctuation():
    assert (shingle_hashes("def f(a, b):\n    return a+b\n").tolist()
            == shingle_hashes("def f( a,b ) :\n\treturn a + b").tolist())
    assert shingle_hashes("x").size == 1 and shingle_hashes("  ;; ").size == 0


@pytest.mark.parametrize("variant, blocked", [
    (changed_header, True),
    (renamed_locals, True),
    (reordered_functions, True),
    (lambda text: OTHER, False),
    (substantially_changed, False),
])
def test_which_edits_are_near_duplicates(variant, blocked):
    index = NearDuplicateIndex(None, threshold=0.7)
    assert index.seen(ORIGINAL) is False
    assert index.seen(variant(ORIGINAL)) is blocked


def test_changing_the_threshold_starts_a_new_index(tmp_path):
    connection = sqlite3.connect(tmp_path / "store.sqlite3", isolation_level=None)
    index = NearDuplicateIndex(connection, threshold=0.7)
    index.seen(ORIGINAL)
    connection.execute("BEGIN IMMEDIATE")
    index.write_pending()
    connection.execute("COMMIT")
    assert len(index) > 0 and NearDuplicateIndex(connection, threshold=0.7).seen(ORIGINAL)
    assert len(NearDuplicateIndex(connection, threshold=0.8)) == 0  # keys of another shape match nothing


def insert_files(url: str, files: list[tuple[str, str]]) -> None:
    rows = [(1, name, name, text, "python", text.count("\n") + 1, len(text.encode()),
             hashlib.sha256(text.encode()).hexdigest(), "repo", 70) for name, text in files]
    with psycopg.connect(url, autocommit=True) as connection:
        insert_rows(connection, rows)


@pytest.mark.slow
def test_near_duplicates_are_blocked_across_a_restart_within_a_run_and_against_the_holdout(
        crawler_table, tmp_path, make_settings):
    url = crawler_table
    insert_files(url, [("colorsys.py", ORIGINAL)])
    insert_stdlib_rows(url, start=0, count=40)
    settings = make_settings(url, "[promotion]\nmode = \"gate\"\nholdout_samples = 3\nholdout_min_per_language = 3\n"
                                  "replay_fraction = 0.0\n")
    assert run_cycle(settings, force=True).status == "trained"
    with sqlite3.connect(settings.paths.state_file.parent / "dedup.sqlite3") as store:
        holdout = [row[0] for row in store.execute("SELECT id FROM holdout ORDER BY id")]
        holdout_id = holdout[0]
        assert store.execute("SELECT count(*) FROM near_keys").fetchone()[0] > 0
    with psycopg.connect(url) as connection:
        holdout_text, colorsys_id = connection.execute(
            "SELECT (SELECT content FROM processed_files WHERE id = %s), (SELECT id FROM processed_files "
            "WHERE relative_path = 'colorsys.py')", (holdout_id,)).fetchone()
    assert colorsys_id not in holdout  # colorsys was trained, not held out (else this test proves less)

    new_file = (STDLIB / "sched.py").read_text()
    insert_files(url, [
        ("colorsys-relicensed.py", changed_header(ORIGINAL)),
        ("colorsys-renamed.py", renamed_locals(ORIGINAL)),
        ("colorsys-reordered.py", reordered_functions(ORIGINAL)),
        ("bisect.py", OTHER),
        ("colorsys-v2.py", substantially_changed(ORIGINAL)),
        ("sched.py", new_file),
        ("sched-copy.py", "# vendored copy\n" + new_file.replace("    ", "  ")),  # same run: the first by id stays
        ("holdout-copy.py", "# a fork\n" + holdout_text),  # leaks the evaluation if trained
    ])
    # A restart: a new process opens the store.
    environment = dict(os.environ, CODELUPE_DATABASE__URL=url)
    completed = subprocess.run([sys.executable, "-m", "codelupe_trainer.cli", "run-once", "--force", "--config",
                                str(tmp_path / "codelupe.toml")], capture_output=True, text=True, env=environment,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "5 near duplicates" in completed.stdout, completed.stdout
    state = load_state(settings.paths.state_file)
    assert state.last_run["blocked"]["near_duplicates"] == 5
    run = read_run(find_run_files(tmp_path)[-1])
    assert run.values("data/blocked_near_duplicates")[-1][1] == 5
    assert run.values("data/blocked_near_duplicates_python")[-1][1] == 5
    # Passed: the genuinely different file, the substantially changed version, and the first sched.py.
    assert run.values("data/total_samples")[-1][1] + run.values("data/holdout_rows")[-1][1] == 3


def test_signing_ahead_in_a_second_process_decides_exactly_as_inline(tmp_path, monkeypatch):
    from codelupe_trainer.data import neardup
    from codelupe_trainer.data.neardup import CHUNK, signed_ahead
    from codelupe_trainer.data.records import Sample

    # Small enough that this run's keys spill to disk in the middle of a chunk.
    monkeypatch.setattr(neardup, "PENDING_IN_MEMORY", 500)
    files = [path.read_text(encoding="utf-8", errors="replace") for path in sorted(STDLIB.glob("*.py"))[:60]]
    texts = []
    for index in range(CHUNK * 2 + 300):  # three chunks: read-ahead, hand-over and the short tail
        text = files[index % len(files)]
        texts.append(text if index % 3 else f"# copy {index}\n{text}")  # many near-copies, across chunks
    samples = [Sample(index + 1, text, "python", 80) for index, text in enumerate(texts)]

    def stored_index(name: str) -> NearDuplicateIndex:
        """An index whose store already holds a few files from an earlier run."""
        connection = sqlite3.connect(tmp_path / name, isolation_level=None)
        index = NearDuplicateIndex(connection, 0.7)
        for text in files[:5]:
            index.seen(text)
        connection.execute("BEGIN IMMEDIATE")
        index.write_pending()
        connection.execute("COMMIT")
        index.clear_pending()
        return index

    inline, ahead = stored_index("inline.sqlite3"), stored_index("ahead.sqlite3")
    expected = [inline.seen(sample.content) for sample in samples]
    got, signed_elsewhere = [], 0
    for sample in signed_ahead(samples, ahead):
        signed_elsewhere += sample.content in ahead.precomputed
        got.append(ahead.seen(sample.content))
    assert got == expected and sum(expected) > CHUNK
    assert expected[0] is True  # a near-copy of a file in the store, known from the start
    assert signed_elsewhere == len(samples)  # every signature came from the second process
    assert ahead._spilled and ahead.precomputed == {}
