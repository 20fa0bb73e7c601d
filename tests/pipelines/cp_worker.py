"""One rank of the two-process context-parallel test (``test_context_parallel.py`` starts two of these).

Usage: ``python cp_worker.py RANK WORLD PORT OUT_DIR``. For every family, method and setup order it
builds the tiny model (same seed as the one-process run), turns on Ulysses over gloo and vzoo in that
order, and rank 0 saves the output to ``OUT_DIR/{family}-{method}-{order}.npy``; each rank writes its
dense-fallback decision on unequal densities (``decided-{rank}.txt``); then it checks that a ring degree
above 1 is refused in both orders (``OUT_DIR/ring-{order}.txt`` holds the error)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

from vzoo.pipelines import apply_sparse_attention  # noqa: E402
from vzoo.kernels.break_even import dense_is_faster, shared_density  # noqa: E402
from vzoo.pipelines.parallel import enable_context_parallel, mean_over_ulysses  # noqa: E402

CASES = tiny_models.CONTEXT_PARALLEL_CASES


def run(family: str, method: str, order: str, ulysses: int, ring: int):
    model, inputs = tiny_models.context_parallel_model(family)
    config = CASES[method]
    if order == "cp_first":
        enable_context_parallel(model, ulysses_degree=ulysses, ring_degree=ring)
        handle = apply_sparse_attention(model, config)
    else:
        handle = apply_sparse_attention(model, config)
        enable_context_parallel(model, ulysses_degree=ulysses, ring_degree=ring)
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    handle.remove()
    return out


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for family in sys.argv[5:] or tiny_models.CONTEXT_PARALLEL_FAMILIES:
        for method in CASES:
            for order in ("cp_first", "vzoo_first"):
                result = run(family, method, order, world, 1)
                if rank == 0:
                    np.save(out / f"{family}-{method}-{order}.npy", result.detach().numpy())
    # the fallback decision under Ulysses: rank 0 selected nothing, rank 1 everything; both must decide on
    # the mean (0.5: dense for PSA, break-even 0.2), as one process holding both heads would
    model, _ = tiny_models.context_parallel_model("wan")
    enable_context_parallel(model, ulysses_degree=world)
    reduce = mean_over_ulysses(model.blocks[0].attn1.processor, "cpu")
    with shared_density(reduce):
        decided = dense_is_faster(float(rank), "cpu", "psa")
    (out / f"decided-{rank}.txt").write_text(str(decided))
    for order in ("cp_first", "vzoo_first"):
        try:
            run("wan", "vmoba", order, 1, world)
            message = "no error"
        except RuntimeError as e:
            message = str(e)
        if rank == 0:
            (out / f"ring-{order}.txt").write_text(message)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
