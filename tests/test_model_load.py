"""The base model as the cycle loads it: the weights a 4-bit quantization leaves unquantized, and their dtype
(`model.frozen_dtype`). The speed and memory it buys are measured on CUDA (benchmarks/train_throughput.py's
`ours-bf16-rest`); here, on the CPU, that the cast touches exactly the frozen unquantized weights."""

from __future__ import annotations

import torch

from codelupe_trainer.config import ModelSettings
from codelupe_trainer.training.model import attach_adapter, cast_frozen_unquantized, load_base_model


def dtypes(model) -> dict[str, torch.dtype]:
    return {name: parameter.dtype for name, parameter in model.named_parameters()}


def test_keeping_the_frozen_weights_in_bf16_casts_embeddings_head_and_norms_and_nothing_else(tiny_model):
    settings = ModelSettings(base_model=str(tiny_model), quantization="4bit", lora_r=4, lora_alpha=8,
                             frozen_dtype="bfloat16")
    base, quantization = load_base_model(settings, "cpu")
    assert quantization == "4bit"
    # The CPU trains in fp32 without an autocast to take a bf16 residual stream: the setting is for CUDA.
    prepared = dtypes(base)
    unquantized = [name for name, parameter in base.named_parameters()
                   if parameter.__class__.__name__ != "Params4bit"]
    assert {prepared[name] for name in unquantized} == {torch.float32}  # peft's k-bit preparation upcast them
    assert any(name.endswith("embed_tokens.weight") for name in unquantized)
    assert any("norm" in name for name in unquantized)

    assert cast_frozen_unquantized(base, torch.bfloat16) == len(unquantized)
    cast = dtypes(base)
    assert {cast[name] for name in unquantized} == {torch.bfloat16}
    assert all(cast[name] == prepared[name] for name in prepared if name not in unquantized)  # 4-bit untouched
    assert cast_frozen_unquantized(base, torch.bfloat16) == 0  # nothing left to cast

    model = attach_adapter(base, settings, None)
    lora = [parameter for parameter in model.parameters() if parameter.requires_grad]
    assert lora and {parameter.dtype for parameter in lora} == {torch.float32}  # the trained weights stay fp32
