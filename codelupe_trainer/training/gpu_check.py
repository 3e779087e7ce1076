"""Will the configured run fit, and can this torch build drive this GPU? Used by `doctor` and at daemon start.

The memory estimate is arithmetic on the model's config.json (no torch needed). Its terms, for a 4-bit base:
NF4 weights (half a byte a parameter, ~3 % for the double-quantised constants); embeddings and lm_head in
fp32 (peft's `prepare_model_for_kbit_training` upcasts every non-quantised parameter) unless
`model.frozen_dtype` keeps them in bf16; LoRA weights, their gradients and 8-bit Adam states; 2.5 GB of CUDA
context and allocator slack; and the larger of two peaks that come at different moments: backward through the
layers (with gradient checkpointing one hidden state per layer, in fp32 when the norms and embeddings are fp32
and in bf16 otherwise, plus a recomputed layer, 1.9 times its bf16 activations as measured) and the loss (the
saved hidden states plus 12 bytes a logit: bf16, fp32 and both gradients; all tokens for `standard`, one
2,048-token chunk for `chunked`, none for `fused`). Calibrated on the Qwen2.5-Coder-7B architecture at the
shipped defaults under the Trainer's bf16 autocast on an H200 (benchmarks/results/2026-11-30-h200-gpu-check.txt,
peaks of allocated memory, which leave out the CUDA context): tests/test_operations.py holds the figures.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import Settings
from ..errors import TrainingError
from .flops import decoder_matmul_parameters, projection_shapes
from .model_files import base_model_config

GB = 1e9
OVERHEAD_GB = 2.5
CPU_OVERHEAD_GB = 1.0  # the Python process with torch and transformers loaded
# Parameters above which the CPU is no place to train: a step of the 7B there takes many minutes.
CPU_PARAMETER_LIMIT = 1e9


def estimate_memory_gb(config: dict, settings: Settings, quantized: bool, loss: str, device: str = "cuda") -> dict[str, float]:
    """GPU memory on CUDA (bf16 compute); on the CPU, host memory, where everything unquantized is fp32 (twice the
    bytes) and there is no CUDA context (the 12 bytes a logit match the measured CPU peaks too: 5.0 GB chunked and
    8.7 GB standard for the 152,064-token tiny model at 4 x 1,024 tokens, estimated 5.1 and 8.8)."""
    width = 2 if device == "cuda" else 4  # bytes of an unquantized weight or an activation
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    vocab, intermediate = config["vocab_size"], config["intermediate_size"]
    shapes = projection_shapes(config)
    linear = decoder_matmul_parameters(config)
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    rank = settings.model.lora_r
    lora = layers * sum(rank * (inputs + outputs) for name, (inputs, outputs) in shapes.items()
                        if name in settings.model.target_modules)
    tokens = settings.training.batch_size * settings.data.max_length
    one_layer = tokens * (hidden * 12 + intermediate * 4) * width
    # Bytes of a frozen unquantized weight (embeddings, head, norms): fp32 on the CPU, and after a k-bit
    # preparation unless model.frozen_dtype keeps them bf16. fp32 norms make the residual stream, and so each
    # checkpointed layer input, fp32 too.
    frozen_width = 4 if device != "cuda" or (quantized and settings.model.frozen_dtype == "float32") else 2
    saved_hidden = layers * tokens * hidden * frozen_width
    if settings.training.gradient_checkpointing:
        backward_peak = saved_hidden + 1.9 * one_layer
    else:
        backward_peak = layers * one_layer
    from .loss import CHUNK_TOKENS

    loss_tokens = {"standard": tokens, "chunked": min(tokens, CHUNK_TOKENS), "fused": 0}[loss]
    # bf16 logits, their fp32 copy, and the gradients of both: 12 bytes a logit.
    loss_bytes = loss_tokens * vocab * 12
    parts = {
        "weights": linear * (0.5 * 1.03 if quantized else width) / GB,
        "embeddings_and_head": embeddings * frozen_width / GB,
        "lora_and_optimizer": lora * (4 + 4 + 2) / GB,
        "overhead": OVERHEAD_GB if device == "cuda" else CPU_OVERHEAD_GB,
        # The peaks of backward through the layers and of the loss come at different moments: the larger counts.
        "activations": backward_peak / GB,
        "loss_phase": (saved_hidden + loss_bytes) / GB,
    }
    parts["total"] = (parts["weights"] + parts["embeddings_and_head"] + parts["lora_and_optimizer"]
                      + parts["overhead"] + max(parts["activations"], parts["loss_phase"]))
    return parts


def describe_estimate(parts: dict[str, float]) -> str:
    details = ", ".join(f"{name.replace('_', ' ')} {value:.1f}" for name, value in parts.items() if name != "total")
    return f"~{parts['total']:.1f} GB ({details})"


def cuda_checks(required_gb: float | None) -> list[tuple[str, bool, str]]:
    """Compute capability against the build's kernels, bf16, a 4-bit matmul, free memory. CUDA only."""
    import torch

    if not torch.cuda.is_available():
        return [("gpu", True, "no CUDA device: training runs on the CPU (slowly)")]
    results = []
    major, minor = torch.cuda.get_device_capability(0)
    name = torch.cuda.get_device_name(0)
    arch = f"sm_{major}{minor}"
    built_for = torch.cuda.get_arch_list()
    # A build runs a card if it has its exact kernels or PTX of an older arch of the same major to JIT from.
    has_kernels = arch in built_for or any(item.startswith("compute_") and int(item[8:]) // 10 == major
                                           and int(item[8:]) <= major * 10 + minor for item in built_for)
    results.append(("gpu", has_kernels, f"{name} ({arch}); torch {torch.__version__} CUDA {torch.version.cuda} "
                    + ("has kernels for it" if has_kernels else f"has no kernels for it (built for {', '.join(built_for)}): "
                       "install a torch build for this card (RTX 5090: torch >= 2.7 with CUDA 12.8)")))
    results.append(("bf16", torch.cuda.is_bf16_supported(), "bf16 supported" if torch.cuda.is_bf16_supported()
                    else "no bf16 on this card: training needs it"))
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(256, 256, compute_dtype=torch.bfloat16, quant_type="nf4").to("cuda")
        output = layer(torch.randn(4, 256, device="cuda", dtype=torch.bfloat16))
        ok = bool(torch.isfinite(output).all())
        results.append(("4-bit", ok, f"bitsandbytes {bnb.__version__} NF4 matmul " + ("ok" if ok else "gave non-finite values")))
    except Exception as error:
        results.append(("4-bit", False, f"bitsandbytes NF4 matmul failed: {type(error).__name__}: {error}"))
    free, total = torch.cuda.mem_get_info(0)
    if required_gb is None:
        results.append(("gpu memory", True, f"{free / GB:.1f} of {total / GB:.1f} GB free (no estimate: model config not found)"))
    else:
        fits = free / GB >= required_gb
        results.append(("gpu memory", fits, f"{free / GB:.1f} of {total / GB:.1f} GB free; the run needs ~{required_gb:.1f} GB"
                        + ("" if fits else ": lower training.batch_size or data.max_length (the OOM back-off would "
                                          "halve the micro-batch on every cycle)")))
    return results


def self_check(settings: Settings) -> list[tuple[str, bool, str]]:
    """The memory estimate for the configured run, then the CUDA checks when a GPU is present."""
    import torch

    from .loss import resolve_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantized = settings.model.quantization_on(device) != "none"
    config = base_model_config(settings.model.base_model)
    try:
        loss = resolve_loss(settings.training.loss, device, (config or {}).get("model_type"))
    except TrainingError as error:
        return [("loss", False, str(error))]
    results = []
    required = None
    if config is None:
        results.append(("memory estimate", True, "model config not available locally: estimate after the first download"))
    else:
        try:
            parts = estimate_memory_gb(config, settings, quantized, loss, device)
        except (KeyError, TypeError, ValueError) as error:  # a config.json that is not a causal LM's
            return [("memory estimate", False, f"the model's config.json cannot be read as a decoder's ({error!r} missing)")]
        required = parts["total"]
        results.append(("memory estimate", True,
                        f"{describe_estimate(parts)} for micro-batch {settings.training.batch_size} x "
                        f"{settings.data.max_length} tokens, {'4-bit' if quantized else 'unquantized'}, {loss} loss"))
    if device == "cuda":
        results += cuda_checks(required)
    elif config is not None:
        results += cpu_checks(config, required)
    return results


def cpu_checks(config: dict, required_gb: float) -> list[tuple[str, bool | None, str]]:
    """Without CUDA the run trains on the CPU in fp32 from host memory: say when it cannot fit there (the
    kernel's OOM killer would end every cycle) and when the model is too large to train there usefully."""
    total, available = host_memory_gb()
    if required_gb > total:
        fit: tuple[str, bool | None, str] = (
            "memory", False, f"the run needs ~{required_gb:.1f} GB of RAM on the CPU (fp32, no CUDA device here) and this "
            f"machine has {total:.1f} GB: the kernel's out-of-memory killer would end every cycle. Run it on the GPU box "
            "(see Install), or try a smaller model.base_model here")
    elif required_gb > available:
        fit = ("memory", None, f"the run needs ~{required_gb:.1f} GB of RAM on the CPU; {available:.1f} of {total:.1f} GB "
                               "are available now: other processes would have to give some back")
    else:
        fit = ("memory", True, f"~{required_gb:.1f} GB of RAM for the run on the CPU; {available:.1f} of {total:.1f} GB available")
    results = [fit]
    embeddings = config["vocab_size"] * config["hidden_size"] * (1 if config.get("tie_word_embeddings") else 2)
    parameters = decoder_matmul_parameters(config) + embeddings
    if parameters > CPU_PARAMETER_LIMIT:
        results.append(("cpu", None, f"{parameters / 1e9:.1f} B parameters to train on the CPU: each optimizer step "
                                     "takes minutes; codelupe-trainer is built for a CUDA GPU (see Install)"))
    return results


def host_memory_gb() -> tuple[float, float]:
    """(total, available) host memory, from /proc/meminfo (Linux; elsewhere the total for both)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return total, int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return total, total
