#!/usr/bin/env bash
# GPU speed check at the openvla-7b size (random weights, built directly on the GPU in bf16, LoRA r=16):
# bf16 Stage-2 training step time, peak memory and model FLOPs utilization; pipeline / predict_action latency;
# transformers' PI0 at a matching parameter count for comparison. Under 8 minutes on one H100/H200-class GPU.
#
#     bash benchmarks/gpu_check.sh [extra speed.py --gpu-7b options, e.g. --vlm-family llava --gpu-batch 16]
#
# Fails fast (exit 3, within a few seconds) when there is no NVIDIA GPU. Writes benchmarks/results/speed_gpu.json
# (and a copy into $OUT when that is set).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check.sh: no NVIDIA GPU here (nvidia-smi not found); this check needs one. Nothing was run." >&2
    exit 3
fi
if ! timeout 10 nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check.sh: nvidia-smi found but it lists no usable GPU (driver not loaded?). Nothing was run." >&2
    exit 3
fi

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" >/dev/null 2>&1; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! timeout 60 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: $PY's torch sees no CUDA device (torch.cuda.is_available() is False; CPU-only torch?)." >&2
    exit 3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# transformers / modeling_actprior must be importable: the editable install, or the repository root on the path.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
timeout 470 "$PY" benchmarks/speed.py --gpu-7b "$@"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then cp benchmarks/results/speed_gpu.json "$OUT/" 2>/dev/null || true; fi
