#!/usr/bin/env bash
# neighborhood_aggregate on a CUDA machine: the op's tests with the real Triton kernels, then the
# Triton backend against the torch tap loop and the gather reference at detection-like shapes, then
# overlock_t against the unfold re-implementation and timm models (bf16 autocast, batch 64).
# Runs unchanged from the repo root: bash benchmarks/gpu_neighborhood.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
pip install -q -e ".[test]"
pytest -q -m gpu tests/kernels/test_gpu.py -k neighborhood -x
pytest -q tests/kernels/test_neighborhood.py tests/backbones/test_overlock.py -x
python - <<'PY'
import torch
from vzoo.bench import median_ms, neighborhood_step

dev = torch.device("cuda")
for case in [(2, 256, 50, 68, 13, 8), (8, 128, 100, 136, 13, 4), (8, 512, 25, 34, 7, 16)]:
    row = [f"{b} {median_ms(neighborhood_step(case, b, dev), dev, 10):.2f} ms" for b in ("reference", "torch", "triton")]
    print(case, " | ".join(row))
PY
python benchmarks/backbones.py --family overlock --device cuda --amp bfloat16 --batch 64 --repeats 10 --out bench-results/gpu
