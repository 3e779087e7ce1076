"""Whether the adapter in service can be continued under today's model settings, read from its files without
importing torch (so `doctor`, `run` and a cycle can say it before loading a model).

Each run continues from the adapter in service, and peft rebuilds that adapter from its own saved config: a
`model.lora_r`, `lora_alpha`, `lora_dropout` or `target_modules` changed since would be silently ignored (and
the run's W&B config and adapter card would show the new values for an adapter that has the old ones). A base
model with other dimensions cannot carry it at all. Both are one clear line instead.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..config import ModelSettings
from .adapters import ADAPTER_WEIGHTS
from .model_files import base_model_config

ADAPTER_CONFIG = "adapter_config.json"
# peft's key for one LoRA matrix: ...layers.<i>.<module path>.lora_A.weight (or lora_B).
_LORA_KEY = re.compile(r"\.layers\.(\d+)\.(?:.*\.)?(\w+)\.lora_([AB])\.weight$")


def read_adapter_config(adapter_dir: Path) -> dict | None:
    try:
        return json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def changed_lora_settings(saved: dict, model: ModelSettings) -> list[str]:
    """'model.lora_r = 32 (the adapter has 16)' for each LoRA setting that differs from the adapter's own."""
    pairs = [
        ("lora_r", model.lora_r, saved.get("r")),
        ("lora_alpha", model.lora_alpha, saved.get("lora_alpha")),
        ("lora_dropout", model.lora_dropout, saved.get("lora_dropout")),
    ]
    changed = [f"model.{name} = {wanted} (the adapter has {had})" for name, wanted, had in pairs
               if had is not None and not math.isclose(float(wanted), float(had), abs_tol=1e-9)]
    modules = saved.get("target_modules")
    if isinstance(modules, list) and set(modules) != set(model.target_modules):
        changed.append(f"model.target_modules = {sorted(model.target_modules)} (the adapter has {sorted(modules)})")
    return changed


def lora_shapes(adapter_dir: Path) -> list[tuple[int, str, str, tuple[int, ...]]] | None:
    """(layer, module, 'A' or 'B', shape) of every LoRA matrix in the adapter's weights, from the file's header."""
    try:
        from safetensors import safe_open

        with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="numpy") as weights:
            found = []
            for key in weights.keys():
                match = _LORA_KEY.search(key)
                if match:
                    layer, module, matrix = int(match.group(1)), match.group(2), match.group(3)
                    found.append((layer, module, matrix, tuple(weights.get_slice(key).get_shape())))
            return found
    except Exception:  # no file, a torn or foreign one: the load itself will say what is wrong
        return None


def base_model_misfit(shapes: list[tuple[int, str, str, tuple[int, ...]]], config: dict) -> str | None:
    """Why the adapter's matrices cannot sit on a model with this config.json, or None.

    LoRA's A is (r, in) and B is (out, r) for the projection it adapts; the widths of the Qwen2/Llama
    projections follow from the config (the MLP's from any of its intermediate sizes: a mixture-of-experts
    model's experts and shared expert have their own). Projections of other names are left to the load."""
    text = config.get("text_config", config)  # multimodal configs nest the language model's
    try:
        hidden = int(text["hidden_size"])
        layers = int(text["num_hidden_layers"])
        heads = int(text.get("num_attention_heads", 1))
        head_dim = int(text.get("head_dim") or hidden // heads)
        key_value = int(text.get("num_key_value_heads", heads)) * head_dim
        inner = {int(text[key]) for key in ("intermediate_size", "moe_intermediate_size",
                                            "shared_expert_intermediate_size") if text.get(key)} or {hidden}
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None  # a config we cannot read: leave the verdict to the load
    attention = heads * head_dim
    in_out = {"q_proj": ({hidden}, {attention}), "k_proj": ({hidden}, {key_value}), "v_proj": ({hidden}, {key_value}),
              "o_proj": ({attention}, {hidden}), "gate_proj": ({hidden}, inner), "up_proj": ({hidden}, inner),
              "down_proj": (inner, {hidden})}
    # Our LoRA always spans every layer: another count is another model (peft would drop the extra layers'
    # weights without a word, or leave the missing ones untrained).
    deepest = max((layer for layer, _, _, _ in shapes), default=layers - 1)
    if deepest + 1 != layers:
        return f"the adapter spans {deepest + 1} layers and the base model has {layers}"
    for layer, module, matrix, shape in shapes:
        if module not in in_out:
            continue
        width = shape[1] if matrix == "A" else shape[0]
        expected = in_out[module][0 if matrix == "A" else 1]
        if width not in expected:
            side = "input" if matrix == "A" else "output"
            wanted = " or ".join(str(value) for value in sorted(expected))
            return f"its layer {layer} {module} has {width} {side} features, the base model's {wanted}"
    return None


def adapter_misfit(adapter_dir: Path, model: ModelSettings) -> str | None:
    """What in today's model settings the adapter in `adapter_dir` cannot be continued with, or None."""
    saved = read_adapter_config(adapter_dir)
    if saved is None:
        return None  # an adapter without a readable config: peft's load fails on it, with its own message
    changed = changed_lora_settings(saved, model)
    shapes = lora_shapes(adapter_dir)
    config = base_model_config(model.base_model)
    misfit = base_model_misfit(shapes, config) if shapes and config else None
    if misfit:
        changed.append(f"model.base_model = {model.base_model!r} does not fit it ({misfit})")
    return "; ".join(changed) or None


def adapter_incomplete(adapter_dir: Path) -> str | None:
    """What of a saved adapter is missing or unreadable (a file deleted by hand, a disk error), or None. peft
    would fail on it with an error about hub repository ids, at every cycle."""
    if read_adapter_config(adapter_dir) is None:
        return f"its {ADAPTER_CONFIG} is missing or unreadable"
    shapes = lora_shapes(adapter_dir)
    if shapes is None:
        return f"its {ADAPTER_WEIGHTS} is missing or unreadable"
    if not shapes:
        return f"its {ADAPTER_WEIGHTS} holds no LoRA matrix"
    return None


def in_service_misfit(adapter_dir: Path, model: ModelSettings) -> str | None:
    """The one line a cycle, `run` and `doctor` give when the next run cannot continue the adapter in service."""
    broken = adapter_incomplete(adapter_dir)
    if broken:
        return (f"the adapter in service ({adapter_dir}) is incomplete: {broken}, and each run continues from it. Put "
                "an earlier one back (`codelupe-trainer adapters` lists them, `codelupe-trainer rollback N`), or start "
                "a new adapter: paths.output_dir and paths.state_file in a new directory (every row trains again)")
    misfit = adapter_misfit(adapter_dir, model)
    if misfit is None:
        return None
    return (f"the adapter in service ({adapter_dir}) was trained with other model settings, and each run continues "
            f"from it: {misfit}. Set them back, or start a new adapter: paths.output_dir and paths.state_file in a "
            "new directory (every row trains again)")
