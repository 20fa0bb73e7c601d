"""vzoo sparse attention under diffusers context parallelism.

Ulysses all-to-alls ``[B, S/P, H, D]`` into ``[B, S, H/P, D]`` before the attention call, so each rank
sees every token for a slice of heads; VMoBA and PSA route per head and run unchanged on each rank.
Ring attention keeps a slice of the keys per rank and merges partial results by log-sum-exp: sparse
routing over a slice would be wrong, so it is refused, as are attention backends whose
context-parallel path never calls ``scaled_dot_product_attention`` (vzoo answers that call).

Families with text tokens inside self-attention split text and video per rank, so the gathered
sequence comes rank by rank (``[video_0, text_0, video_1, text_1]`` for HunyuanVideo);
:class:`UlyssesTokens` puts it in the one-process order before attention (where the text mask of the
whole sequence applies) and back after. CogVideoX's processor calls SDPA on its own slice, so vzoo
does the all-to-all there too. diffusers 0.42 has plans for Wan and LTX only; :data:`PLANS` adds
HunyuanVideo and CogVideoX (:func:`context_parallel_plan`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = [
    "PLANS", "UlyssesTokens", "check_parallel", "context_parallel", "context_parallel_plan", "enable_context_parallel",
    "mean_over_ulysses", "ulysses_heads",
]

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
    Works before or after :func:`~vzoo.pipelines.apply_sparse_attention`; the plan is
    :func:`context_parallel_plan`'s. Returns the config."""
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
        transformer.enable_parallelism(config=config, cp_plan=context_parallel_plan(transformer))
    finally:
        torch.accelerator.device_count = count
    return config


def mean_over_ulysses(processor, device) -> Callable[[float], float]:
    """``density -> mean over the Ulysses group``: each rank holds an equal share of the heads, so the
    mean of the ranks' densities is the density of the whole call (an all-reduce per decision)."""
    cp = context_parallel(processor)

    def reduce(density: float) -> float:
        total = torch.tensor([density], dtype=torch.float64, device=device)
        dist.all_reduce(total, group=cp._ulysses_mesh.get_group())
        return total.item() / cp.ulysses_degree

    return reduce


def _plans() -> dict[str, dict]:
    from diffusers.models._modeling_parallel import ContextParallelInput as Split
    from diffusers.models._modeling_parallel import ContextParallelOutput as Gather

    tokens = {"hidden_states": Split(split_dim=1, expected_dims=3), "encoder_hidden_states": Split(split_dim=1, expected_dims=3)}
    return {
        # rotary tables [S, D] of the video tokens, split like them; text and video split at the first block
        # (the text mask of the whole sequence is built before, in one-process order); video gathered at the end
        "hunyuanvideo": {
            "rope": {i: Split(split_dim=0, expected_dims=2, split_output=True) for i in (0, 1)},
            "transformer_blocks.0": tokens,
            "proj_out": Gather(gather_dim=1, expected_dims=3),
        },
        "cogvideox": {
            "": {"image_rotary_emb": [Split(split_dim=0, expected_dims=2), Split(split_dim=0, expected_dims=2)]},
            "transformer_blocks.0": tokens,
            "norm_final": Gather(gather_dim=1, expected_dims=3),
        },
    }


PLANS = ("hunyuanvideo", "cogvideox")  # families whose plan vzoo supplies (diffusers 0.42 has none)


def context_parallel_plan(transformer) -> dict:
    """The context-parallel plan of a video transformer: its own ``_cp_plan`` (Wan, LTX), else vzoo's for
    its family (HunyuanVideo, CogVideoX: pass it as ``enable_parallelism(config=..., cp_plan=...)``)."""
    from .adapters import adapter_for

    own = getattr(transformer, "_cp_plan", None)
    if own is not None:
        return own
    family = adapter_for(transformer).family
    if family not in PLANS:
        raise ValueError(f"{type(transformer).__name__} has no context-parallel plan")
    return _plans()[family]


class UlyssesTokens:
    """One attention call under Ulysses: rank ``rank`` of ``degree`` holds ``video`` of the ``n_video``
    video tokens and as many of the text tokens, in its local order (``text_first``). ``into`` turns the
    call's ``[B, H, L, D]`` (``gathered``: diffusers did the all-to-all, ``L = degree x local``; else the
    local slice ``[B, H_all, local, D]``) into the one-process order ``[B, H, N, D]``; ``back`` undoes it."""

    def __init__(self, processor, n_video: int, text_first: bool, gathered: bool) -> None:
        cp = context_parallel(processor)
        self.degree, self.text_first, self.gathered = cp.ulysses_degree, text_first, gathered
        self.group = None if gathered else cp._ulysses_mesh.get_group()
        if n_video % self.degree:
            raise RuntimeError(f"{n_video} video tokens do not split into {self.degree} Ulysses ranks")
        self.video = n_video // self.degree

    def _all_to_all(self, x, heads_out: bool):
        """``heads_out``: ``[B, H, L, D]`` -> ``[B, H/P, P*L, D]``; else the inverse."""
        p = self.degree
        b, h, n, d = x.shape
        send = (x.unflatten(1, (p, h // p)).movedim(1, 0) if heads_out else x.unflatten(2, (p, n // p)).permute(2, 0, 1, 3, 4))
        send = send.contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # recv[r]: rank r's part for me
        if heads_out:  # [P, B, H/P, L, D]: token chunks in rank order
            return recv.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * n, d)
        return recv.movedim(0, 1).reshape(b, p * h, n // p, d)  # [P, B, H/P, L, D]: head chunks

    def into(self, x):
        if not self.gathered:
            x = self._all_to_all(x, heads_out=True)
        chunks = x.unflatten(2, (self.degree, -1))  # [B, H, P, local, D]
        self.local = chunks.shape[3]
        if self.local < self.video:
            raise RuntimeError(
                f"vzoo sparse attention under context parallelism: a call of {x.shape[2]} tokens cannot hold "
                f"{self.degree} x {self.video} video tokens; this rank holds only a slice of the sequence, so "
                "attending to it would be wrong (vzoo needs Ulysses, which gathers every token)"
            )
        first = self.local - self.video if self.text_first else self.video
        if first in (0, self.local):
            return x
        return torch.cat([chunks[:, :, :, :first].flatten(2, 3), chunks[:, :, :, first:].flatten(2, 3)], 2)

    def back(self, y):
        first = self.local - self.video if self.text_first else self.video
        if first not in (0, self.local):
            head, tail = y[:, :, : self.degree * first], y[:, :, self.degree * first :]
            y = torch.cat([head.unflatten(2, (self.degree, first)), tail.unflatten(2, (self.degree, -1))], 3).flatten(2, 3)
        return y if self.gathered else self._all_to_all(y, heads_out=False)
