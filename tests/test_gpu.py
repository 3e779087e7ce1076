"""On a CUDA machine: the self-check passes, the chunked and fused losses agree with the model's own loss
through the real 4-bit path (bitsandbytes NF4, peft LoRA, bf16), a real CUDA out-of-memory error is backed off,
and the daemon's training loop trains at the shipped batch without a phase that builds full logits. Skipped
without CUDA (`benchmarks/gpu_check.sh` runs them on a GPU box).

Self-contained (no conftest fixtures) so it also runs with `pytest --noconftest` on a GPU box that lacks the
database client libraries.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def four_bit_lora(tmp_path_factory):
    # LoRA B not at zero: the adapter's gradients and outputs are not trivially those of the base.
    return fresh_four_bit_lora(tmp_path_factory.mktemp("qwen2-152k"), init_lora_weights=False).train()


def packed_blocks() -> list:
    """Three packed blocks of random tokens (the same ones every call)."""
    from codelupe_trainer.data.packing import Block, TokenizedSample

    generator = torch.Generator().manual_seed(3)
    blocks = []
    for lengths in ([700, 300], [1000], [512, 200, 200]):
        block = Block()
        for index, length in enumerate(lengths):
            block.add(TokenizedSample.of(index, torch.randint(10, 150000, (length,), generator=generator).tolist()))
        blocks.append(block.seal())
    return blocks


def batch(device: str = "cuda") -> dict:
    from codelupe_trainer.data.collate import PackedCollator

    return {key: value.to(device) for key, value in PackedCollator(pad_token_id=0)(packed_blocks()).items()}


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {name: parameter.grad.float().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_the_gpu_self_check_passes():
    from codelupe_trainer.training.gpu_check import cuda_checks

    results = cuda_checks(required_gb=1.0)
    assert [name for name, ok, _ in results if not ok] == [], results


def test_chunked_loss_matches_the_model_loss_on_the_4bit_path(four_bit_lora):
    from codelupe_trainer.training.loss import chunked_model_loss

    model, inputs = four_bit_lora, batch()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        standard = model(**inputs).loss
    standard.backward()
    expected = lora_grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        chunked = chunked_model_loss(model, inputs, chunk_tokens=512)
    chunked.backward()
    got = lora_grads(model)
    model.zero_grad(set_to_none=True)
    assert chunked.item() == pytest.approx(standard.item(), rel=2e-3)
    for name in expected:
        cosine = torch.nn.functional.cosine_similarity(got[name].flatten(), expected[name].flatten(), dim=0)
        assert cosine > 0.99, name


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")
def test_fused_loss_matches_the_model_loss(four_bit_lora):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    from codelupe_trainer.training.loss import causal_lm_parts

    model, inputs = four_bit_lora, batch()
    decoder, head = causal_lm_parts(model)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        standard = model(**inputs).loss.item()
        hidden = decoder(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).last_hidden_state
        targets = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[..., 1:].reshape(-1)
        fused = liger_fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]).to(head.weight.dtype),
                                                 head.weight, targets, ignore_index=-100).item()
    assert fused == pytest.approx(standard, rel=5e-3)


def test_the_holdout_evaluation_matches_the_model_loss_on_the_4bit_path(four_bit_lora):
    """The promotion gate's evaluation (chunked loss under bf16 autocast, token-weighted) is the model's own
    loss on the same batch: one batch of three packed blocks."""
    from codelupe_trainer.training.loop import evaluate_holdout

    blocks = packed_blocks()
    model = four_bit_lora
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        standard = model(**batch()).loss.item()
    measured = evaluate_holdout(model, {"python": blocks}, pad_token_id=0, batch_size=4, device="cuda")
    assert measured["python"][0] == pytest.approx(standard, rel=5e-3)
    again = evaluate_holdout(model, {"python": blocks}, pad_token_id=0, batch_size=4, device="cuda")
    assert again["python"][0] == pytest.approx(measured["python"][0], rel=1e-5)  # the same batches every time
    assert model.training  # evaluation puts the model back in training mode


# The daemon's own training loop on the GPU: train_adapter (the Trainer with bf16, paged 8-bit AdamW, gradient
# checkpointing) over a 4-bit tiny Qwen2 with the 7B's vocabulary, at the shipped batch 4 x accumulation 4.


def fresh_four_bit_lora(directory, frozen_dtype: str = "float32", init_lora_weights: bool = True):
    """A tiny Qwen2 with the 7B's 152,064-token vocabulary, loaded as the cycle loads a base (4-bit NF4), with a
    LoRA on three projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from codelupe_trainer.config import ModelSettings
    from codelupe_trainer.training.model import load_base_model

    if not (directory / "config.json").exists():
        torch.manual_seed(0)
        config = Qwen2Config(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=152064, tie_word_embeddings=False)
        Qwen2ForCausalLM(config).save_pretrained(directory)
    base, _ = load_base_model(ModelSettings(base_model=str(directory), quantization="4bit", frozen_dtype=frozen_dtype),
                              "cuda")
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=init_lora_weights))


def full_blocks(count: int, seed: int) -> list:
    """`count` packed blocks of 2,048 random tokens from the first 2,000 ids (two samples each): a distribution
    two optimizer steps can start to learn."""
    from codelupe_trainer.data.packing import Block, TokenizedSample

    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for index in range(count):
        block = Block()
        for part, length in enumerate((1200, 848)):
            tokens = torch.randint(10, 2000, (length,), generator=generator).tolist()
            block.add(TokenizedSample.of(2 * index + part, tokens))
        blocks.append(block.seal())
    return blocks


class Recorder:
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log(self, step: int, metrics: dict) -> None:
        self.logged.append((step, dict(metrics)))


def train(model, training, tmp_path, holdout=None):
    from types import SimpleNamespace

    from codelupe_trainer.training.loop import train_adapter
    from codelupe_trainer.training.telemetry import ReportingOptions

    recorder = Recorder()
    result = train_adapter(model, SimpleNamespace(pad_token_id=0), full_blocks(32, 1), full_blocks(8, 2), training,
                           tmp_path, recorder, ReportingOptions(system_every_steps=1, gradient_metrics_every_steps=1),
                           lambda: False, lambda: {}, seed=0, device="cuda", quantized=True, holdout=holdout)
    return result, recorder


def test_a_real_cuda_out_of_memory_halves_the_micro_batch_and_the_run_completes(tmp_path):
    """A memory cap 6 GB above the loaded model: the model's own loss at micro-batch 4 (fp32 logits of
    4 x 2,048 x 152,064, ~5 GB, and their log-softmax) cannot fit and raises CUDA's real OutOfMemoryError; the
    back-off undoes the attempt, halves the micro-batch and doubles accumulation until the run fits."""
    from codelupe_trainer.config import TrainingSettings
    from codelupe_trainer.training.backoff import train_with_oom_backoff

    model = fresh_four_bit_lora(tmp_path / "model")
    training = TrainingSettings(batch_size=4, gradient_accumulation_steps=4, loss="standard", logging_steps=1)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + 6e9) / total))
    try:
        result, outcome = train_with_oom_backoff(model, training, None,
                                                 lambda sized: train(model, sized, tmp_path / "scratch")[0])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert outcome.backoffs >= 1
    assert outcome.micro_batch < 4 and outcome.micro_batch * outcome.accumulation == 16  # same effective batch
    assert result.global_step == 2  # 32 blocks at an effective batch of 16
    assert all(math.isfinite(value) for value in (result.train_loss, result.eval_loss, result.initial_eval_loss))


def test_the_daemons_training_loop_trains_in_4bit_with_the_configured_loss_at_the_shipped_batch(tmp_path):
    """The Trainer with `training.loss = "auto"` (Liger's fused loss where installed, else chunked): two optimizer
    steps at 4 x 4; its losses are the model's own (the evaluation's before training is the holdout's, measured
    the gate's way), the logged training loss is per token, not scaled by the accumulation, and it trains.
    No phase builds a batch's full logits (4 x 2,048 x 152,064 in bf16 alone is 2.5 GB, and the model's own
    loss adds two fp32 copies: ~12 GB in all; Liger's forward builds them whenever the model is evaluating);
    a 2,048-token chunk of the chunked loss is ~2.5 GB in fp32."""
    from codelupe_trainer.config import TrainingSettings

    model = fresh_four_bit_lora(tmp_path / "model")
    training = TrainingSettings(batch_size=4, gradient_accumulation_steps=4, logging_steps=1, learning_rate=1e-2,
                                warmup_ratio=0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loaded = torch.cuda.memory_allocated()
    result, recorder = train(model, training, tmp_path / "scratch", holdout={"python": full_blocks(8, 2)})
    peak_above_model = (torch.cuda.max_memory_allocated() - loaded) / 1e9
    assert peak_above_model < 5, f"{peak_above_model:.1f} GB above the loaded model"
    assert result.global_step == 2
    before, after = result.holdout_before["python"][0], result.holdout_after["python"][0]
    assert result.initial_eval_loss == pytest.approx(before, rel=1e-2)  # the Trainer's eval = the gate's
    assert result.eval_loss == pytest.approx(after, rel=1e-2)
    assert math.log(152064) - 1 < before < math.log(152064) + 1  # a random model: about ln(vocabulary)
    first = [metrics["train/loss"] for _, metrics in recorder.logged if "train/loss" in metrics][0]
    assert first == pytest.approx(before, rel=0.05)  # not 4x (the accumulation factor) and not 1/4x
    assert after < before  # two steps at 1e-2 on the eval's own distribution of random tokens lower it a little


def test_frozen_weights_kept_in_bf16_train_to_the_same_losses_in_less_memory(tmp_path):
    """`model.frozen_dtype = "bfloat16"`: the embeddings, LM head and norms stay bf16 after the k-bit preparation,
    the daemon's loop trains with them, and the losses are the fp32 run's within bf16's precision."""
    from codelupe_trainer.config import TrainingSettings

    training = TrainingSettings(batch_size=4, gradient_accumulation_steps=4, logging_steps=1, learning_rate=1e-2,
                                warmup_ratio=0)
    loaded, losses = {}, {}
    for dtype in ("float32", "bfloat16"):
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model = fresh_four_bit_lora(tmp_path / "model", frozen_dtype=dtype)
        loaded[dtype] = torch.cuda.memory_allocated() - before
        head = model.get_base_model().lm_head.weight
        assert head.dtype == getattr(torch, dtype) and not head.requires_grad
        result, _ = train(model, training, tmp_path / dtype, holdout={"python": full_blocks(8, 2)})
        losses[dtype] = (result.holdout_before["python"][0], result.holdout_after["python"][0])
        del model
    # The embeddings and the head (2 x 152,064 x 256) take 2 bytes a weight instead of 4.
    assert loaded["float32"] - loaded["bfloat16"] > 0.9 * 2 * 152064 * 256 * 2
    for fp32, bf16 in zip(losses["float32"], losses["bfloat16"]):
        assert bf16 == pytest.approx(fp32, rel=1e-2)
    assert losses["bfloat16"][1] < losses["bfloat16"][0]


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")
def test_the_fused_loss_is_chosen_only_for_a_model_liger_has_kernels_for():
    """The Trainer leaves a model Liger does not know unpatched (a warning) and it trains on its own loss, with
    the full fp32 logits: `auto` takes the chunked loss for it, and an explicit `fused` is one clear error."""
    from codelupe_trainer.errors import TrainingError
    from codelupe_trainer.training.loss import resolve_loss

    assert resolve_loss("auto", "cuda", "qwen2") == "fused"
    assert resolve_loss("auto", "cuda", "no-such-architecture") == "chunked"
    assert resolve_loss("fused", "cuda", "qwen2") == "fused"
    with pytest.raises(TrainingError, match="no kernels for model type 'no-such-architecture'"):
        resolve_loss("fused", "cuda", "no-such-architecture")
