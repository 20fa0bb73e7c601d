"""vzoo sparse attention under diffusers context parallelism.

Ulysses all-to-alls ``[B, S/P, H, D]`` into ``[B, S, H/P, D]`` before the attention call, so each rank
sees every token, in order, for a slice of heads; VMoBA and PSA route per head and run unchanged on
each rank. Ring attention keeps a slice of the keys per rank and merges partial results by
log-sum-exp: sparse routing over a slice would be wrong, so it is refused, as are attention backends
whose context-parallel path never calls ``scaled_dot_product_attention`` (vzoo answers that call).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["check_parallel", "context_parallel", "enable_context_parallel", "mean_over_ulysses", "ulysses_heads"]

# diffusers' attention backends whose context-parallel forward calls F.scaled_dot_product_attention
SDPA_BACKENDS = ("native",)


def context_parallel(processor):
    """The ``ContextParallelConfig`` a stock attention processor runs under, or ``None``."""
    return getattr(getattr(processor, "_parallel_config", None), "context_parallel_config", None)


def _backend(processor) -> str:
    name = getattr(processor, "_attention_backend", None)
    if name is None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        name, _ = _AttentionBackendRegistry.get_active_backend()
    return getattr(name, "value", str(name))


def check_parallel(processor) -> None:
    """``RuntimeError`` when ``processor`` runs under a context parallelism vzoo cannot serve exactly:
    a ring degree above 1, or a backend that never calls ``scaled_dot_product_attention``."""
    cp = context_parallel(processor)
    if cp is None:
        return
    if (cp.ring_degree or 1) > 1:
        raise RuntimeError(
            f"vzoo sparse attention cannot run under ring attention (ring_degree={cp.ring_degree}): each rank "
            "holds a slice of the keys; use ContextParallelConfig(ulysses_degree=N) with ring_degree=1"
        )
    backend = _backend(processor)
    if backend not in SDPA_BACKENDS:
        raise RuntimeError(
            f"vzoo sparse attention under context parallelism needs an attention backend that calls "
            f"scaled_dot_product_attention ({', '.join(SDPA_BACKENDS)}), not {backend!r}: "
            "transformer.set_attention_backend('native')"
        )


def ulysses_heads(processor) -> tuple[int, int] | None:
    """``(rank, degree)`` of the Ulysses group when ``processor`` runs under it: the rank holds heads
    ``[rank * H, (rank + 1) * H)`` of ``degree * H`` (the all-to-all hands out head chunks in rank order).
    ``None`` without context parallelism."""
    cp = context_parallel(processor)
    if cp is None or cp.ulysses_degree == 1:
        return None
    return cp._ulysses_local_rank, cp.ulysses_degree


def enable_context_parallel(transformer, ulysses_degree: int | None = None, ring_degree: int = 1):
    """Turn on diffusers' context parallelism over the initialised default process group (torchrun, or
    ``dist.init_process_group``): ``transformer.enable_parallelism`` with a ``(ring, ulysses)`` device mesh
    on CUDA, or on CPU (gloo) when no GPU is present, which diffusers 0.42 cannot build itself (it
    divides by the accelerator count). ``ulysses_degree`` defaults to ``world_size / ring_degree``.
    Works before or after :func:`~vzoo.pipelines.apply_sparse_attention`. Returns the config."""
    import torch
    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("enable_context_parallel needs torch.distributed initialised (run under torchrun)")
    world = dist.get_world_size()
    ulysses = world // ring_degree if ulysses_degree is None else ulysses_degree
    if ulysses * ring_degree != world:
        raise ValueError(f"ulysses_degree={ulysses} x ring_degree={ring_degree} must equal the world size {world}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (ring_degree, ulysses), mesh_dim_names=("ring", "ulysses"))
    config = ContextParallelConfig(ring_degree=ring_degree, ulysses_degree=ulysses, mesh=mesh)
    count = torch.accelerator.device_count
    if device == "cpu":  # diffusers computes rank % device_count(): one "device" per process on CPU
        torch.accelerator.device_count = lambda: 1
    try:
        transformer.enable_parallelism(config=config)
    finally:
        torch.accelerator.device_count = count
    return config


def mean_over_ulysses(processor, device) -> Callable[[float], float]:
    """``density -> mean over the Ulysses group``: each rank holds an equal share of the heads, so the
    mean of the ranks' densities is the density of the whole call (an all-reduce per decision)."""
    import torch
    import torch.distributed as dist

    cp = context_parallel(processor)

    def reduce(density: float) -> float:
        total = torch.tensor([density], dtype=torch.float64, device=device)
        dist.all_reduce(total, group=cp._ulysses_mesh.get_group())
        return total.item() / cp.ulysses_degree

    return reduce
