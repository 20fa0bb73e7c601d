#!/usr/bin/env bash
# neighborhood_aggregate on a CUDA machine: the op's tests with the real Triton kernels, then the
# Triton backend against the torch tap loop and the gather reference at detection-like shapes.
# Runs unchanged from the repo root: bash benchmarks/gpu_neighborhood.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
pip install -q -e ".[test]"
pytest -q tests/kernels/test_neighborhood.py -x
python - <<'PY'
import torch
from vzoo.bench import median_ms
from vzoo.kernels import neighborhood_aggregate

dev = torch.device("cuda")
for b, ch, h, w, k, g in [(2, 256, 50, 68, 13, 8), (8, 128, 100, 136, 13, 4), (8, 512, 25, 34, 7, 16)]:
    attn = torch.randn(b, g, h, w, k * k, device=dev).softmax(-1).requires_grad_()
    value = torch.randn(b, g, h, w, ch // g, device=dev, requires_grad=True)
    up = torch.randn_like(value)
    row = []
    for backend in ("reference", "torch", "triton"):
        ms = median_ms(lambda: neighborhood_aggregate(attn, value, k, backend=backend).backward(up), dev, 10)
        row.append(f"{backend} {ms:.2f} ms")
    print((b, ch, h, w, k, g), " | ".join(row))
PY
