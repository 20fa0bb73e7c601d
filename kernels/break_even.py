"""When dense attention is faster than a sparse method: break-even densities per device and op.

A sparse method attends a fraction ``density`` of the (query, key) work of dense attention
(FLOP-equivalent: a key pooled by ``p`` counts ``1/p``). It also pays for its selection (gates,
importance sampling, sorting) and runs kernels slower per FLOP than fused dense SDPA, so above a
break-even density dense SDPA is faster. Callers (VMoBA, PSA, any method with a density) run the dense
kernel for that call instead: never slower than dense, and never less exact.

CPU values were measured with ``python benchmarks/video.py --break-even`` (2-core x86 CPU, 2 threads,
fp32, 4 heads of 64, structured inputs): the density where the speed-up over SDPA falls through 1 was
PSA 0.29 / 0.23 and VMoBA 0.37 / 0.61 at 8192 / 16384 tokens; the table keeps the lower value, rounded
down (PSA's cost grows faster than its FLOP-equivalent density: pooled levels run small blocks). CUDA
values are NOT measured here: conservative guesses (block-sparse Triton kernels reach roughly half of
FlashAttention's throughput per selected block), to be replaced by ``bash benchmarks/gpu_video.sh``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .layout import repeat_kv

__all__ = [
    "BREAK_EVEN", "DensityReport", "DensityStats", "break_even", "dense_is_faster", "dense_attention_lse", "shared_density",
]

BREAK_EVEN: dict[tuple[str, str], float] = {
    ("cpu", "psa"): 0.2,  # measured
    ("cpu", "vmoba"): 0.35,  # measured
    ("cpu", "moba"): 0.55,  # measured (vzoo.lm, causal, blocks of 512: crosses dense at 0.59 at 8k and 16k)
    ("cpu", "seerattention"): 0.45,  # measured, noisy (vzoo.lm, causal, blocks of 64: 0.49 at 8k, ~0.45 at 16k)
    # measured on SmolLM2-135M at 8k (vzoo.lm DHSA, chunk-aligned per-head layouts): about 0.25; at density 0.45
    # the whole prefill ran at 0.52x dense
    ("cpu", "dhsa"): 0.25,
    ("cuda", "psa"): 0.5,  # unmeasured, conservative
    ("cuda", "vmoba"): 0.5,  # unmeasured, conservative
}
_DEFAULT = 0.5  # any other (device, op): unmeasured


def break_even(device: torch.device | str, op: str) -> float:
    """Density above which dense attention is faster than ``op`` on ``device`` (its type decides)."""
    return BREAK_EVEN.get((torch.device(device).type, op), _DEFAULT)


_shared: contextvars.ContextVar[Callable[[float], float] | None] = contextvars.ContextVar("vzoo_density", default=None)


@contextlib.contextmanager
def shared_density(reduce: Callable[[float], float]) -> Iterator[None]:
    """Inside the block :func:`dense_is_faster` decides on ``reduce(density)``: the density of the whole
    call when its heads are split over processes (context parallelism: the mean over the ranks), so
    every rank takes the path one process would. ``reduce`` is collective there: all ranks must decide."""
    token = _shared.set(reduce)
    try:
        yield
    finally:
        _shared.reset(token)


def dense_is_faster(density: float, device: torch.device | str, op: str) -> bool:
    """True when a call of ``op`` that selected ``density`` of the dense work should run dense instead
    (of the whole call, inside :func:`shared_density`)."""
    reduce = _shared.get()
    return (density if reduce is None else reduce(density)) > break_even(device, op)


class DensityStats:
    """Density statistics of a stream of calls: ``calls`` calls that chose blocks, their summed selected
    density ``total``, and ``dense_calls``, how many of them ran dense attention above the break-even."""

    def __init__(self) -> None:
        self.total, self.calls, self.dense_calls = 0.0, 0, 0

    def add(self, density: float, dense: bool) -> None:
        self.total += density
        self.calls += 1
        self.dense_calls += int(dense)


class DensityReport:
    """What a method handle reports (``density``, ``sparse_calls``, ``dense_calls``), summed over the
    :class:`DensityStats` that ``density_stats()`` returns."""

    def density_stats(self) -> list[DensityStats]:
        raise NotImplementedError

    @property
    def density(self) -> float | None:
        """Mean selected density over the calls so far; ``None`` before any."""
        calls = self.sparse_calls
        return sum(s.total for s in self.density_stats()) / calls if calls else None

    @property
    def sparse_calls(self) -> int:
        return sum(s.calls for s in self.density_stats())

    @property
    def dense_calls(self) -> int:
        return sum(s.dense_calls for s in self.density_stats())


def dense_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, need_lse: bool = True, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dense call a method falls back to: ``q [B, Hq, S, D]`` over all keys of ``k, v [B, Hkv, Skv, D]``
    (GQA allowed). Returns ``out`` (``q.dtype``) and, if ``need_lse``, ``lse [B, Hq, S]`` fp32: from
    PyTorch's fused CPU flash kernel when no gradient is needed, else SDPA plus a log-sum-exp over query
    chunks of ``chunk`` rows (differentiable)."""
    group = q.shape[1] // k.shape[1]
    if not need_lse:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=group > 1), None
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.device.type == "cpu" and not needs_grad:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse.float()
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    kt = k.float().transpose(-1, -2)
    lse = torch.cat([torch.logsumexp((q[:, :, i : i + chunk].float() @ kt) * scale, -1) for i in range(0, q.shape[2], chunk)], 2)
    return out, lse
