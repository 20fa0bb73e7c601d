#!/usr/bin/env bash
# Language-model adapters on a CUDA machine: the lm and kernel tests (Triton backends), then prefill of
# the narrow Llama (4 layers, 4 heads of 64, bf16) at 32k-128k tokens, each method against SDPA (flash),
# with peak memory, KV-cache size and density. Runs unchanged from the repo root: bash benchmarks/gpu_lm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
pip install -q -e ".[test]"
pytest -q -m gpu tests/kernels/test_gpu.py -k "block_sparse or token_routed or sink_window or garbage" -x
pytest -q tests/lm tests/kernels/test_window.py tests/kernels/test_block_sparse.py -x
python benchmarks/lm.py --device cuda --dtype bfloat16 --tokens 32768 65536 131072 --repeats 5
