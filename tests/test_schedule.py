"""The learning-rate schedule: every optimizer step trains, the first of a cycle included."""

from __future__ import annotations

import pytest
from conftest import insert_stdlib_rows

from codelupe_trainer.cli import main
from codelupe_trainer.state import load_state
from codelupe_trainer.training.schedule import learning_rate_factor, warmup_steps


@pytest.mark.parametrize("total, ratio, warmup", [(1, 0.03, 1), (20, 0.03, 1), (40, 0.03, 2), (100, 0.03, 3),
                                                  (20, 0.0, 0), (10, 1.0, 10)])
def test_warmup_steps_round_a_ratio_up(total, ratio, warmup):
    assert warmup_steps(total, ratio) == warmup


@pytest.mark.parametrize("warmup, total, factors", [
    (1, 1, [1 / 2]),                              # a one-step cycle trains at half the peak, not at 0
    (1, 4, [1 / 2, 1.0, 2 / 3, 1 / 3]),           # the shipped ratio on a short cycle: one warm-up step
    (2, 5, [1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3]),
    (0, 3, [1.0, 2 / 3, 1 / 3]),                  # no warm-up: the peak first, the last step still trains
    (3, 3, [1 / 4, 2 / 4, 3 / 4]),                # warm-up as long as the run never reaches the peak
])
def test_every_step_of_the_schedule_trains(warmup, total, factors):
    assert [learning_rate_factor(step, warmup, total) for step in range(total)] == pytest.approx(factors)


@pytest.mark.slow
def test_a_cycle_of_one_optimizer_step_changes_the_adapter(crawler_table, make_settings, tmp_path):
    """With the shipped warmup_ratio (0.03 rounds up to one warm-up step) a one-step cycle ran at learning
    rate 0: LoRA's B matrices stayed at their zero init, the adapter was the base model, and the rows were
    recorded as trained. Production shape: accumulation 4, checkpointing."""
    from safetensors.torch import load_file

    insert_stdlib_rows(crawler_table, start=0, count=20)
    settings = make_settings(crawler_table, extra=(
        "[training]\nbatch_size = 4\ngradient_accumulation_steps = 4\nmax_steps = 1\nlearning_rate = 5e-3\n"
        "gradient_checkpointing = true\nlogging_steps = 1\n"
    ))
    assert settings.training.warmup_ratio == 0.03
    assert main(["run-once", "--config", str(tmp_path / "codelupe.toml")]) == 0
    state = load_state(settings.paths.state_file)
    assert state.total_steps == 1 and state.last_trained_id > 0
    weights = load_file(settings.paths.output_dir / "latest" / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b and all(float(tensor.abs().max()) > 0 for tensor in lora_b)
