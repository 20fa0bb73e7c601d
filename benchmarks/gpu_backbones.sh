#!/usr/bin/env bash
# BiFormer-T on a CUDA machine: training step and inference at batch 128, bf16 autocast, against the
# gather-based implementation (same weights) and timm models of similar FLOPs; peak memory per step.
# Runs unchanged from the repo root: bash benchmarks/gpu_backbones.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
pip install -q -e ".[test]"
pytest -q tests/backbones -x
python benchmarks/backbones.py --device cuda --amp bfloat16 --batch 128 --repeats 10 --out bench-results/gpu
