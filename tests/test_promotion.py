"""The promotion gate, the fixed holdout, replay, lineage, rollback and the on_promote hand-off, on real parts:
PostgreSQL, the tiny Qwen2 model trained for real (gradient accumulation 4, gradient checkpointing), the
real CLI as a subprocess, and the W&B run read back from its `.wandb` file."""

from __future__ import annotations

import hashlib
from collections import Counter
import json
import socket
import stat
import math
import os
import random
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from conftest import TEST_PASSWORD, insert_stdlib_rows
from wandb_reader import find_run_files, read_run

from codelupe_trainer.config import PromotionSettings
from codelupe_trainer.cycle import run_cycle
from codelupe_trainer.data.filters import content_hash
from codelupe_trainer.demo.demo import insert_rows
from codelupe_trainer.promotion import (comparable_anchors, decide_promotion, holdout_metrics, overall_loss,
                                       update_anchors)
from codelupe_trainer.state import load_state

# ------------------------------------------------------------------ the decision, table-style

GATE = PromotionSettings(mode="gate", max_loss_increase=0.01, max_language_loss_increase=0.03)


@pytest.mark.parametrize("in_use, candidate, promoted, reason_part", [
    ({"python": (2.0, 100)}, {"python": (1.9, 100)}, True, "2.0000 -> 1.9000"),
    ({"python": (2.0, 100)}, {"python": (2.019, 100)}, True, "2.0000 -> 2.0190"),  # within 1 %
    ({"python": (2.0, 100)}, {"python": (2.03, 100)}, False, "more than promotion.max_loss_increase"),
    # Python improves a lot, C gets 10 % worse: the overall loss falls, the per-language rule still rejects.
    ({"python": (2.0, 900), "c": (2.0, 100)}, {"python": (1.5, 900), "c": (2.2, 100)}, False,
     "c holdout loss rose from 2.0000 to 2.2000 (on 100 holdout tokens) (more than"),
    ({"python": (2.0, 100)}, {"python": (math.nan, 100)}, False, "not finite"),
    (None, None, True, "no holdout loss"),
])
def test_decide_promotion(in_use, candidate, promoted, reason_part):
    decision = decide_promotion(GATE, in_use, candidate)
    assert decision.promoted is promoted
    assert reason_part in decision.reason


def test_always_promotes_a_worse_adapter_and_says_why():
    decision = decide_promotion(PromotionSettings(mode="always"), {"python": (1.0, 10)}, {"python": (3.0, 10)})
    assert decision.promoted and decision.reason == "promotion.mode = always" and decision.margin == pytest.approx(-2.0)


@pytest.mark.parametrize("max_drift, promoted_runs, final", [
    (10.0, [1, 2, 3], 2.0 * 1.025 ** 3),  # no anchor: three runs each within 3 % drift 7.7 %
    (0.03, [1], 2.05),                     # the anchor: never more than 3 % above the best in service
])
def test_the_anchor_stops_per_run_tolerances_from_compounding(max_drift, promoted_runs, final):
    settings = PromotionSettings(mode="gate", max_loss_increase=0.03, max_language_loss_increase=0.03,
                                 max_drift=max_drift)
    fingerprints = {"python": "same-holdout"}
    anchors, in_use, in_use_run, promoted = {}, {"python": (2.0, 100)}, 0, []
    for run in (1, 2, 3):
        candidate = {"python": (in_use["python"][0] * 1.025, 100)}  # each run 2.5 % worse than the one in use
        decision = decide_promotion(settings, in_use, candidate, comparable_anchors(anchors, fingerprints))
        anchors = update_anchors(anchors, fingerprints, in_use, in_use_run, candidate, decision.promoted, run)
        if decision.promoted:
            in_use, in_use_run = candidate, run
            promoted.append(run)
        elif max_drift < 1:
            assert "more than promotion.max_drift = 0.03 above the best an adapter in service reached (2.0000)" \
                in decision.reason
    assert promoted == promoted_runs and in_use["python"][0] == pytest.approx(final)
    assert anchors == {"python": [2.0, "same-holdout", 0]}  # the base model is the best so far


def test_an_anchor_is_kept_as_the_best_in_service_and_restarts_when_its_holdout_changes():
    anchors = {"python": [2.0, "p1", 0], "c": [3.0, "c1", 2], "go": [1.0, "g1", 1]}
    # Python's holdout changed (a row was deleted), Go left the holdout; C is as it was.
    fingerprints = {"python": "p2", "c": "c1"}
    assert comparable_anchors(anchors, fingerprints) == {"c": 3.0}
    in_use = {"python": (2.5, 100), "c": (3.1, 100)}
    candidate = {"python": (2.4, 100), "c": (2.9, 100)}
    rejected = update_anchors(anchors, fingerprints, in_use, 2, candidate, False, 5)
    assert rejected == {"python": [2.5, "p2", 2], "c": [3.0, "c1", 2]}  # a rejected candidate never sets one
    promoted = update_anchors(anchors, fingerprints, in_use, 2, candidate, True, 5)
    assert promoted == {"python": [2.4, "p2", 5], "c": [2.9, "c1", 5]}
    # A language the candidate improves on stays judged against its own anchor only.
    decision = decide_promotion(GATE, in_use, candidate, {"c": 2.5})
    assert not decision.promoted
    assert "c holdout loss 2.9000 (on 100 holdout tokens) is more than promotion.max_drift" in decision.reason


def test_overall_loss_is_token_weighted():
    assert overall_loss({"python": (1.0, 300), "c": (3.0, 100)}) == pytest.approx(1.5)


def test_holdout_keys_of_languages_like_c_plus_plus_are_wandb_names_and_never_collide():
    # Crawlers say `C++`, `C#`, `Jupyter Notebook`: W&B can sort and filter only on letters, digits and
    # underscores, and c, c++ and c# must stay three series.
    languages = {"c": (3.0, 100), "c++": (2.0, 100), "c#": (1.5, 100), "jupyter notebook": (1.2, 10),
                 "objective-c": (1.1, 10), "objective c": (1.05, 10)}
    in_use = {language: (loss + 0.5, tokens) for language, (loss, tokens) in languages.items()}
    decision = decide_promotion(PromotionSettings(mode="always"), in_use, languages)
    anchors = {language: (loss, "holdout-1") for language, (loss, _) in languages.items()}
    metrics = holdout_metrics(decision, anchors)
    assert metrics["holdout/loss_c"] == 3.0 and metrics["holdout/loss_cpp"] == 2.0 and metrics["holdout/loss_csharp"] == 1.5
    assert metrics["holdout/loss_in_use_cpp"] == 2.5 and metrics["holdout/best_jupyter_notebook"] == 1.2
    # Two labels that would share a key each get their own, and no value is lost.
    objective = sorted(key for key in metrics if key.startswith("holdout/loss_objective_c"))
    assert len(objective) == 2 and sorted(metrics[key] for key in objective) == [1.05, 1.1]
    per_language = 3 * len(languages)  # candidate, in use, anchor
    assert len(metrics) == per_language + 4  # plus the overall loss and perplexity, each for both
    for key in metrics:
        section, name = key.split("/")
        assert re.fullmatch(r"[_a-zA-Z][_a-zA-Z0-9]*", name), key


# ------------------------------------------------------------------ the gate on real runs


def insert_files(url: str, files: list[tuple[str, str]], language: str, repo: str) -> None:
    rows = []
    for name, content in files:
        lines = content.count("\n") + 1
        rows.append((1, name, name, content, language, lines, len(content.encode()),
                     hashlib.sha256(content.encode()).hexdigest(), repo, 70))
    with psycopg.connect(url, autocommit=True) as connection:
        insert_rows(connection, rows)


def c_headers(count: int, skip: int = 0) -> list[tuple[str, str]]:
    files = []
    for path in sorted(Path("/usr/include").glob("*.h")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if 10 <= text.count("\n") <= 500 and 50 <= len(text) <= 8000:
            files.append((str(path), text))
        if len(files) == skip + count:
            break
    return files[skip:]


def noise_files(count: int, seed: int) -> list[tuple[str, str]]:
    """Token soup labelled as Python: training hard on it makes the adapter worse at real Python."""
    generator = random.Random(seed)
    alphabet = "qxzjvkw0123456789{}[]<>|~^`"
    files = []
    for index in range(count):
        lines = ["".join(generator.choice(alphabet) for _ in range(60)) for _ in range(40)]
        files.append((f"noise/{seed}/{index}.py", "\n".join(lines)))
    return files


HOOK = """import json, os, sys
keys = ["CODELUPE_EVENT", "CODELUPE_ADAPTER_PATH", "CODELUPE_ADAPTER_NAME", "CODELUPE_RUN_NUMBER",
        "CODELUPE_HOLDOUT_LOSS", "CODELUPE_PREVIOUS_HOLDOUT_LOSS", "CODELUPE_DATABASE__URL", "HF_TOKEN", "PGPASSWORD"]
with open(sys.argv[1], "a") as handle:
    handle.write(json.dumps({key: os.environ.get(key) for key in keys}) + "\\n")
print("reloaded")
"""


def gate_config(tmp_path: Path, learning_rate: float = 2e-3, replay: float = 0.5, epochs: int = 1) -> str:
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    calls = tmp_path / "hook-calls.jsonl"
    return (
        "[training]\nbatch_size = 4\ngradient_accumulation_steps = 4\n"
        f"learning_rate = {learning_rate}\nepochs = {epochs}\nmax_steps = -1\nlogging_steps = 2\ngradient_checkpointing = true\n"
        "max_grad_norm = 1.0\n"
        "[promotion]\nmode = \"gate\"\nholdout_samples = 24\nholdout_min_per_language = 6\n"
        f"max_loss_increase = 0.01\nmax_language_loss_increase = 0.03\nreplay_fraction = {replay}\n"
        f'on_promote = ["{sys.executable}", "{hook}", "{calls}"]\non_promote_timeout_s = 30\n'
    )


def hook_calls(tmp_path: Path) -> list[dict]:
    path = tmp_path / "hook-calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def holdout_ids(state_dir: Path) -> dict[int, str]:
    with sqlite3.connect(state_dir / "dedup.sqlite3") as connection:
        return dict(connection.execute("SELECT id, language FROM holdout"))


def trained_digests(state_dir: Path) -> set[bytes]:
    with sqlite3.connect(state_dir / "dedup.sqlite3") as connection:
        return {row[0] for row in connection.execute("SELECT digest FROM trained_hashes")}


def contents(url: str, ids) -> list[str]:
    with psycopg.connect(url) as connection:
        return [row[0] for row in connection.execute("SELECT content FROM processed_files WHERE id = ANY(%s)", (list(ids),))]


def cli(tmp_path: Path, url: str, *arguments: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, CODELUPE_DATABASE__URL=url)
    return subprocess.run([sys.executable, "-m", "codelupe_trainer.cli", *arguments, "--config", str(tmp_path / "codelupe.toml")],
                          capture_output=True, text=True, env=environment, timeout=120)


@pytest.mark.slow
def test_gate_rejects_a_worse_adapter_promotes_a_better_one_and_rolls_back(crawler_table, tmp_path, make_settings,
                                                                           learned_model, monkeypatch):
    url = crawler_table
    # Secrets from secrets.env, in the daemon's environment: the hook must get none of them.
    monkeypatch.setenv("HF_TOKEN", "hf_tokenvalue0123456789")
    monkeypatch.setenv("PGPASSWORD", "libpq-password-42")
    insert_stdlib_rows(url, start=0, count=70)
    insert_files(url, c_headers(30), "c", "glibc")
    settings = make_settings(url, gate_config(tmp_path), learned_model)
    state_dir = settings.paths.state_file.parent
    latest = settings.paths.output_dir / "latest"

    # Run 1: the holdout is frozen from these rows, stratified by language; the adapter beats the base model.
    first = run_cycle(settings, force=True)
    assert first.status == "trained" and "(promoted)" in first.message
    holdout = holdout_ids(state_dir)
    assert set(holdout.values()) == {"python", "c"} and len(holdout) >= 24
    state = load_state(settings.paths.state_file)
    assert state.adapter_in_use == 1 and latest.resolve().name == "run-000001"
    assert state.lineage[0]["promoted"] and state.lineage[0]["holdout_loss"] < state.lineage[0]["holdout_loss_in_use"]
    # Never trained on: no holdout sample's hash is among the trained ones, and the counts add up.
    assert not trained_digests(state_dir) & {content_hash(text) for text in contents(url, holdout)}
    assert state.last_run["holdout_rows"] == len(holdout)
    calls = hook_calls(tmp_path)
    assert len(calls) == 1 and calls[0]["CODELUPE_EVENT"] == "promote" and calls[0]["CODELUPE_RUN_NUMBER"] == "1"
    assert calls[0]["CODELUPE_ADAPTER_PATH"] == str((settings.paths.output_dir / "run-000001").resolve())
    assert float(calls[0]["CODELUPE_HOLDOUT_LOSS"]) == pytest.approx(state.lineage[0]["holdout_loss"], rel=1e-5)
    # The database password and the API keys are not handed to the hook.
    assert calls[0]["CODELUPE_DATABASE__URL"] is None and calls[0]["HF_TOKEN"] is None and calls[0]["PGPASSWORD"] is None
    # The adapter is ready to serve: group-readable files and a real card, with numbers and no sample text.
    adapter = settings.paths.output_dir / "run-000001"
    assert stat.S_IMODE((adapter / "adapter_model.safetensors").stat().st_mode) == 0o640
    card = (adapter / "README.md").read_text()
    assert "run 1" in card and str(learned_model) in card and "More Information Needed" not in card
    assert f"rows 1-{state.last_trained_id}" in card and f"{state.lineage[0]['holdout_loss']:.4f}" in card
    trained_texts = contents(url, range(1, state.last_trained_id + 1))
    assert not [line for text in trained_texts for line in text.splitlines() if len(line) > 30 and line in card]
    assert TEST_PASSWORD not in card
    first_run_steps = state.total_steps
    # The anchors: per language, run 1's adapter (it beat the base model on both), on this holdout.
    assert {language: entry[2] for language, entry in state.holdout_best.items()} == {"python": 1, "c": 1}
    assert state.holdout_best["python"][0] == pytest.approx(state.lineage[0]["holdout_losses"]["python"])
    anchors = state.holdout_best

    # Run 2: noise at a harmful learning rate: the candidate is worse on the holdout and is not promoted.
    insert_files(url, noise_files(80, seed=1), "python", "noise")
    harmful = make_settings(url, gate_config(tmp_path, learning_rate=0.05, replay=0.0), learned_model)
    second = run_cycle(harmful, force=True)
    assert second.status == "trained" and "rejected" in second.message
    state = load_state(settings.paths.state_file)
    assert latest.resolve().name == "run-000001" and state.latest_adapter.endswith("run-000001")
    assert state.adapter_in_use == 1 and state.rejected_runs == 1
    rejected = state.lineage[-1]
    assert rejected["run"] == 2 and not rejected["promoted"] and "holdout loss rose" in rejected["reason"]
    assert rejected["holdout_loss"] > rejected["holdout_loss_in_use"]
    assert (settings.paths.output_dir / "run-000002").is_dir()  # kept for inspection
    assert len(hook_calls(tmp_path)) == 1  # the hook did not run for a rejected adapter
    assert holdout_ids(state_dir) == holdout  # the same holdout every run
    # A rejected candidate moves no anchor (the adapter in use, measured again, may set its own loss anew).
    assert {language: entry[1:] for language, entry in state.holdout_best.items()} == \
        {language: entry[1:] for language, entry in anchors.items()}
    assert [entry[0] for entry in state.holdout_best.values()] == pytest.approx([entry[0] for entry in anchors.values()])

    run = read_run(find_run_files(tmp_path)[-1])
    assert run.run["name"] == "run-2-rejected" and run.run["host"] != socket.gethostname()
    # One lifetime axis across runs: run 2 starts where run 1's steps ended.
    assert run.values("lifetime/step")[0][1] == first_run_steps > 0
    assert run.values("continuous/total_runs")[0][1] == 1 and run.values("continuous/total_runs")[-1][1] == 2
    assert run.values("eval/initial_loss")
    assert [value for _, value in run.values("continuous/promoted")] == [0]
    assert run.values("continuous/rejected_runs")[-1][1] == 1
    assert run.values("holdout/loss")[-1][1] > run.values("holdout/loss_in_use")[-1][1]
    assert run.values("holdout/loss_c") and run.values("holdout/loss_in_use_python")
    assert run.values("holdout/best_c")[-1][1] == pytest.approx(anchors["c"][0], rel=1e-5)
    assert run.config["promotion"]["mode"] == "gate"

    status = cli(tmp_path, url, "status")
    assert status.returncode == 0 and "rejected" in status.stdout and "run 1" in status.stdout, status.stdout
    assert f"best holdout loss:     c {anchors['c'][0]:.4f} (run 1), python {anchors['python'][0]:.4f} (run 1)" \
        in status.stdout, status.stdout
    listed = cli(tmp_path, url, "adapters", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = {entry["run"]: entry for entry in json.loads(listed.stdout)}
    assert entries[1]["in_use"] and entries[1]["promoted"] and not entries[2]["promoted"]
    assert entries[2]["reason"].startswith("holdout loss rose")

    # Run 3: more real code, with replay of older rows: promoted, continued from run 1 (the adapter in use).
    insert_stdlib_rows(url, start=70, count=60)
    insert_files(url, c_headers(20, skip=30), "c", "glibc")
    third = run_cycle(settings, force=True)
    state = load_state(settings.paths.state_file)
    assert "(promoted)" in third.message, state.lineage[-1]["reason"]
    assert state.last_run["continued_from"].endswith("run-000001") and state.lineage[-1]["parent"] == 1
    assert latest.resolve().name == "run-000003" and state.adapter_in_use == 3
    replayed = state.last_run["replay_samples"]
    assert replayed > 0 and state.total_replay_samples == replayed
    # Replay is not new data: samples trained counts each new row once.
    assert state.total_samples_trained == sum(entry["samples_trained"] for entry in state.lineage)
    run = read_run(find_run_files(tmp_path)[-1])
    assert run.values("data/replay_samples")[-1][1] == replayed

    # Rollback to run 1: `latest`, the state and the hook; the next run continues from it.
    assert cli(tmp_path, url, "rollback", "2").returncode == 1  # a rejected adapter is not a rollback target
    rolled = cli(tmp_path, url, "rollback", "1")
    assert rolled.returncode == 0, rolled.stderr
    state = load_state(settings.paths.state_file)
    assert latest.resolve().name == "run-000001" and state.adapter_in_use == 1
    assert state.latest_adapter.endswith("run-000001")
    assert hook_calls(tmp_path)[-1]["CODELUPE_EVENT"] == "rollback"
    assert hook_calls(tmp_path)[-1]["CODELUPE_RUN_NUMBER"] == "1"
    assert state.holdout_best == {}  # the anchors start again from the adapter put back
    insert_stdlib_rows(url, start=130, count=30)
    fourth = run_cycle(settings, force=True)
    state = load_state(settings.paths.state_file)
    assert fourth.status == "trained" and state.last_run["continued_from"].endswith("run-000001")
    assert state.lineage[-1]["parent"] == 1 and holdout_ids(state_dir) == holdout
    # Run 1, measured again as the adapter in use, holds every anchor unless run 4 was promoted and beat it.
    in_use_losses = state.lineage[-1]["holdout_losses_in_use"]
    assert set(state.holdout_best) == {"python", "c"}
    for language, (loss, _, source) in state.holdout_best.items():
        assert source in (1, 4) and loss <= in_use_losses[language] + 1e-6


@pytest.mark.slow
def test_a_promotion_killed_before_its_hand_off_is_handed_to_the_server_by_the_next_cycle(crawler_table, tmp_path,
                                                                                         make_settings):
    """kill -9 (the kernel's out-of-memory killer, a power cut) after a promotion's state is written and before
    on_promote ran: `latest` names the new adapter while the server stays on the old one, and no later step
    used to retry the hand-off. The next cycle runs it, first, even with nothing to train; once only."""
    url = crawler_table
    insert_stdlib_rows(url, start=0, count=40)
    settings = make_settings(url, gate_config(tmp_path).replace('mode = "gate"', 'mode = "always"')
                             + "[schedule]\nmin_new_samples = 10\n")
    environment = dict(os.environ, CODELUPE_DATABASE__URL=url, CODELUPE_FAULT="hand-off:kill")
    killed = subprocess.run([sys.executable, "-m", "codelupe_trainer.cli", "run-once", "--config",
                             str(tmp_path / "codelupe.toml")], capture_output=True, text=True, env=environment, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = load_state(settings.paths.state_file)
    assert state.adapter_in_use == 1 and "on_promote" not in state.lineage[-1] and hook_calls(tmp_path) == []
    assert (settings.paths.output_dir / "latest").resolve().name == "run-000001"

    again = cli(tmp_path, url, "run-once")  # no new rows: nothing to train, the hand-off still runs
    assert again.returncode == 0 and "0 eligible new samples" in again.stdout, again.stderr[-2000:]
    assert "the hand-off of run 1 to promotion.on_promote has not run" in again.stderr
    calls = hook_calls(tmp_path)
    assert [(call["CODELUPE_EVENT"], call["CODELUPE_RUN_NUMBER"]) for call in calls] == [("promote", "1")]
    assert calls[0]["CODELUPE_ADAPTER_PATH"] == str((settings.paths.output_dir / "run-000001").resolve())
    assert load_state(settings.paths.state_file).lineage[-1]["on_promote"] == "ok"
    assert cli(tmp_path, url, "run-once").returncode == 0
    assert len(hook_calls(tmp_path)) == 1  # ran once: not at every cycle


def test_holdout_losses_are_comparable_only_on_the_same_model_length_and_format(tmp_path):
    """What the anchors compare across runs: a change of base model, block length or text format (the completion
    format scores only the completion) makes a new fingerprint, so the anchor restarts instead of judging runs
    against losses on other tokens; a setting that does not change what is measured keeps it."""
    from codelupe_trainer.config import Settings
    from codelupe_trainer.continual import Holdout, holdout_fingerprints
    from codelupe_trainer.data.records import Sample

    holdout = Holdout({1, 2, 3}, [Sample(1, "a", "python", 90), Sample(2, "b", "c", 90), Sample(3, "c", "python", 90)])
    shipped = Settings(database={"url": "postgresql://localhost/db"}, model={"base_model": "Qwen/Qwen2.5-Coder-7B"})
    before = holdout_fingerprints(holdout, shipped)
    # An anchor recorded before the format took part (raw, as shipped) stays comparable after an upgrade.
    assert before == {"python": "cdc77367ffe6e275", "c": "eb9517db09956716"}
    same = shipped.model_copy(update={"training": shipped.training.model_copy(update={"learning_rate": 1e-5})})
    assert holdout_fingerprints(holdout, same) == before
    for section, change in (("model", {"base_model": "Qwen/Qwen2.5-Coder-7B-Instruct"}), ("data", {"max_length": 1024}),
                            ("data", {"format": "completion"})):
        changed = shipped.model_copy(update={section: getattr(shipped, section).model_copy(update=change)})
        after = holdout_fingerprints(holdout, changed)
        assert after.keys() == before.keys() and all(after[key] != before[key] for key in before), change


def test_a_holdout_whose_rows_are_deleted_is_refilled_from_untrained_rows_never_left_empty(crawler_table, make_settings):
    """Rows deleted from the table (a crawler pruning old files) drop out of the holdout. A few gone: it goes
    on with the rest. A language with none left: it joins again from this run's rows. Fewer than half left:
    it is refilled to holdout_samples from this run's rows, never trained. Left alone, the last deletion
    would leave the gate nothing to compare on, and every later run would be promoted unchecked."""
    from codelupe_trainer.continual import load_holdout
    from codelupe_trainer.data.source import open_connection
    from codelupe_trainer.state import TrainerState

    url = crawler_table
    insert_stdlib_rows(url, start=0, count=40)
    insert_files(url, c_headers(20), "c", "glibc")
    settings = make_settings(url, "[promotion]\nmode = \"gate\"\nholdout_samples = 24\nholdout_min_per_language = 6\n"
                             "replay_fraction = 0.0\n")

    def delete(ids) -> None:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("DELETE FROM processed_files WHERE id = ANY(%s)", (list(ids),))

    def languages(holdout) -> dict[str, int]:
        return dict(Counter(sample.language for sample in holdout.samples))

    with open_connection(settings.database) as connection:
        first = load_holdout(connection, settings, TrainerState())
        assert len(first.samples) >= 20 and set(languages(first)) == {"python", "c"}
        # The next runs read new rows: the watermark has passed every row there was.
        with psycopg.connect(url) as reader:
            watermark = reader.execute("SELECT max(id) FROM processed_files").fetchone()[0]
        insert_stdlib_rows(url, start=200, count=60, repo="later")
        insert_files(url, c_headers(20, skip=20), "c", "glibc-later")
        later = TrainerState(last_trained_id=watermark, total_training_runs=1)

        python = sorted(sample.id for sample in first.samples if sample.language == "python")
        delete(python[:3])
        some_gone = load_holdout(connection, settings, later)
        assert some_gone.ids == first.ids and len(some_gone.samples) == len(first.samples) - 3

        c_ids = [sample.id for sample in first.samples if sample.language == "c"]
        delete(c_ids)
        c_again = load_holdout(connection, settings, later)
        new_c = [sample.id for sample in c_again.samples if sample.language == "c"]
        assert len(new_c) == 6 and min(new_c) > watermark  # from this run's rows, never trained ones

        survivors = sorted(sample.id for sample in c_again.samples)
        delete(survivors[: len(survivors) - 5])  # 5 rows left of 20-odd
        refilled = load_holdout(connection, settings, later)
    assert len(refilled.samples) >= 20 and set(languages(refilled)) == {"python", "c"}
    assert all(sample.id > watermark for sample in refilled.samples if sample.id not in survivors)


def test_a_language_that_joined_the_holdout_with_a_handful_of_rows_grows_to_the_minimum(crawler_table, make_settings):
    """A language first seen with two rows joins the holdout with one (at most half its rows, so it still
    trains). Left at one file forever, the per-language rule (3 %) would judge every later candidate on that
    one file, not on the language. Later runs' new rows top it up to
    holdout_min_per_language (never trained ones), and then it is left alone."""
    from codelupe_trainer.continual import load_holdout
    from codelupe_trainer.data.source import open_connection
    from codelupe_trainer.state import TrainerState

    url = crawler_table
    insert_stdlib_rows(url, start=0, count=40)
    insert_files(url, c_headers(2), "c", "glibc")
    settings = make_settings(url, "[promotion]\nmode = \"gate\"\nholdout_samples = 12\nholdout_min_per_language = 6\n"
                             "replay_fraction = 0.0\n")

    def held(holdout) -> dict[str, int]:
        return dict(Counter(sample.language for sample in holdout.samples))

    def read_everything() -> TrainerState:
        with psycopg.connect(url) as reader:
            watermark = reader.execute("SELECT max(id) FROM processed_files").fetchone()[0]
        return TrainerState(last_trained_id=watermark, total_training_runs=1)

    with open_connection(settings.database) as connection:
        first = load_holdout(connection, settings, TrainerState())
        assert held(first)["c"] == 1 and held(first)["python"] >= 6
        later = read_everything()
        insert_files(url, c_headers(30, skip=2), "c", "glibc-later")
        insert_stdlib_rows(url, start=200, count=20, repo="later")
        topped_up = load_holdout(connection, settings, later)
        assert held(topped_up) == held(first) | {"c": 6}
        new_c = {sample.id for sample in topped_up.samples if sample.language == "c"} - first.ids
        assert len(new_c) == 5 and min(new_c) > later.last_trained_id  # from this run's rows, never trained ones
        again = read_everything()
        insert_files(url, c_headers(20, skip=32), "c", "glibc-even-later")
        assert load_holdout(connection, settings, again).ids == topped_up.ids
