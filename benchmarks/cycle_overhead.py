"""Per-cycle overhead on a GPU: what a cycle pays before and around training the 7B in 4-bit.

    python benchmarks/cycle_overhead.py --model-dir /tmp/bench-models/qwen2.5-7b     # CUDA only

Each cycle is a fresh child process that loads and quantizes the base model again. Measured here, each in a
fresh process as the daemon's child is: (1) loading the bf16 checkpoint and quantizing it to NF4 (what a cycle
does today), (2) loading a pre-quantized 4-bit copy of the same model (the candidate fix: one saved once,
reused while model.base_model is unchanged), (3) attaching a LoRA, (4) evaluating a 256-sample holdout once
(the promotion gate evaluates it twice per cycle). The Qwen2.5-Coder-7B architecture with random weights
(no hub is reachable from the benchmark machines); the page cache is warm, as on a box that trains every
few minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1_000_000.0,
               rms_norm_eps=1e-6, tie_word_embeddings=False)


def build_checkpoint(directory: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (directory / "config.json").exists():
        return
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(Qwen2Config(**QWEN_7B))
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()


def child(kind: str, directory: Path, quantized_dir: Path) -> dict:
    from codelupe_trainer.config import ModelSettings
    from codelupe_trainer.training.model import attach_adapter, load_base_model

    result: dict = {"kind": kind}
    torch.cuda.synchronize()
    started = time.perf_counter()
    if kind == "load-and-quantize":
        model, _ = load_base_model(ModelSettings(base_model=str(directory), quantization="4bit"), "cuda")
    else:
        model, _ = load_base_model(ModelSettings(base_model=str(quantized_dir), quantization="4bit"), "cuda")
    torch.cuda.synchronize()
    result["load_seconds"] = time.perf_counter() - started
    if kind == "load-and-quantize" and not (quantized_dir / "config.json").exists():
        saved = time.perf_counter()
        model.save_pretrained(quantized_dir)
        result["save_quantized_seconds"] = time.perf_counter() - saved
        result["quantized_gb"] = sum(path.stat().st_size for path in quantized_dir.iterdir()) / 1e9
    started = time.perf_counter()
    model = attach_adapter(model, ModelSettings(base_model=str(directory)), None)
    result["attach_seconds"] = time.perf_counter() - started
    if kind == "load-and-quantize":
        from codelupe_trainer.data.packing import Packer, TokenizedSample
        from codelupe_trainer.training.loop import evaluate_holdout

        generator = torch.Generator().manual_seed(1)
        packer = Packer(2048)
        for index in range(256):  # ~450 tokens a sample, as the benchmark's code-like lengths
            length = int(torch.randint(150, 750, (1,), generator=generator))
            packer.add(TokenizedSample.of(index, torch.randint(10, 150000, (length,), generator=generator).tolist()))
        blocks = packer.finish()
        torch.cuda.synchronize()
        started = time.perf_counter()
        evaluate_holdout(model, {"python": blocks}, 0, 4, "cuda")
        torch.cuda.synchronize()
        result["holdout_eval_seconds"] = time.perf_counter() - started
        result["holdout_blocks"] = len(blocks)
    result["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/bench-models/qwen2.5-7b"))
    parser.add_argument("--child")
    arguments = parser.parse_args()
    quantized_dir = arguments.model_dir.with_name(arguments.model_dir.name + "-nf4")
    if arguments.child:
        print(json.dumps(child(arguments.child, arguments.model_dir, quantized_dir)))
        return
    build_checkpoint(arguments.model_dir)
    rows = []
    for kind in ("load-and-quantize", "load-and-quantize", "pre-quantized", "pre-quantized"):
        output = subprocess.run([sys.executable, __file__, "--child", kind, "--model-dir", str(arguments.model_dir)],
                                capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    quantize = min(row["load_seconds"] for row in rows if row["kind"] == "load-and-quantize")
    prequantized = min(row["load_seconds"] for row in rows if row["kind"] == "pre-quantized")
    print(f"{torch.cuda.get_device_name(0)}: load + quantize {quantize:.1f} s, pre-quantized load {prequantized:.1f} s "
          f"({quantize / prequantized:.1f}x); LoRA attach {rows[0]['attach_seconds']:.1f} s; one 256-sample holdout "
          f"evaluation {rows[0]['holdout_eval_seconds']:.1f} s ({rows[0]['holdout_blocks']} blocks of 2,048)")


if __name__ == "__main__":
    main()
