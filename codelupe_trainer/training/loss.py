"""The causal-LM loss without the vocabulary-sized fp32 logits.

transformers computes `lm_head` over every token and upcasts the logits to fp32 for the loss: at the shipped
4 blocks x 2,048 tokens x 152,064 vocabulary that is ~5 GB in fp32, saved again for backward, plus the bf16
logits and their gradient. Two ways out, chosen by `training.loss`:

- `fused`: Liger-Kernel's fused linear cross-entropy (Triton, CUDA only), applied through the Trainer's
  `use_liger_kernel`; never materialises the logits.
- `chunked`: pure PyTorch, here. The hidden states go through `lm_head` a chunk of tokens at a time, each
  chunk's logits and loss under activation checkpointing, so only one chunk's logits exist at any moment in
  forward or backward (the idea of torchtune's `CEWithChunkedOutputLoss` and litgpt's `chunked_cross_entropy`,
  with recomputation so backward does not keep every chunk's logits either).
- `standard`: the model's own loss.

`auto` is `fused` on CUDA when liger_kernel is installed and has kernels for the model's type, else `chunked`
(the Trainer leaves a model Liger does not know unpatched, with a warning, and it would train on its own loss).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import TrainingError

IGNORE_INDEX = -100
# 2,048 tokens x 152,064 vocabulary x 4 bytes = 1.2 GB of fp32 logits per chunk at most.
CHUNK_TOKENS = 2048


def liger_supports(model_type: str | None) -> bool:
    """Liger-Kernel is installed and patches this model type (its own registry). None: the type is not known
    here, and only the installation is asked about."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    if model_type is None:
        return True
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # an installation that cannot load (no Triton, another torch): it patches nothing
        return False
    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def resolve_loss(setting: str, device: str, model_type: str | None = None) -> str:
    if setting == "fused" and device != "cuda":  # Liger's kernels are Triton on CUDA
        raise TrainingError('training.loss = "fused" runs on CUDA only and this machine has no CUDA device: use '
                            '"auto" (chunked here) or "chunked"')
    if setting == "fused" and model_type is not None and liger_supports(None) and not liger_supports(model_type):
        raise TrainingError(f'training.loss = "fused": Liger-Kernel has no kernels for model type {model_type!r} and '
                            'would leave it on its own loss (full fp32 logits); use "auto" (chunked for it) or "chunked"')
    if setting != "auto":
        return setting
    if device == "cuda" and liger_supports(model_type):
        return "fused"
    return "chunked"


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden.to(weight.dtype), weight).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           num_items_in_batch: torch.Tensor | int | None = None,
                           chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """The same value as transformers' ForCausalLMLoss: position t predicts labels[t + 1]; the sum of the
    token losses divided by `num_items_in_batch` (the Trainer's count over all accumulated micro-batches),
    or by this batch's count of labelled tokens."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = flat.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_tokens):
        chunk_hidden, chunk_targets = flat[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, chunk_hidden, weight, chunk_targets, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(chunk_hidden, weight, chunk_targets)
    denominator = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator


def causal_lm_parts(model):
    """(decoder, lm_head) of a causal LM, through peft's and accelerate's wrappers."""
    inner = model
    while hasattr(inner, "module"):  # DDP / accelerate wrappers
        inner = inner.module
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    return inner.get_decoder(), inner.get_output_embeddings()


def chunked_model_loss(model, inputs: dict, num_items_in_batch=None, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Run the model for its decoder's hidden states, then the chunked loss over them (no full logits).

    The forward goes through `model` itself, wrappers included, never straight to the decoder: DDP's
    gradient averaging across ranks is armed by its forward (called past it, every rank kept its own
    gradients and rank 0 saved an adapter that had learned only its share of the rows). The head runs on
    the last position only (`logits_to_keep=1`); the decoder's output is taken by a hook on the way.
    """
    decoder, lm_head = causal_lm_parts(model)
    model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    captured = []
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        model(**model_inputs, logits_to_keep=1)
    finally:
        handle.remove()
    [hidden] = captured
    return chunked_causal_lm_loss(hidden, lm_head.weight, inputs["labels"], num_items_in_batch, chunk_tokens)
