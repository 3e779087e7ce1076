"""The base model and its LoRA adapter: device choice, loading (4-bit on CUDA), attaching or continuing the
adapter, and the packing probe. Imports torch, transformers and peft; knows nothing of the Trainer loop."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from ..config import ModelSettings, is_local_model
from ..errors import TrainingError
from ..faults import crash_point

log = logging.getLogger(__name__)


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def from_cache_first(load, name: str, cache_only: dict[str, Any] | None = None, **kwargs):
    """`load(name, ...)` (a from_pretrained), from the local Hugging Face cache alone when the model is wholly
    there, and from the hub only for what is missing (a first or interrupted download).

    Left to itself, transformers asks the hub about every file of a cached model on each load (56 requests for
    a small one), so a hub outage answering 5xx costs each cycle minutes of retries (184 s for a tiny model:
    benchmarks/cached_model_load.py), and a new revision pushed to the hub would be downloaded and trained on behind the adapter in
    service. From the cache the base stays the revision on disk until someone downloads another.
    `cache_only`: more arguments for the cache-only attempt."""
    if not is_local_model(name):
        try:
            return load(name, local_files_only=True, **(cache_only or {}), **kwargs)
        except OSError:  # transformers' "not in the cache" (also for one missing shard)
            log.info("%s is not wholly in the local Hugging Face cache: fetching what is missing from the hub", name)
    return load(name, **kwargs)


def load_tokenizer(base_model: str):
    tokenizer = from_cache_first(AutoTokenizer.from_pretrained, base_model)
    # An empty tokenizer (files damaged or from another model) reads all code as no tokens: nothing would
    # train, and the rows would still count as consumed.
    if len(tokenizer) < 256 or not tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]:
        raise TrainingError(f"the tokenizer of model.base_model {base_model!r} is empty ({len(tokenizer)} tokens): "
                            "its tokenizer files are damaged or missing; copy them from the model's hub repository")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


TOKENIZER_PROBE = "def main():\n    return 0\n"


def quiet_progress_bars_off_a_terminal() -> None:
    """transformers' "Loading weights" bars are for a person at a terminal; in the journal or a pipe they are
    lines of control characters (and tqdm's lock leaks a semaphore warning when a cycle is stopped)."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def load_base_model(model_settings: ModelSettings, device: str, device_index: int = 0):
    """`device_index`: the GPU of this training rank (one process per GPU when training.num_processes > 1)."""
    crash_point("load")
    if device != "cuda" and model_settings.attn_implementation == "flash_attention_2":
        raise TrainingError('model.attn_implementation = "flash_attention_2" runs on CUDA only and this machine has '
                            'no CUDA device: use "sdpa" here')
    quiet_progress_bars_off_a_terminal()
    quantization = model_settings.quantization_on(device)
    compute_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kwargs: dict[str, Any] = {"dtype": compute_dtype, "attn_implementation": model_settings.attn_implementation}
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    kwargs["device_map"] = {"": device_index} if device == "cuda" else "cpu"
    # transformers does not pass local_files_only on to its check for an adapter repository: said again.
    model = from_cache_first(AutoModelForCausalLM.from_pretrained, model_settings.base_model,
                             cache_only={"adapter_kwargs": {"local_files_only": True}}, **kwargs)
    # A KV cache in training would hide the packed-sequence layout from the attention mask builder.
    model.config.use_cache = False
    if quantization in ("4bit", "8bit"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if device == "cuda" and model_settings.frozen_dtype == "bfloat16":
            # Only on CUDA, where the Trainer's bf16 autocast is there to take a bf16 residual stream; the CPU
            # trains in fp32 without one.
            cast_frozen_unquantized(model, torch.bfloat16)
    return model, quantization


def cast_frozen_unquantized(model, dtype: torch.dtype) -> int:
    """Cast the frozen weights a k-bit preparation left unquantized (embeddings, LM head, norms: every frozen
    floating-point parameter that is not a 4-bit or 8-bit one) to `dtype`; returns how many were cast.

    peft upcasts them to fp32 for fp16 training's sake. Under bf16 autocast that costs twice their memory (~4.4
    instead of 2.2 GB on the 7B), a cast of the LM head's 545 M weights back to bf16 on every forward, and an
    fp32 residual stream through every norm: benchmarks/train_throughput.py's ours-bf16-rest variant.
    """
    cast = 0
    for parameter in model.parameters():
        quantized = parameter.__class__.__name__ in ("Params4bit", "Int8Params")
        if not parameter.requires_grad and not quantized and parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
            cast += 1
    return cast


def attach_adapter(base_model, model_settings: ModelSettings, previous_adapter: Path | None):
    """Continue from the previous adapter (trainable) or start a fresh LoRA."""
    if previous_adapter is not None:
        model = PeftModel.from_pretrained(base_model, str(previous_adapter), is_trainable=True)
    else:
        config = LoraConfig(
            r=model_settings.lora_r,
            lora_alpha=model_settings.lora_alpha,
            lora_dropout=model_settings.lora_dropout,
            target_modules=list(model_settings.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base_model, config)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise TrainingError(f"the adapter has no trainable parameters (loaded from {previous_adapter})")
    return model


def packing_is_isolated(model) -> bool:
    """Probe the loaded model: do restarting position ids keep packed samples apart on its attention backend?

    The logits of a short sequence packed after another must match those of it alone, far more closely than
    the same sequence read as a continuation (the leak we are guarding against). Run in train mode without
    gradients: the base model has no dropout, and eval mode would make bitsandbytes repack 4-bit weights.
    """
    device = next(model.parameters()).device
    first, second = [11, 12, 13, 14, 15, 16], [21, 22, 23, 24]
    packed = torch.tensor([first + second], device=device)
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))], device=device)
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([second], device=device)).logits[0].float()
            isolated = model(input_ids=packed, position_ids=positions).logits[0, len(first):].float()
            leaked = model(input_ids=packed).logits[0, len(first):].float()
    finally:
        model.train(was_training)
    isolation_error = (isolated - alone).abs().max().item()
    leak = (leaked - alone).abs().max().item()
    return isolation_error <= 0.1 * leak or isolation_error < 1e-4


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total). A 4-bit weight packs two values in a byte, so its numel() is half the parameters
    it stands for; peft's own count corrects for that, so use it where the model is a peft model."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    return trainable, total



def choose_packing(setting: str, base_model) -> str:
    """`auto` packs only if the probe shows this model's attention keeps packed samples apart."""
    if setting != "auto":
        return setting
    if packing_is_isolated(base_model):
        return "position_ids"
    log.warning("this attention backend does not keep packed samples apart: one sample per row, length-grouped")
    return "length_grouped"
