#!/usr/bin/env bash
# The device check, one script: what the GPU box has, then the throughput benchmark on the 7B architecture.
# Run on a CUDA machine from the repository root; wheels for what the machine lacks may sit in .gpu-wheels/.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if ls .gpu-wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index .gpu-wheels/*.whl 2>&1 | tail -2
fi
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "import liger_kernel, triton; print('liger-kernel ok, triton', triton.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 benchmarks/train_throughput.py --model qwen2.5-7b --model-dir /tmp/bench-models \
    --variants "${VARIANTS:-ours,ours-std-loss,seed,ours-fused}" 2>&1 | grep -v Warning | tee "$OUT/throughput.txt"
