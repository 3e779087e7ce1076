#!/usr/bin/env bash
# The device check, one script: what the GPU box has, the GPU-marked tests, the self-check, then the throughput
# benchmark on the 7B architecture. Run on a CUDA machine from the repository root; wheels for what the machine
# lacks may sit in .gpu-wheels/ (it has no registry access). Fetch them on a machine that has it, for the GPU
# box's Python (3.12 here), then carry the folder over:
#   for deps in --no-deps ""; do pkgs="bitsandbytes==0.50.2 peft==0.21.2 liger-kernel"; [ -z "$deps" ] && pkgs=pydantic-settings
#     python3 -m pip download -q $deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#       --platform any -d .gpu-wheels $pkgs; done
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if ls .gpu-wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index .gpu-wheels/bitsandbytes-*.whl .gpu-wheels/peft-*.whl \
        .gpu-wheels/liger_kernel-*.whl 2>&1 | tail -2
    python3 -m pip install -q --no-index --find-links .gpu-wheels pydantic-settings pytest 2>&1 | tail -2
fi
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# GPU-marked tests (self-contained: --noconftest, the database client is not needed).
python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests-full.txt" | tail -15 | tee "$OUT/gpu-tests.txt"
# The self-check doctor runs on CUDA, with the estimate for the shipped settings on the 7B architecture.
python3 - <<'PY' 2>&1 | tee "$OUT/self-check.txt"
from codelupe_trainer.config import load_settings
from codelupe_trainer.training.gpu_check import cuda_checks, describe_estimate, estimate_memory_gb
settings = load_settings("config/codelupe.toml")
qwen = {"hidden_size": 3584, "num_hidden_layers": 28, "vocab_size": 152064, "intermediate_size": 18944,
        "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False}
for loss in ("fused", "chunked", "standard"):
    print(loss, describe_estimate(estimate_memory_gb(qwen, settings, True, loss)))
required = estimate_memory_gb(qwen, settings, True, "fused")["total"]
for name, ok, detail in cuda_checks(required):
    print("ok  " if ok else "FAIL", name + ":", detail)
PY
if [ -n "${CYCLE_OVERHEAD:-}" ]; then
    python3 benchmarks/cycle_overhead.py --model-dir /tmp/bench-models/qwen2.5-7b 2>&1 | grep -v Warning | tee "$OUT/cycle-overhead.txt"
fi
# PROFILE=1: one more step per variant under torch.profiler, the GPU's time split by kind of work (where the
# time between the MFU and the card's peak goes: dequantization, matmuls, attention, loss, idle ...).
if [ -z "${SKIP_BENCH:-}" ]; then
    python3 benchmarks/train_throughput.py --model qwen2.5-7b --model-dir /tmp/bench-models \
        --variants "${VARIANTS:-ours,ours-std-loss,seed,ours-bf16-rest,ours-no-dropout,ours-fused,ours-fused-bf16-rest}" ${PROFILE:+--profile} ${BENCH_ARGS:-} 2>&1 \
        | grep -v Warning | tee "$OUT/throughput.txt"
fi
# The same on a bf16 base (model.quantization = "none"): no dequantization, 13 GB more weights; whether it
# fits a 32 GB card at the shipped settings (estimated ~26.8 GB) and how much faster it trains.
if [ -n "${BF16_BASE:-}" ]; then
    python3 benchmarks/train_throughput.py --model qwen2.5-7b --model-dir /tmp/bench-models --no-4bit \
        --variants "${BF16_VARIANTS:-ours,ours-fused}" 2>&1 | grep -v Warning | tee "$OUT/throughput-bf16.txt"
fi
