"""Training throughput and peak memory: our pipeline against the seed's way, side by side in one process.

    python benchmarks/train_throughput.py                      # CPU: a tiny Qwen2, and a tiny one with a 152k vocabulary
    python benchmarks/train_throughput.py --model qwen2.5-7b   # CUDA: the Qwen2.5-Coder-7B architecture, 4-bit

Variants (same model, same samples, same LoRA, same optimizer; gradient checkpointing as configured):
- ours:            packed blocks with restarting position ids, SDPA, the chunked (or fused) loss
- ours-std-loss:   the same with the model's own loss (vocabulary-sized fp32 logits)
- seed:            one sample per row padded to max_length, eager attention, the model's own loss
- ours-bf16-rest:  (CUDA, 4-bit) ours with the frozen weights that stay unquantized (embeddings, LM head, norms)
                   kept in bf16 instead of the fp32 that peft's k-bit preparation casts them to: ~2.2 GB less on
                   the 7B and a bf16 residual stream; measured before the daemon offers it as a setting
- ours-no-dropout: ours with the LoRA dropout at 0 for its steps (every variant else takes --lora-dropout, by
                   default the shipped 0.05: a dropout mask on each adapted projection's input)
- ours-fused:      (CUDA, with liger-kernel installed) ours with Liger-Kernel's fused linear cross-entropy and
                   kernels; it patches the model for good, so it and the next run last
- ours-fused-bf16-rest: (CUDA, 4-bit, liger-kernel) both: the fastest the daemon trains a 4-bit base, with
                   `.[gpu]` and model.frozen_dtype = "bfloat16"

Printed per variant: real (non-padding) tokens per second, peak memory (CUDA: max allocated, weights included;
CPU: the variant's own process's peak RSS) and, on CUDA, model FLOPs utilisation: 4 x N matmul parameters x
real tokens per second / the card's dense bf16 peak (codelupe_trainer/training/flops.py, the same figure the
daemon logs as performance/mfu_percent: a frozen base needs no weight gradients, so forward 2N + input
gradients 2N per token; the recomputation of checkpointed layers is not counted). Before 2026-11-28 this
script counted each 4-bit projection twice (peft's wrapper and bitsandbytes' layer), so MFU figures it
printed earlier are twice the real ones.
With --profile, one more optimizer step of each variant runs under torch.profiler after the timed ones, and
the device's time is split by kind of work (4-bit dequantization, matmuls, attention, loss, optimizer, casts
and copies, other elementwise) with the share the device sat idle: where the time between the MFU printed and
the card's peak goes. It is a separate step, so the timed figures carry no profiler overhead.
Every variant runs under the bf16 autocast the daemon's Trainer uses on CUDA (figures measured before
2026-11-28 ran without it, in the fp32 that peft's k-bit preparation leaves the unquantized weights in).
The 7B is built from its config with random weights (no hub is reachable); speed and memory do not depend on
the values. Sample lengths are drawn from a log-normal fitted to code files (median ~450 tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codelupe_trainer.data.collate import PackedCollator  # noqa: E402
from codelupe_trainer.data.packing import Block, TokenizedSample, pack_best_fit  # noqa: E402
from codelupe_trainer.training.flops import peak_flops, training_flops_per_token, utilisation  # noqa: E402
from codelupe_trainer.training.loss import chunked_model_loss  # noqa: E402
from codelupe_trainer.training.model import cast_frozen_unquantized  # noqa: E402

QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1_000_000.0,
               rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=8192, max_position_embeddings=4096, tie_word_embeddings=False)
TINY_BIG_VOCAB = dict(TINY, vocab_size=152064)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sample_lengths(count: int, max_length: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(450), 0.9, count), 16, 2400).astype(int)
    pieces = []
    for length in lengths.tolist():  # split like data/dataset.tokenize_samples: pieces of at most max_length
        pieces += [min(max_length, length - start) for start in range(0, length, max_length) if length - start > 1]
    return pieces


def make_blocks(lengths: list[int], vocab: int, max_length: int, packed: bool) -> list[Block]:
    rng = np.random.default_rng(1)
    sequences = [TokenizedSample(index, rng.integers(10, vocab - 10, length).astype(np.int32))
                 for index, length in enumerate(lengths)]
    if packed:
        return pack_best_fit(sequences, max_length)
    blocks = []
    for sequence in sequences:
        block = Block()
        block.add(sequence)
        blocks.append(block.seal())
    return blocks


def pad_to(batch: dict, length: int, pad_id: int) -> dict:
    """The seed's way: every row padded to max_length, with an attention mask (no packing)."""
    rows, current = batch["input_ids"].shape
    extra = length - current
    input_ids = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_id)
    labels = torch.nn.functional.pad(batch["labels"], (0, extra), value=-100)
    real = torch.tensor([int(row.ne(pad_id).sum()) for row in batch["input_ids"]])
    mask = torch.arange(length)[None, :] < real[:, None]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask.long()}


def build_model(spec: dict, device: str, quantize: bool, directory: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**spec)
    if not (directory / "config.json").exists():
        torch.manual_seed(0)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        torch.set_default_dtype(dtype)  # built in its final dtype: no fp32 copy of 7B weights on the way
        try:
            with torch.device(device):
                model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(torch.float32)
        model.save_pretrained(directory)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    kwargs = {"dtype": torch.bfloat16 if device == "cuda" else torch.float32, "attn_implementation": "sdpa",
              "device_map": {"": 0} if device == "cuda" else "cpu"}
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    model.config.use_cache = False
    if quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def attach_lora(model, rank: int, dropout: float):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))


def set_lora_dropout(model, probability: float) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = probability


# Kernel (CUDA) or operator (CPU) names -> the kind of work, first match wins. The names are those of
# bitsandbytes 0.50, cuBLAS/CUTLASS, PyTorch's SDPA back-ends and Liger-Kernel; what matches nothing is counted
# as "other elementwise" (activations, norms, adds, dropout), the memory-bound remainder.
KINDS = [
    ("4-bit dequantization", ("dequant", "kquantize", "quantize_4bit")),
    ("loss", ("cross_entropy", "crossentropy", "log_softmax", "logsoftmax", "nll_loss", "liger")),
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa", "softmax")),
    ("optimizer", ("optimizer", "adam", "kpreconditionoptimizer", "koptimizer")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::matmul", "aten::linear", "mkldnn", "onednn")),
    ("casts and copies", ("copy", "memcpy", "memset", "convert", "aten::to", "_to_copy", "contiguous", "aten::cat", "fill")),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other elementwise"


def device_time_split(profiler, device: str, wall_seconds: float) -> dict:
    """Milliseconds of device work by kind, and the idle share of the profiled wall time.

    On CUDA every kernel is one event on the device: their durations add up without double counting (one
    stream). On the CPU operators nest, so each operator's self time is what it alone spent."""
    split: dict[str, float] = {}
    if device == "cuda":
        kernels = [event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA]
        for event in kernels:
            kind = kind_of(event.name)
            split[kind] = split.get(kind, 0.0) + event.time_range.elapsed_us() / 1000
        if not kernels:  # a profiler build that reports kernels only under their launching operators
            for event in profiler.key_averages():
                if getattr(event, "self_device_time_total", 0) > 0:
                    kind = kind_of(event.key)
                    split[kind] = split.get(kind, 0.0) + event.self_device_time_total / 1000
    else:
        for event in profiler.key_averages():
            if event.self_cpu_time_total > 0:
                kind = kind_of(event.key)
                split[kind] = split.get(kind, 0.0) + event.self_cpu_time_total / 1000
    busy = sum(split.values())
    wall = wall_seconds * 1000
    # On the CPU several threads work at once, so self times can add up past the wall time: no idle share.
    return {"wall_ms": round(wall, 1), "busy_ms": round(busy, 1),
            "idle_percent": round(max(0.0, 100 * (1 - busy / wall)), 1) if device == "cuda" else None,
            "ms_by_kind": {kind: round(ms, 1) for kind, ms in sorted(split.items(), key=lambda item: -item[1])}}


def train_micro_batch(model, name: str, group: list[Block], collate, max_length: int, device: str,
                      accumulation: int) -> torch.Tensor:
    batch = collate(group)
    if name == "seed":
        batch = pad_to(batch, max_length, 0)
    batch = {key: value.to(device) for key, value in batch.items()}
    # The Trainer's bf16 on CUDA: an autocast around the forward, whatever the loss (training/loop.py).
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        if name in ("ours", "ours-bf16-rest", "ours-no-dropout"):
            loss = chunked_model_loss(model, batch)
        else:
            loss = model(**batch).loss
    (loss / accumulation).backward()
    return loss


def profile_step(model, name: str, micro_batches: list[list[Block]], collate, max_length: int, device: str,
                 optimizer, accumulation: int) -> dict:
    """One more optimizer step, under the profiler: where the device's time goes (see KINDS)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as profiler:
        started = time.perf_counter()
        for group in micro_batches[:accumulation]:
            train_micro_batch(model, name, group, collate, max_length, device, accumulation)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    return device_time_split(profiler, device, wall)


def run_variant(model, name: str, blocks: list[Block], batch_size: int, accumulation: int, steps: int, warmup: int,
                max_length: int, device: str, optimizer, profile: bool = False, lora_dropout: float = 0.0) -> dict:
    model.base_model.model.config._attn_implementation = "eager" if name == "seed" else "sdpa"
    collate = PackedCollator(pad_token_id=0)
    micro_batches = [blocks[index : index + batch_size] for index in range(0, len(blocks), batch_size)]
    needed = (warmup + steps) * accumulation
    if len(micro_batches) < needed:
        raise SystemExit(f"{name}: {len(micro_batches)} micro-batches, need {needed}: raise --samples")
    if name.endswith("bf16-rest"):
        cast_frozen_unquantized(model, torch.bfloat16)  # back to fp32 below: the variants after it are unchanged
    if name == "ours-no-dropout":
        set_lora_dropout(model, 0.0)  # back below
    if device == "cuda":
        torch.cuda.empty_cache()  # the fp32 copies the cast freed do not count in this variant's peak
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    real_tokens, started = 0, None
    for index in range(needed):
        if index == warmup * accumulation:
            if device == "cuda":
                torch.cuda.synchronize()
            started, real_tokens = time.perf_counter(), 0
        group = micro_batches[index]
        real_tokens += sum(len(block) for block in group)
        if name.startswith("ours-fused") and index == 0 and not getattr(model, "liger_applied", False):
            from liger_kernel.transformers import _apply_liger_kernel_to_instance

            _apply_liger_kernel_to_instance(model=model.get_base_model())  # patches the model for good: run last
            model.liger_applied = True
        loss = train_micro_batch(model, name, group, collate, max_length, device, accumulation)
        if (index + 1) % accumulation == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {"variant": name, "real_tokens_per_second": real_tokens / seconds, "seconds": seconds,
              "optimizer_steps": steps, "loss": float(loss)}
    if device == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if profile:
        result["profile"] = profile_step(model, name, micro_batches[warmup * accumulation:], collate, max_length,
                                         device, optimizer, accumulation)
    if name.endswith("bf16-rest"):
        cast_frozen_unquantized(model, torch.float32)
    if name == "ours-no-dropout":
        set_lora_dropout(model, lora_dropout)
    return result


def measure(args, variants: list[str]) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    spec = {"qwen2.5-7b": QWEN_7B, "tiny": TINY, "tiny-152k-vocab": TINY_BIG_VOCAB}[args.model]
    flops_per_token = training_flops_per_token(spec)
    quantize = device == "cuda" and not args.no_4bit
    directory = Path(args.model_dir or tempfile.mkdtemp(prefix="bench-model-")) / args.model
    directory.mkdir(parents=True, exist_ok=True)
    load_started = time.perf_counter()
    model = attach_lora(build_model(spec, device, quantize, directory), args.lora_r, args.lora_dropout)
    load_seconds = time.perf_counter() - load_started
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if device == "cuda":
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(parameters, lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    lengths = sample_lengths(args.samples, args.max_length)
    if device == "cuda":
        # Two untimed steps before any variant: on the H200 (2026-11-30) the variant that ran first measured 1.63 s
        # a step against 1.27 s in its profiled step just after, while the others' timed and profiled steps agreed
        # within 10 %: the allocator's growth and the paged optimizer's first pages fell on whichever ran first.
        run_variant(model, "ours", make_blocks(lengths, spec["vocab_size"], args.max_length, packed=True),
                    args.batch_size, args.accumulation, 2, 0, args.max_length, device, optimizer)
    results = []
    for name in variants:
        if name.startswith("ours-fused") and device != "cuda" or name.endswith("bf16-rest") and not quantize:
            continue
        blocks = make_blocks(lengths, spec["vocab_size"], args.max_length, packed=name != "seed")
        result = run_variant(model, name, blocks, args.batch_size, args.accumulation, args.steps, args.warmup,
                             args.max_length, device, optimizer, args.profile, args.lora_dropout)
        result.update(model=args.model, device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                      load_seconds=round(load_seconds, 1), batch_size=args.batch_size, max_length=args.max_length,
                      gradient_checkpointing=args.gradient_checkpointing, quantization="4bit" if quantize else "none")
        if device == "cuda":
            card = peak_flops(result["device"])
            if card:
                result["mfu_percent"] = 100 * utilisation(result["real_tokens_per_second"], flops_per_token, card)
        else:
            result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        results.append(result)
        print(json.dumps(result), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def table(results: list[dict]) -> str:
    lines = ["| model | variant | real tokens/s | vs seed | peak memory GB | MFU % |", "| --- | --- | --- | --- | --- | --- |"]
    seeds = {result["model"]: result["real_tokens_per_second"] for result in results if result["variant"] == "seed"}
    for result in results:
        memory = result.get("peak_memory_gb", result.get("peak_rss_gb", float("nan")))
        seed = seeds.get(result["model"])  # none when the seed's way was not among the variants run
        ratio = f"{result['real_tokens_per_second'] / seed:.2f}x" if seed else "-"
        mfu = f"{result['mfu_percent']:.1f}" if "mfu_percent" in result else "-"
        lines.append(f"| {result['model']} | {result['variant']} | {result['real_tokens_per_second']:,.0f} | "
                     f"{ratio} | {memory:.2f} | {mfu} |")
    return "\n".join(lines)


def profile_table(results: list[dict]) -> str:
    """Each variant's profiled step: the share of the device's busy time by kind of work, and its idle share."""
    kinds = [kind for kind, _ in KINDS] + ["other elementwise"]
    lines = ["| model | variant | step ms | idle % | " + " | ".join(f"{kind} %" for kind in kinds) + " |",
             "| --- " * (4 + len(kinds)) + "|"]
    for result in results:
        if "profile" not in result:
            continue
        profile = result["profile"]
        busy = profile["busy_ms"] or 1.0
        shares = [f"{100 * profile['ms_by_kind'].get(kind, 0.0) / busy:.1f}" for kind in kinds]
        idle = "-" if profile["idle_percent"] is None else f"{profile['idle_percent']:.1f}"
        lines.append(f"| {result['model']} | {result['variant']} | {profile['wall_ms']:,.0f} | {idle} | "
                     + " | ".join(shares) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "tiny-152k-vocab", "qwen2.5-7b"], default=None)
    parser.add_argument("--variants", default="ours,ours-std-loss,seed")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="the shipped model.lora_dropout")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--no-4bit", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="one more step per variant under torch.profiler: the device's time by kind of work")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--separate-processes", action=argparse.BooleanOptionalAction, default=None,
                        help="each variant in its own process, so each has its own peak RSS (default on CPU)")
    args = parser.parse_args()
    on_cuda = torch.cuda.is_available() and not args.cpu
    models = [args.model] if args.model else (["qwen2.5-7b"] if on_cuda else ["tiny", "tiny-152k-vocab"])
    variants = args.variants.split(",")
    separate = args.separate_processes if args.separate_processes is not None else not on_cuda
    results = []
    for model in models:
        defaults = {"samples": 600 if model == "qwen2.5-7b" else 300, "steps": 6 if model == "qwen2.5-7b" else 4}
        if not on_cuda:
            defaults["steps"], args.max_length = 3, min(args.max_length, 1024)
        args.model = model
        args.samples = args.samples or defaults["samples"]
        args.steps = args.steps or defaults["steps"]
        if separate:
            for variant in variants:
                command = [sys.executable, __file__, "--model", model, "--variants", variant, "--samples", str(args.samples),
                           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                           "--accumulation", str(args.accumulation), "--max-length", str(args.max_length),
                           "--lora-r", str(args.lora_r), "--lora-dropout", str(args.lora_dropout),
                           "--no-separate-processes"]
                command += ["--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]
                command += ["--cpu"] if args.cpu else []
                command += ["--profile"] if args.profile else []
                output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                results += [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        else:
            results += measure(args, variants)
        args.samples = args.steps = None
    print()
    print(table(results))
    if any("profile" in result for result in results):
        print()
        print(profile_table(results))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
