"""On a CUDA machine: the self-check passes, and the chunked and fused losses agree with the model's own loss
through the real 4-bit path (bitsandbytes NF4, peft LoRA, bf16). Skipped without CUDA.

Self-contained (no conftest fixtures) so it also runs with `pytest --noconftest` on a GPU box that lacks the
database client libraries.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def four_bit_lora(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from codelupe_trainer.config import ModelSettings
    from codelupe_trainer.training.model import load_base_model

    directory = tmp_path_factory.mktemp("qwen2-152k")
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=152064, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    base, quantization = load_base_model(ModelSettings(base_model=str(directory), quantization="4bit"), "cuda")
    assert quantization == "4bit"
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    return model.train()


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
