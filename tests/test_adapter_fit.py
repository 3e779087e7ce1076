"""Each run continues the adapter in service, and peft rebuilds it from its own saved config: model settings
changed since (LoRA rank, alpha, dropout, modules, a base model of other dimensions) must stop the run in one
line, never be ignored (or, for a base model with fewer layers, drop trained weights) without a word."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from conftest import insert_stdlib_rows
from test_first_hour import QWEN_7B_CONFIG, run_cli

from codelupe_trainer.config import ModelSettings
from codelupe_trainer.training.adapter_fit import adapter_misfit, base_model_misfit

# Qwen2.5-Coder's 1.5B and 14B: the sizes a user moves between.
QWEN_1_5B_CONFIG = {"hidden_size": 1536, "num_hidden_layers": 28, "intermediate_size": 8960,
                    "num_attention_heads": 12, "num_key_value_heads": 2}
QWEN_14B_CONFIG = {"hidden_size": 5120, "num_hidden_layers": 48, "intermediate_size": 13824,
                   "num_attention_heads": 40, "num_key_value_heads": 8}


def lora_matrices(config: dict, r: int = 16) -> list[tuple[int, str, str, tuple[int, ...]]]:
    """The (layer, module, A/B, shape) list a LoRA on every projection of a model with `config` has."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    key_value = config["num_key_value_heads"] * head_dim
    widths = {"q_proj": (hidden, hidden), "k_proj": (hidden, key_value), "v_proj": (hidden, key_value),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, inner), "up_proj": (hidden, inner),
              "down_proj": (inner, hidden)}
    return [entry for layer in range(config["num_hidden_layers"]) for module, (width_in, width_out) in widths.items()
            for entry in ((layer, module, "A", (r, width_in)), (layer, module, "B", (width_out, r)))]


def test_a_7b_adapter_fits_the_7b_and_no_other_size():
    adapter = lora_matrices(QWEN_7B_CONFIG)
    assert base_model_misfit(adapter, QWEN_7B_CONFIG) is None
    assert "3584 input features, the base model's 1536" in base_model_misfit(adapter, QWEN_1_5B_CONFIG)
    assert "spans 28 layers and the base model has 48" in base_model_misfit(adapter, QWEN_14B_CONFIG)
    # The same widths with one layer fewer is another model too.
    assert "spans 28 layers" in base_model_misfit(adapter, QWEN_7B_CONFIG | {"num_hidden_layers": 27})
    # Grouped-query attention: the key/value projections are narrower than the hidden size, and that is checked.
    assert "k_proj has 512 output features, the base model's 3584" in base_model_misfit(
        adapter, QWEN_7B_CONFIG | {"num_key_value_heads": 28})


def save_tiny_model(directory: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=300, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


def save_lora(base: Path, output_dir: Path, model: ModelSettings) -> Path:
    """An adapter as a cycle leaves it: a LoRA from `model`'s settings, saved by the trainer's own save."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from codelupe_trainer.training.adapters import save_adapter

    lora = LoraConfig(r=model.lora_r, lora_alpha=model.lora_alpha, lora_dropout=model.lora_dropout,
                      target_modules=list(model.target_modules), task_type="CAUSAL_LM")
    return save_adapter(get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora), output_dir, 1)


@pytest.mark.slow
def test_the_fit_check_agrees_with_peft_and_catches_what_peft_lets_through(tmp_path):
    """Read from the files alone, the verdict matches what loading the adapter onto each base model does; where
    peft loads an adapter onto a model of another depth (dropping trained layers, or leaving new ones
    untrained) with at most a warning, the check says no."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_tiny_model(tmp_path / "base")
    shipped = ModelSettings(base_model=str(base))  # r 16, alpha 32, dropout 0.05, every projection, as shipped
    adapter = save_lora(base, tmp_path / "adapters", shipped)
    assert adapter_misfit(adapter, shipped) is None

    def peft_loads_it_whole(model_dir: Path) -> bool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter))
            except RuntimeError as error:
                assert "size mismatch" in str(error)
                return False
        saved = json.loads((adapter / "adapter_config.json").read_text())
        assert saved["r"] == 16
        loaded = sum("lora_A" in name for name, _ in model.named_parameters())
        return loaded == 7 * 2 and model.peft_config["default"].r == 16

    cases = {"same shape, other weights": save_tiny_model(tmp_path / "other", seed=1),
             "narrower": save_tiny_model(tmp_path / "narrow", hidden=32),
             "shallower": save_tiny_model(tmp_path / "shallow", layers=1),
             "deeper": save_tiny_model(tmp_path / "deep", layers=3)}
    verdicts = {name: adapter_misfit(adapter, shipped.model_copy(update={"base_model": str(path)}))
                for name, path in cases.items()}
    assert verdicts["same shape, other weights"] is None and peft_loads_it_whole(cases["same shape, other weights"])
    assert "128 input features, the base model's 64" in verdicts["narrower"]
    assert not peft_loads_it_whole(cases["narrower"])  # peft refuses too, with a state_dict error
    assert "spans 2 layers and the base model has 1" in verdicts["shallower"]
    assert "spans 2 layers and the base model has 3" in verdicts["deeper"]
    assert not peft_loads_it_whole(cases["shallower"]) and not peft_loads_it_whole(cases["deeper"])
    # Each changed LoRA setting is named with the adapter's own value.
    changed = adapter_misfit(adapter, shipped.model_copy(update={"lora_r": 32, "lora_alpha": 64, "lora_dropout": 0.1,
                                                                  "target_modules": ["q_proj", "v_proj"]}))
    assert changed.split("; ") == [
        "model.lora_r = 32 (the adapter has 16)", "model.lora_alpha = 64 (the adapter has 32)",
        "model.lora_dropout = 0.1 (the adapter has 0.05)",
        "model.target_modules = ['q_proj', 'v_proj'] (the adapter has ['down_proj', 'gate_proj', 'k_proj', "
        "'o_proj', 'q_proj', 'up_proj', 'v_proj'])"]
    # The order of the modules is not a change.
    assert adapter_misfit(adapter, shipped.model_copy(update={"target_modules": shipped.target_modules[::-1]})) is None


@pytest.mark.slow
def test_a_changed_lora_setting_stops_run_once_doctor_rollback_and_a_cycle_in_one_line(crawler_table, tiny_model,
                                                                                       tmp_path, make_settings):
    """The production case: `model.lora_r` raised in the config while an adapter is in service. `run-once`
    refuses (exit 2), `doctor` fails its adapter line, `rollback` refuses, and a cycle that reads the new
    settings (the daemon's next one) fails in one recorded line before loading anything, nothing advanced."""
    from codelupe_trainer.cycle import run_cycle
    from codelupe_trainer.errors import TrainingError
    from codelupe_trainer.service.lineage import RollbackError, rollback
    from codelupe_trainer.state import TrainerState, load_state, save_state

    insert_stdlib_rows(crawler_table, start=0, count=30)
    trained = make_settings(crawler_table)  # lora_r 4, as the adapter in service was trained
    adapter = save_lora(tiny_model, trained.paths.output_dir, trained.model)
    save_state(TrainerState(last_trained_id=5, latest_adapter=str(adapter), adapter_in_use=1, total_training_runs=1,
                            lineage=[{"run": 1, "adapter": str(adapter), "promoted": True}]), trained.paths.state_file)
    config = str(tmp_path / "codelupe.toml")

    doctor = run_cli(["doctor", "--config", config], crawler_table, tmp_path)
    assert f"the next run continues {adapter}" in doctor.stdout, doctor.stdout

    changed = make_settings(crawler_table, "[model]\nbase_model = \"%s\"\nquantization = \"none\"\nlora_r = 8\n"
                            "lora_alpha = 8\nlora_dropout = 0.0" % tiny_model)
    expected = "model.lora_r = 8 (the adapter has 4)"
    completed = run_cli(["run-once", "--force", "--config", config], crawler_table, tmp_path)
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2 and len(lines) == 1 and expected in lines[0], completed.stderr
    assert "paths.state_file" in lines[0] and str(adapter) in lines[0]
    doctor = run_cli(["doctor", "--config", config], crawler_table, tmp_path)
    assert doctor.returncode == 1 and any(line.startswith("FAIL") and "adapter" in line and expected in line
                                          for line in doctor.stdout.splitlines()), doctor.stdout
    with pytest.raises(RollbackError, match="model.lora_r = 8"):
        rollback(changed, 1)

    with pytest.raises(TrainingError, match="model.lora_r = 8 \\(the adapter has 4\\)"):
        run_cycle(changed, force=True)
    state = load_state(changed.paths.state_file)
    assert state.last_trained_id == 5 and state.total_training_runs == 1 and state.latest_adapter == str(adapter)
    assert state.consecutive_failures == 1 and expected in state.last_error
    assert not (changed.paths.state_file.parent / "last-failure.txt").exists()  # an expected failure: no traceback


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["weights deleted", "weights torn", "config deleted"])
def test_an_incomplete_adapter_in_service_is_named_instead_of_failing_every_cycle_on_a_hub_error(
        crawler_table, tiny_model, tmp_path, make_settings, damage):
    """A file of the adapter in service deleted by hand or torn by a disk error: peft failed on it with
    "Repo id must be in the form 'repo_name'" at every cycle, a traceback kept each time, while `doctor` said
    ok. Now `run-once` refuses in one line naming the file and the way out (roll back), `doctor` fails its
    adapter line, a cycle fails before loading anything with nothing advanced, and `rollback` will not put
    such an adapter back."""
    from codelupe_trainer.cycle import run_cycle
    from codelupe_trainer.errors import TrainingError
    from codelupe_trainer.service.lineage import RollbackError, rollback
    from codelupe_trainer.state import TrainerState, load_state, save_state

    insert_stdlib_rows(crawler_table, start=0, count=30)
    settings = make_settings(crawler_table)
    adapter = save_lora(tiny_model, settings.paths.output_dir, settings.model)
    save_state(TrainerState(last_trained_id=5, latest_adapter=str(adapter), adapter_in_use=1, total_training_runs=1,
                            lineage=[{"run": 1, "adapter": str(adapter), "promoted": True}]), settings.paths.state_file)
    weights, config_file = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    if damage == "weights deleted":
        weights.unlink()
    elif damage == "weights torn":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        config_file.unlink()
    missing = config_file.name if damage == "config deleted" else weights.name
    expected = f"the adapter in service ({adapter}) is incomplete: its {missing} is missing or unreadable"
    config = str(tmp_path / "codelupe.toml")

    completed = run_cli(["run-once", "--force", "--config", config], crawler_table, tmp_path)
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2 and len(lines) == 1 and expected in lines[0], completed.stderr
    assert "codelupe-trainer rollback N" in lines[0]
    doctor = run_cli(["doctor", "--config", config], crawler_table, tmp_path)
    assert f"FAIL adapter: {expected}" in doctor.stdout, doctor.stdout
    with pytest.raises(TrainingError, match="is incomplete: its "):
        run_cycle(settings, force=True)
    state = load_state(settings.paths.state_file)
    assert state.last_trained_id == 5 and state.total_training_runs == 1 and state.consecutive_failures == 1
    assert not (settings.paths.state_file.parent / "last-failure.txt").exists()  # an expected failure: no traceback
    with pytest.raises(RollbackError):
        rollback(settings, 1)


def test_a_mixture_of_experts_adapter_fits_its_own_model():
    """Qwen3-Coder-30B-A3B's shape: the experts' MLP projections are moe_intermediate_size wide, not
    intermediate_size; an adapter on them fits its model, and the dense 7B's does not."""
    moe = {"hidden_size": 2048, "num_hidden_layers": 48, "intermediate_size": 6144, "moe_intermediate_size": 768,
           "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128}
    experts = {"intermediate_size": moe["moe_intermediate_size"]}
    adapter = [(layer, module, matrix, shape) for layer, module, matrix, shape in lora_matrices(moe | experts)
               if module in ("gate_proj", "up_proj", "down_proj")]
    # Attention with head_dim 128 x 32 heads = 4,096, wider than the 2,048 hidden size.
    adapter += [(layer, "q_proj", "A", (16, 2048)) for layer in range(48)]
    adapter += [(layer, "q_proj", "B", (4096, 16)) for layer in range(48)]
    assert base_model_misfit(adapter, moe) is None
    assert "q_proj has 4096 output features, the base model's 2048" in base_model_misfit(
        adapter, moe | {"head_dim": 64})
    assert base_model_misfit(lora_matrices(QWEN_7B_CONFIG), moe) is not None
