#!/usr/bin/env bash
# Linear attention on a CUDA machine: the Lightning Triton kernels against their float64 reference
# (pytest -m gpu: fp32, fp16, bf16, forward, final state and all gradients), then every linear op against
# causal SDPA (flash) in bf16 from 4k to 128k tokens, forward and forward+backward.
# Runs unchanged from the repo root: bash benchmarks/gpu_linear.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
pip install -q -e ".[test,bench]"
pytest -q -m gpu tests/kernels/test_gpu.py -k lightning -x
pytest -q tests/kernels/test_lightning.py tests/kernels/test_rat.py tests/kernels/test_lla.py tests/kernels/test_titans.py -x
python benchmarks/linear.py --only speed --device cuda --dtype bfloat16 --tokens 4096 16384 65536 131072 \
    --bwd-max 65536 --repeats 10 --out bench-results/gpu-linear
