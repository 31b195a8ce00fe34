#!/usr/bin/env bash
# The GPU run, on a fresh GPU machine (written for one H200): install the project beside the
# machine's CUDA build of torch, then train MNIST with gpus_per_worker: 1, bf16 and NCCL, embed 4M
# images on the GPU, and print samples/s per GPU, MFU and embed rows/s against the GPU's measured
# bf16 matmul limit (python -m benchmarks.gpu). Under 8 minutes on an H200.
#
#   benchmarks/gpu.sh                 # PYTHON=python3.11 by default (the project's Python)
#   MNIST_DIR=/data/mnist benchmarks/gpu.sh
#   WHEELS=/path/to/wheels benchmarks/gpu.sh   # a machine without a package index: pip --no-index
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv-gpu}
start=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# --system-site-packages: a machine image's CUDA torch is used as it is; else pip's default torch
# wheel for Linux x86-64 is the CUDA build.
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
if [ -n "${WHEELS:-}" ]; then
  "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" -e .
else
  "$VENV/bin/python" -m pip install -q -e .
fi
"$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, torch.version.cuda)"

# the Ray job logs nothing it need not; the figures are printed and saved under benchmarks/results
timeout 420 "$VENV/bin/python" -m benchmarks.gpu "$@"
echo "gpu.sh: $(( $(date +%s) - start )) s"
