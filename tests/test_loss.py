"""The chunked loss is the model's own loss, with the same LoRA gradients, without the full fp32 logits."""

from __future__ import annotations

import pytest
import torch

from codelupe_trainer.data.collate import PackedCollator
from codelupe_trainer.data.packing import Block, TokenizedSample
from codelupe_trainer.training.loss import chunked_model_loss, resolve_loss


def lora_model(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))  # non-zero B: every LoRA tensor gets a gradient
    return model.train()


def packed_batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    blocks = []
    for lengths in ([120, 60, 40], [200], [90, 90]):
        block = Block()
        for index, length in enumerate(lengths):
            ids = torch.randint(5, 2000, (length,), generator=generator).tolist()
            block.add(TokenizedSample.of(index, ids, prompt_length=10 if index == 1 else 0))
        blocks.append(block.seal())
    return PackedCollator(pad_token_id=0)(blocks)


def lora_gradients(model) -> dict[str, torch.Tensor]:
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.requires_grad}


@pytest.mark.parametrize("num_items", [None, 1234])
def test_chunked_loss_equals_the_model_loss_and_its_gradients(tiny_model, num_items):
    model = lora_model(tiny_model)
    batch = packed_batch()

    standard = model(**batch, num_items_in_batch=num_items).loss
    standard.backward()
    expected = lora_gradients(model)
    model.zero_grad(set_to_none=True)

    # 50-token chunks: several chunks per row and chunks that straddle rows.
    chunked = chunked_model_loss(model, batch, num_items, chunk_tokens=50)
    chunked.backward()
    got = lora_gradients(model)

    assert chunked.item() == pytest.approx(standard.item(), rel=1e-5)
    assert expected.keys() == got.keys() and len(got) > 0
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-7), name
        assert got[name].abs().sum() > 0, name


def test_chunked_loss_without_gradients_matches_too(tiny_model):
    model = lora_model(tiny_model).eval()
    batch = packed_batch()
    with torch.no_grad():
        assert chunked_model_loss(model, batch, chunk_tokens=64).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)


@pytest.mark.parametrize(("setting", "device", "expected"), [
    ("auto", "cpu", "chunked"), ("standard", "cuda", "standard"), ("chunked", "cuda", "chunked"), ("fused", "cuda", "fused"),
])
def test_resolve_loss(setting, device, expected):
    assert resolve_loss(setting, device) == expected


@pytest.mark.parametrize("loss_mode", ["standard", "chunked"])
def test_the_chunked_loss_trains_in_the_trainers_mixed_precision_like_the_models_own(tiny_model, tmp_path, loss_mode):
    """The Trainer's bf16 (on CUDA in production) is an autocast that accelerate wraps around the model's
    forward; the chunked loss calls the decoder directly, and ran the whole model in fp32 without it. bf16
    autocast on the CPU stands in for the GPU's here: the projections must compute in bf16 with either loss."""
    from transformers import TrainingArguments

    from codelupe_trainer.training.loop import StepMeter, TimedTrainer

    model = lora_model(tiny_model)
    arguments = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to="none")
    trainer = TimedTrainer(model=model, args=arguments)
    trainer.meter, trainer.loss_mode = StepMeter("cpu"), loss_mode
    prepared = trainer.accelerator.prepare_model(model)  # what the Trainer's training loop passes to compute_loss
    from torch.utils._python_dispatch import TorchDispatchMode

    vocabulary = model.get_base_model().config.vocab_size

    class HeadMatmuls(TorchDispatchMode):
        """The dtype of every matmul whose output is vocabulary-wide: the LM head's, whichever way it runs."""

        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            output = func(*args, **(kwargs or {}))
            if func.__name__.startswith(("mm", "addmm", "bmm")) and output.shape[-1] == vocabulary:
                self.dtypes.append(output.dtype)
            return output

    dtypes = []
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    handle = layer.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    try:
        with HeadMatmuls() as head:
            loss = trainer.compute_loss(prepared, packed_batch())
    finally:
        handle.remove()
    assert dtypes == [torch.bfloat16]
    assert head.dtypes and set(head.dtypes) == {torch.bfloat16}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def eval_blocks() -> list[Block]:
    generator = torch.Generator().manual_seed(2)
    blocks = []
    for lengths in ([120, 60, 40], [200], [90, 90], [30, 150], [256]):
        block = Block()
        for index, length in enumerate(lengths):
            block.add(TokenizedSample.of(index, torch.randint(5, 2000, (length,), generator=generator).tolist()))
        blocks.append(block.seal())
    return blocks


def test_evaluation_with_the_chunked_loss_gives_the_models_loss_without_its_logits(tiny_model, tmp_path):
    """The stock evaluation step computes the model's own loss over full logits (a peak above training's at a
    152k vocabulary); with the chunked loss the evaluation's loss is the same number, and the LM head never
    produces logits for a whole batch."""
    from transformers import TrainingArguments

    from codelupe_trainer.training.loop import StepMeter, TimedTrainer

    losses, positions = {}, {}
    for loss_mode in ("standard", "chunked"):
        model = lora_model(tiny_model).eval()
        arguments = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=2)
        trainer = TimedTrainer(model=model, args=arguments, eval_dataset=eval_blocks(),
                               data_collator=PackedCollator(pad_token_id=0, with_counts=True))
        trainer.meter, trainer.loss_mode = StepMeter("cpu"), loss_mode
        shapes = []  # positions the LM head produced logits for, per batch
        handle = model.get_base_model().lm_head.register_forward_hook(
            lambda module, inputs, output: shapes.append(output.shape[1]))
        try:
            losses[loss_mode] = trainer.evaluate()["eval_loss"]
        finally:
            handle.remove()
        positions[loss_mode] = shapes
    assert losses["chunked"] == pytest.approx(losses["standard"], rel=1e-5)
    # 5 blocks in batches of 2; the model's own loss takes logits at every position, the chunked one at one.
    assert positions["standard"] == [220, 180, 256]  # the longest block of each batch
    assert positions["chunked"] == [1, 1, 1]
