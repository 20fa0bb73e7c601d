#!/usr/bin/env bash
# Triton kernels on a CUDA machine: every Triton kernel against its float64 reference at moderate shapes
# (pytest -m gpu: fp32, fp16, bf16, forward and gradients), the other kernel tests on the real GPU (no
# interpreter), then Triton vs dense SDPA (flash) vs compiled FlexAttention in bf16 up to S=128k, with
# TFLOP/s and speed-ups.
# Runs unchanged from the repo root: bash benchmarks/gpu_kernels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
pip install -q -e ".[test]"
pytest -q -m gpu tests/kernels -x
pytest -q -m "not gpu" tests/kernels -x
python benchmarks/kernels.py --device cuda --dtype bfloat16 --heads 16 --head-dim 128 \
    --seq-lens 4096 16384 65536 131072 --blocks 8 32 --repeats 10 --out bench-results/gpu
