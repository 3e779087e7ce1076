"""End to end: rows in a real PostgreSQL table -> run-once -> a saved, loadable, continued LoRA adapter."""

from __future__ import annotations

import json
import logging
import time

import psycopg
import pytest
import torch
from conftest import TEST_PASSWORD, insert_stdlib_rows
from safetensors.torch import load_file

from codelupe_trainer.cli import main
from codelupe_trainer.config import load_settings
from codelupe_trainer.state import load_state

pytestmark = pytest.mark.slow


def eligible_ids(url: str) -> list[int]:
    with psycopg.connect(url) as connection:
        return [row[0] for row in connection.execute(
            "SELECT id FROM processed_files WHERE quality_score >= 70 AND char_length(content) BETWEEN 50 AND 8000 ORDER BY id"
        )]


def max_id(url: str) -> int:
    with psycopg.connect(url) as connection:
        return connection.execute("SELECT max(id) FROM processed_files").fetchone()[0]


def adapter_tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_run_once_trains_then_continues_from_the_adapter(crawler_table, tmp_path, tiny_model, make_settings, capsys, caplog):
    from transformers import AutoModelForCausalLM

    url = crawler_table
    insert_stdlib_rows(url, start=0, count=120)
    settings = make_settings(url, extra=(
        "[training]\nbatch_size = 4\ngradient_accumulation_steps = 4\nlearning_rate = 5e-3\nmax_steps = 16\n"
        "logging_steps = 2\ngradient_checkpointing = true\n"
    ))
    config = str(tmp_path / "codelupe.toml")
    caplog.set_level(logging.INFO)

    assert main(["run-once", "--config", config]) == 0
    state = load_state(settings.paths.state_file)
    ids = eligible_ids(url)
    # max_steps = 16 at batch 4 x accumulation 4 trains at most 256 blocks: the run took no more rows than that, and
    # the watermark stops below the first row it left, so every row up to it was trained or held out.
    consumed = [row_id for row_id in ids if row_id <= state.last_trained_id]
    assert 0 < len(consumed) < len(ids)
    assert state.total_training_runs == 1
    assert state.total_samples_trained + state.total_samples_held_out == len(consumed)
    assert state.total_samples_held_out > 0 and state.last_run["samples_trained"] == state.total_samples_trained
    assert state.last_run["steps"] <= 16
    assert state.last_run["eval_loss"] is not None
    assert torch.isfinite(torch.tensor(state.last_run["eval_loss"]))
    # The journal says what the build made and that the model loads, before the first evaluation.
    assert f"dataset: {state.total_samples_trained} new samples to train in " in caplog.text
    assert f"loading {tiny_model} on cpu" in caplog.text and "model loaded in " in caplog.text
    # The rest is trained by the next runs, each row exactly once.
    runs = 1
    while state.last_trained_id < ids[-1] and runs < 10:
        assert main(["run-once", "--config", config, "--force"]) == 0
        state = load_state(settings.paths.state_file)
        runs += 1
        assert state.total_training_runs == runs and state.last_run["steps"] <= 16
    assert state.last_trained_id >= ids[-1]
    assert state.total_samples_trained + state.total_samples_held_out == len(ids)
    first_adapter = settings.paths.output_dir / f"run-{runs:06d}"
    assert (settings.paths.output_dir / "latest").resolve() == first_adapter.resolve()

    # LoRA weights changed from their initialisation (B starts at zero); base weights did not.
    from peft import PeftModel

    base_before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(first_adapter))
    lora_b = [tensor for name, tensor in adapter_tensors(first_adapter).items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)
    for name, tensor in loaded.get_base_model().state_dict().items():
        if "lora" not in name and "base_layer" not in name and name in base_before:
            assert torch.equal(tensor, base_before[name]), name
    for name, tensor in loaded.get_base_model().state_dict().items():
        if "base_layer" in name:
            assert torch.equal(tensor, base_before[name.replace(".base_layer", "")]), name

    # A second run with no new rows trains nothing and changes nothing.
    before = settings.paths.state_file.read_text()
    assert main(["run-once", "--config", config, "--force"]) == 0
    assert "0 eligible new samples" in capsys.readouterr().out
    assert json.loads(settings.paths.state_file.read_text()) == json.loads(before)

    # New rows: the next run trains only those, starting from the previous adapter.
    insert_stdlib_rows(url, start=300, count=60, repo="more")
    new_ids = [row_id for row_id in eligible_ids(url) if row_id > state.last_trained_id]
    before_runs, before_total = runs, state.total_samples_trained + state.total_samples_held_out
    skipped = blocked = 0
    while state.last_trained_id < max_id(url) and runs < before_runs + 10:
        assert main(["run-once", "--config", config, "--force"]) == 0
        state = second = load_state(settings.paths.state_file)
        runs += 1
        skipped += sum(state.last_run["skipped"].values())
        # Near-copies of files trained before (the standard library has a few) are blocked, and counted.
        blocked += sum(state.last_run["blocked"].values())
        assert state.last_run["continued_from"] == str(settings.paths.output_dir / f"run-{runs - 1:06d}")
    assert second.total_training_runs == runs > before_runs
    assert second.total_samples_trained + second.total_samples_held_out + blocked - before_total == len(new_ids)
    # Every new row was examined once: trained, held out, or skipped and counted; the watermark covers them all.
    assert second.last_trained_id == max_id(url) >= new_ids[-1]
    assert skipped + len(new_ids) == 60
    last_adapter = settings.paths.output_dir / f"run-{runs:06d}"
    first_adapter = settings.paths.output_dir / f"run-{runs - 1:06d}"
    assert (settings.paths.output_dir / "latest").resolve() == last_adapter.resolve()
    # Continuing means starting from the previous run's weights: this adapter moved away from them, not from zero.
    first, second_tensors = adapter_tensors(first_adapter), adapter_tensors(last_adapter)
    lora_a_first = {name: tensor for name, tensor in first.items() if "lora_A" in name}
    distance_from_first = sum((second_tensors[name] - tensor).norm() for name, tensor in lora_a_first.items())
    assert 0 < distance_from_first < sum(tensor.norm() for tensor in lora_a_first.values())

    # The password never reaches the logs, the state file or show-config.
    assert main(["show-config", "--config", config]) == 0
    shown = capsys.readouterr().out
    assert TEST_PASSWORD not in shown and "***" in shown
    assert TEST_PASSWORD not in caplog.text
    assert TEST_PASSWORD not in settings.paths.state_file.read_text()
    assert TEST_PASSWORD not in (tmp_path / "metrics.jsonl").read_text()


def test_rows_a_scorer_has_not_scored_yet_train_once_it_has(crawler_table, make_settings, tmp_path, capsys):
    """The crawler inserts, a scorer fills quality_score later: a cycle between the two used to skip the
    unscored rows for good (as low or missing quality) and move the watermark past them. They now wait, are
    said, and train at the first cycle after their score arrives; every eligible row trains once."""
    url = crawler_table
    insert_stdlib_rows(url, start=0, count=60)
    with psycopg.connect(url, autocommit=True) as connection:
        scores = dict(connection.execute("SELECT id, quality_score FROM processed_files WHERE id % 2 = 0").fetchall())
        connection.execute("UPDATE processed_files SET quality_score = NULL WHERE id % 2 = 0")
        # The unscored rows a score could make eligible; the rest are skipped at once (too long, ...).
        waiting = [row[0] for row in connection.execute(
            "SELECT id FROM processed_files WHERE quality_score IS NULL AND char_length(content) BETWEEN 50 AND 8000 "
            "ORDER BY id")]
    assert len(scores) == 30 and waiting
    settings = make_settings(url)
    config = str(tmp_path / "codelupe.toml")

    assert main(["run-once", "--config", config]) == 0
    first = load_state(settings.paths.state_file)
    assert f"{len(waiting)} waiting for a quality score" in capsys.readouterr().out and waiting
    assert first.last_trained_id == max_id(url)
    assert [row_id for first_id, last_id in first.gap_ranges() for row_id in range(first_id, last_id + 1)] == waiting
    scored_first = len(eligible_ids(url))
    assert first.total_samples_trained + first.total_samples_held_out == scored_first

    with psycopg.connect(url, autocommit=True) as connection:  # the scorer catches up
        for row_id, score in scores.items():
            connection.execute("UPDATE processed_files SET quality_score = %s WHERE id = %s", (score, row_id))
    assert main(["run-once", "--config", config]) == 0
    second = load_state(settings.paths.state_file)
    assert second.total_training_runs == 2 and second.gap_ranges() == []
    assert second.total_samples_trained + second.total_samples_held_out == len(eligible_ids(url)) > scored_first
    assert second.last_run["waiting_for_score"] == 0


def test_rows_that_commit_while_no_cycle_reads_are_trained_even_after_the_commit_lag_ran_out(crawler_table, make_settings,
                                                                                           tmp_path, capsys):
    """A range of ids missing below the watermark (a transaction still open) is given up after
    database.max_commit_lag_minutes, but only once a cycle has read it after that: when its rows commit while no
    cycle reads (the daemon stopped, or one cycle trains for hours on the shipped 100,000-row budget), the next
    cycle still trains them. It used to forget the range before reading it, and the rows were never trained."""
    from codelupe_trainer.demo.demo import crawler_rows, insert_rows, standard_library_files

    url = crawler_table
    rows = list(crawler_rows(standard_library_files(240)))
    late = psycopg.connect(url)  # a crawler transaction that commits late
    insert_rows(late, rows[:30])
    with psycopg.connect(url) as rolled_back:  # one that never commits: its range is given up, after a last read
        insert_rows(rolled_back, rows[30:40])
        rolled_back.rollback()
    with psycopg.connect(url, autocommit=True) as connection:
        insert_rows(connection, rows[40:100])
    settings = make_settings(url, extra="[database]\nmax_commit_lag_minutes = 0.02\n")
    config = str(tmp_path / "codelupe.toml")

    assert main(["run-once", "--config", config]) == 0
    first = load_state(settings.paths.state_file)
    assert first.last_trained_id == max_id(url) and first.gap_ranges() == [(1, 40)]
    late.commit()
    late.close()
    late_eligible = [row_id for row_id in eligible_ids(url) if row_id <= 30]
    assert len(late_eligible) >= settings.schedule.min_new_samples
    time.sleep(settings.database.max_commit_lag_minutes * 60 + 0.5)  # no cycle read them within the lag

    assert main(["run-once", "--config", config]) == 0
    assert "eligible new samples" not in capsys.readouterr().out.splitlines()[-1]
    second = load_state(settings.paths.state_file)
    assert second.total_training_runs == 2
    assert second.total_samples_trained + second.total_samples_held_out == len(eligible_ids(url))
    # Read after the lag ran out: given up now, the rolled-back range with them.
    assert second.gap_ranges() == []


def test_run_once_waits_for_enough_rows(crawler_table, make_settings, tmp_path, capsys):
    insert_stdlib_rows(crawler_table, start=0, count=5)
    settings = make_settings(crawler_table, extra="[schedule]\nmin_new_samples = 1000")
    assert main(["run-once", "--config", str(tmp_path / "codelupe.toml")]) == 0
    output = capsys.readouterr().out
    assert "waiting for 1000 (run-once --force trains on them anyway)" in output
    assert not settings.paths.state_file.exists()
    # The cycle's own message (what the daemon logs) has no hint: the daemon has no --force.
    from codelupe_trainer.cycle import run_cycle

    assert run_cycle(settings).message.endswith("waiting for 1000")


def test_rows_with_id_zero_or_below_are_read_not_taken_as_trained(crawler_table, make_settings):
    # A table filled from a DataFrame numbers its rows from 0; a hand-made one may start anywhere. The first
    # cycle starts below the smallest id, so every row is read once; the next starts from the watermark.
    from codelupe_trainer.cycle import run_cycle

    insert_stdlib_rows(crawler_table, start=0, count=14)
    with psycopg.connect(crawler_table, autocommit=True) as connection:
        connection.execute("UPDATE processed_files SET id = -id - 1000")
        connection.execute("UPDATE processed_files SET id = -id - 1003")  # 1..14 -> -2..11
        [lowest, rows] = connection.execute("SELECT min(id), count(*) FROM processed_files").fetchone()
    assert lowest == -2 and rows == 14
    settings = make_settings(crawler_table)
    assert run_cycle(settings, force=True).status == "trained"
    state = load_state(settings.paths.state_file)
    assert state.last_run["rows_examined"] == 14
    assert state.lineage[-1]["first_id"] == -2 and state.last_trained_id == 11
    insert_stdlib_rows(crawler_table, start=14, count=12)  # the sequence goes on at 15
    assert run_cycle(settings, force=True).status == "trained"
    state = load_state(settings.paths.state_file)
    assert state.last_run["rows_examined"] == 12 and state.lineage[-1]["first_id"] == 12


def test_missing_table_is_one_clear_error(db_url, make_settings, tmp_path, caplog):
    make_settings(db_url)
    assert main(["run-once", "--config", str(tmp_path / "codelupe.toml")]) == 2
    messages = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert any("table 'processed_files' does not exist" in message for message in messages)
    assert TEST_PASSWORD not in caplog.text
    # Found before the cycle starts: a setting to fix, not a failed cycle (it would make the daemon back off).
    state = load_state(load_settings(tmp_path / "codelupe.toml").paths.state_file)
    assert state.consecutive_failures == 0 and state.last_trained_id == 0


def test_four_bit_quantized_training_runs_on_cpu(crawler_table, make_settings, tmp_path, tiny_model, capsys):
    """bitsandbytes 0.50 runs NF4 layers on the CPU: the quantized path really trains here. `model.frozen_dtype`
    is for CUDA's bf16 autocast: the CPU keeps fp32, and the W&B config says which dtype the run really had.
    The loss before training is not measured there; the summary says so (it said "no eval split" beside
    an eval split and its loss after training)."""
    from wandb_reader import find_run_files, read_run

    insert_stdlib_rows(crawler_table, start=0, count=40)
    settings = make_settings(crawler_table, extra=(
        f'[model]\nbase_model = "{tiny_model}"\n'
        'quantization = "4bit"\nlora_r = 4\nlora_alpha = 8\nlora_dropout = 0.0\nfrozen_dtype = "bfloat16"\n'
        '[training]\nbatch_size = 4\nmax_steps = 2\nlogging_steps = 1\ngradient_checkpointing = false\n'
        '[data]\nmax_length = 256\nmax_samples_per_run = 400\neval_fraction = 0.3\nmin_quality = 70\n'
    ))
    assert main(["run-once", "--config", str(tmp_path / "codelupe.toml")]) == 0
    state = load_state(settings.paths.state_file)
    assert state.last_run["quantization"] == "4bit"
    [run_file] = find_run_files(tmp_path)
    assert read_run(run_file).config["model/frozen_dtype"] == "float32"
    assert state.total_training_runs == 1
    assert (settings.paths.output_dir / "run-000001" / "adapter_model.safetensors").exists()
    assert state.last_run["eval_samples"] > 0 and state.last_run["eval_loss_before"] is None
    said = capsys.readouterr().out
    assert f"eval loss: after {state.last_run['eval_loss']:.4f} (before training: not measured" in said


def test_completion_format_trains_end_to_end(crawler_table, make_settings, tmp_path):
    insert_stdlib_rows(crawler_table, start=0, count=40)
    settings = make_settings(crawler_table, extra=(
        "[data]\nformat = \"completion\"\nmax_length = 256\neval_fraction = 0.1\n"
    ))
    assert main(["run-once", "--config", str(tmp_path / "codelupe.toml")]) == 0
    state = load_state(settings.paths.state_file)
    assert state.total_training_runs == 1 and state.last_run["train_loss"] > 0


def test_length_grouped_fallback_trains_and_is_recorded(crawler_table, make_settings, tmp_path, monkeypatch):
    from wandb_reader import find_run_files, read_run

    insert_stdlib_rows(crawler_table, start=0, count=40)
    monkeypatch.setenv("CODELUPE_MODEL__PACKING", "length_grouped")
    settings = make_settings(crawler_table)
    assert main(["run-once", "--config", str(tmp_path / "codelupe.toml")]) == 0
    state = load_state(settings.paths.state_file)
    assert state.last_run["packing"] == "length_grouped" and state.total_training_runs == 1
    [run_file] = find_run_files(tmp_path)
    assert read_run(run_file).config["packing"] == "length_grouped"


def test_auto_packing_is_position_ids_on_sdpa(crawler_table, make_settings, tmp_path):
    insert_stdlib_rows(crawler_table, start=0, count=30)
    settings = make_settings(crawler_table)
    assert main(["run-once", "--config", str(tmp_path / "codelupe.toml")]) == 0
    assert load_state(settings.paths.state_file).last_run["packing"] == "position_ids"


def test_the_adapter_in_latest_loads_as_the_readme_says_and_is_the_one_the_gate_judged(crawler_table, make_settings,
                                                                                       tmp_path, tiny_model):
    """README, "Using the adapter": `latest` loads with peft's AutoPeftModelForCausalLM alone (base model found
    from the adapter's own config), gives on the holdout the loss the gate recorded for it, and merges into a
    standalone model that gives it too (production shape: accumulation 4, checkpointing, a step budget)."""
    import warnings

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codelupe_trainer.data.dataset import format_raw, pack_by_language
    from codelupe_trainer.data.holdout import holdout_store
    from codelupe_trainer.data.source import fetch_samples_by_id
    from codelupe_trainer.promotion import overall_loss
    from codelupe_trainer.training.loop import evaluate_holdout

    insert_stdlib_rows(crawler_table, start=0, count=60)
    settings = make_settings(crawler_table, extra=(
        "[training]\nbatch_size = 4\ngradient_accumulation_steps = 4\nmax_steps = 3\nlearning_rate = 5e-3\n"
        "gradient_checkpointing = true\n[promotion]\nmode = \"always\"\nholdout_samples = 12\n"
    ))
    assert main(["run-once", "--config", str(tmp_path / "codelupe.toml")]) == 0
    state = load_state(settings.paths.state_file)
    judged, in_use = state.last_run["holdout_loss"], state.last_run["holdout_loss_in_use"]
    assert judged is not None and in_use is not None and abs(judged - in_use) > 1e-3

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    with psycopg.connect(crawler_table) as connection:
        samples = fetch_samples_by_id(connection, settings.database, settings.data,
                                      holdout_store(settings.paths.state_file.parent).ids())
    assert samples
    blocks = pack_by_language(samples, tokenizer, settings.data.max_length, format_raw)

    def holdout_loss(model) -> float:
        return overall_loss(evaluate_holdout(model, blocks, tokenizer.pad_token_id, 4, "cpu"))

    latest = str(settings.paths.output_dir / "latest")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft asks the (unreachable) hub for a tokenizer beside the adapter
        model = AutoPeftModelForCausalLM.from_pretrained(latest)
    assert holdout_loss(model) == pytest.approx(judged, rel=1e-5)
    merged_dir = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(merged_dir)
    standalone = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert holdout_loss(standalone) == pytest.approx(judged, rel=1e-4)
    # As the README merges it, in bf16: the same model, to bf16's precision.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_bf16 = AutoPeftModelForCausalLM.from_pretrained(latest, dtype="bfloat16")
    assert holdout_loss(in_bf16.merge_and_unload()) == pytest.approx(judged, rel=2e-2)
