"""The FLOPs a training token costs and the MFU they give: the figure behind performance/mfu_percent and the
benchmark's MFU column (training/flops.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from codelupe_trainer.config import ModelSettings
from codelupe_trainer.training.flops import matmul_parameters, peak_flops, training_flops_per_token, utilisation
from codelupe_trainer.training.model import attach_adapter, load_base_model
from codelupe_trainer.training.telemetry import model_flops_per_token

# A Qwen2 with grouped-query attention (2 key/value heads for 4 query heads) and an untied head, like the 7B.
SMALL = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=1000, max_position_embeddings=512, tie_word_embeddings=False)


def linear_weights(model: torch.nn.Module) -> int:
    return sum(module.weight.numel() for module in model.modules() if type(module) is torch.nn.Linear)


def test_the_count_is_every_projection_and_the_head_of_a_real_model_once():
    model = Qwen2ForCausalLM(Qwen2Config(**SMALL))
    assert matmul_parameters(model.config.to_dict()) == linear_weights(model)
    # The embedding is a lookup: not counted, though it is as large as the head.
    assert linear_weights(model) + model.model.embed_tokens.weight.numel() == sum(
        parameter.numel() for parameter in model.parameters() if parameter.dim() == 2)


def test_the_7b_costs_4_x_7_07_billion_flops_a_token():
    qwen_7b = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064)
    # Per layer: q and o 3584 x 3584, k and v 3584 x 512 (4 heads of 128), three MLP matrices 3584 x 18944.
    per_layer = 2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944
    assert matmul_parameters(qwen_7b) == 28 * per_layer + 152064 * 3584 == 7_070_285_824
    assert training_flops_per_token(qwen_7b) == 4 * 7_070_285_824


def test_a_4bit_model_with_lora_costs_what_its_base_costs(tiny_model):
    """The wrapped, quantized model holds each projection twice in its module tree (peft's Linear4bit around
    bitsandbytes' Linear4bit): a count by module type reported twice the real MFU before."""
    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    settings = ModelSettings(base_model=str(tiny_model), quantization="4bit", lora_r=4, lora_alpha=8)
    quantized, quantization = load_base_model(settings, "cpu")
    assert quantization == "4bit"
    wrapped = attach_adapter(quantized, settings, None)
    assert model_flops_per_token(wrapped) == 4 * linear_weights(plain)


@pytest.mark.parametrize(("name", "expected"), [
    ("NVIDIA GeForce RTX 5090", 209.5e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("NVIDIA H200", 989e12),
    ("Some Future Card", None),
])
def test_a_card_is_known_by_its_name(name, expected):
    assert peak_flops(name) == expected


def test_mfu_is_the_model_flops_rate_over_the_peak():
    # 3,700 real tokens/s of the 7B on an RTX 5090 is the 50 %.
    assert utilisation(3_700, 4 * 7_070_285_824, 209.5e12) == pytest.approx(0.4995, abs=1e-4)


def load_benchmark():
    """benchmarks/ is not a package: load the throughput script as a module to test its profile split."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_profile_split_names_the_kernels_where_an_mfu_hunt_looks():
    """Kernel names as the CUDA profiler reports them (bitsandbytes 0.50, cuBLAS, PyTorch's SDPA, Liger): each
    lands in its kind, and a broadcasting add or an activation is not mistaken for a copy or a matmul."""
    kind_of = load_benchmark().kind_of
    named = {
        "void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*, __nv_bfloat16*, int, int)":
            "4-bit dequantization",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel":
            "matmul",
        "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN": "matmul",
        "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)": "attention",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<...>>": "attention",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at::native::"
        "(anonymous namespace)::LogSoftMaxForwardEpilogue>(float*, float const*, int)": "loss",
        "liger_cross_entropy_kernel": "loss",
        "void kOptimizerStatic8bit2StateBlockwise<__nv_bfloat16, 2, 256, 1>(...)": "optimizer",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
        "::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}, ...>": "casts and copies",
        "Memcpy DtoD (Device -> Device)": "casts and copies",
        "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::"
        "BinaryFunctor<float, float, float, at::native::binary_internal::MulFunctor<float>>>(...)": "other elementwise",
        "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel(...)>(...)": "other elementwise",
    }
    assert {name: kind_of(name) for name in named} == named


def test_the_profile_split_sorts_a_real_cpu_profile_into_its_kinds():
    benchmark = load_benchmark()
    layer = torch.nn.Linear(256, 256)
    inputs = torch.randn(64, 256)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(5):
            layer(inputs).softmax(-1).sum().backward()
    split = benchmark.device_time_split(profiler, "cpu", wall_seconds=1.0)
    kinds = split["ms_by_kind"]
    assert kinds.get("matmul", 0) > 0 and kinds.get("attention", 0) > 0  # the linear layer; softmax counts as attention
    assert set(kinds) <= {kind for kind, _ in benchmark.KINDS} | {"other elementwise"}
    assert split["idle_percent"] is None  # threads overlap on a CPU: no idle share is claimed
    table = benchmark.profile_table([{"model": "tiny", "variant": "ours", "profile": split}])
    assert "| tiny | ours |" in table and "matmul %" in table


def test_the_throughput_table_compares_with_the_seeds_way_only_where_it_ran():
    """A run of some variants only (the bf16-base run of benchmarks/gpu_check.sh has no seed) printed `nanx`."""
    benchmark = load_benchmark()
    ours = {"model": "qwen2.5-7b", "variant": "ours", "real_tokens_per_second": 7668.0, "peak_memory_gb": 21.25}
    alone = benchmark.table([ours])
    assert "| 7,668 | - | 21.25 |" in alone and "nan" not in alone
    seed = dict(ours, variant="seed", real_tokens_per_second=1917.0)
    assert "| 7,668 | 4.00x |" in benchmark.table([ours, seed])
