#!/usr/bin/env bash
# Video sparse attention on a CUDA machine at Wan-1.3B attention size (grid 21x30x52 = 32760 tokens,
# 12 heads of 128, bf16): VMoBA (per layer type) and PSA (balanced) against SDPA (flash), with density.
# Runs unchanged from the repo root: bash benchmarks/gpu_video.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
pip install -q -e ".[test]"
pytest -q -m gpu tests/kernels/test_gpu.py -k "pyramid or token_routed" -x
pytest -q tests/modules/test_vmoba.py tests/modules/test_psa.py tests/pipelines -x
python - <<'PY'
import torch
import torch.nn.functional as F
from vzoo.bench import median_ms
from vzoo.bench_video import structured_qkv
from vzoo.psa import PSAConfig, psa_attention
from vzoo.vmoba import VMoBAConfig, vmoba_attention

dev = torch.device("cuda")
grid = (21, 30, 52)
q, k, v = (x.to(dev, torch.bfloat16) for x in structured_qkv(grid, heads=12, dim=128))
dense = F.scaled_dot_product_attention(q, k, v)
sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), dev, 10)
print(f"sdpa {sdpa:.2f} ms")
cfg = VMoBAConfig()
for layer in range(3):
    out, density = vmoba_attention(q, k, v, grid, layer, cfg, return_density=True)
    ms = median_ms(lambda: vmoba_attention(q, k, v, grid, layer, cfg), dev, 10)
    err = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
    print(f"vmoba layer {layer}: {ms:.2f} ms ({sdpa / ms:.2f}x), density {density:.3f}, rel L2 {err:.3f}")
psa = PSAConfig.preset("balanced")
out, density = psa_attention(q, k, v, grid, psa, return_density=True)
ms = median_ms(lambda: psa_attention(q, k, v, grid, psa), dev, 10)
err = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
print(f"psa balanced: {ms:.2f} ms ({sdpa / ms:.2f}x), density {density:.3f}, rel L2 {err:.3f}")
PY
