"""How much arithmetic a LoRA training token costs, and what fraction of the card's peak a rate means (MFU).

Counted from the model's config (a dict, as in config.json), never by walking the loaded model: a quantized
model wrapped by peft holds each projection twice in its module tree (peft's `Linear4bit` around
bitsandbytes' `Linear4bit`), and a count by module type once reported twice the real figure.

The convention is PaLM's model FLOPs, for a frozen base: per token, forward 2N and the input gradients 2N
over the N parameters of the matmuls (the decoder's projections and the LM head); no weight gradients for the
frozen base; the recomputation of checkpointed layers, attention's own products and the small LoRA matmuls
are not counted. So MFU is a lower bound on what the card really computes: with gradient checkpointing it
computes about 1.5 times these FLOPs.
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a part of the name torch or NVML reports. Longer
# names first: "H100 PCIe" must win over "H100".
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "RTX 6000 Ada": 364e12,
    "RTX 5090": 209.5e12,
    "RTX 5080": 112.6e12,
    "RTX 4090": 165.2e12,
    "RTX 3090": 71e12,
}


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(inputs, outputs) of each projection of one decoder layer of a Qwen2/Llama-shaped model."""
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_width = head_dim * config.get("num_key_value_heads", heads)
    return {"q_proj": (hidden, head_dim * heads), "k_proj": (hidden, kv_width), "v_proj": (hidden, kv_width),
            "o_proj": (head_dim * heads, hidden), "gate_proj": (hidden, intermediate),
            "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden)}


def decoder_matmul_parameters(config: dict) -> int:
    """Parameters of every decoder layer's projections."""
    return config["num_hidden_layers"] * sum(inputs * outputs for inputs, outputs in projection_shapes(config).values())


def matmul_parameters(config: dict) -> int:
    """N: the decoder's projections plus the LM head (the embedding is a lookup, not a matmul)."""
    return decoder_matmul_parameters(config) + config["vocab_size"] * config["hidden_size"]


def training_flops_per_token(config: dict) -> float:
    """4N: forward and input gradients through a frozen base (see the module's docstring)."""
    return 4.0 * matmul_parameters(config)


def peak_flops(device_name: str) -> float | None:
    """The card's dense bf16 peak from its name, or None for a card this table does not know."""
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def utilisation(tokens_per_second: float, flops_per_token: float, peak: float) -> float:
    """MFU as a fraction of `peak` (all the ranks' peaks together when the tokens are theirs together)."""
    return tokens_per_second * flops_per_token / peak
