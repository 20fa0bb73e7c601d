"""Neighbourhood aggregation with per-pixel weights (the "AV" half of 2-D neighbourhood attention).

Each output pixel is a weighted sum of the ``k x k`` value pixels around it, with its own weights per
group: ContMix's dynamic kernels in OverLoCK (arXiv 2502.20087). Border rule of NATTEN's ``na2d_av``
(Hassani et al., arXiv 2204.07143): the window is shifted inside the image at borders, never
zero-padded, so every pixel sees exactly ``k x k`` real pixels.

Layout (NATTEN's, heads first): ``attn [B, G, H, W, k*k]`` with tap ``t = a * k + c`` for the window row
``a`` and column ``c``; ``value [B, G, H, W, D]``; output ``[B, G, H, W, D]``.
"""

from __future__ import annotations

import functools

import torch

from .backends import resolve_backend

__all__ = [
    "neighborhood_aggregate", "neighborhood_aggregate_plain", "neighborhood_rpb_index", "neighborhood_window_start",
    "neighborhood_windows",
]


def neighborhood_window_start(length: int, kernel_size: int, device: torch.device | None = None) -> torch.Tensor:
    """First window position of every index ``[length]``: ``clamp(i - k // 2, 0, length - k)``."""
    i = torch.arange(length, device=device)
    return (i - kernel_size // 2).clamp(0, length - kernel_size)


def neighborhood_windows(length: int, kernel_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``[length, k]``: the positions each index's window covers (shifted inside the map, never padded)."""
    return neighborhood_window_start(length, kernel_size, device)[:, None] + torch.arange(kernel_size, device=device)


def neighborhood_rpb_index(kernel_size: int, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """Indices ``[H, W, k*k]`` into a flattened ``(2k-1) x (2k-1)`` relative-position-bias table for each
    pixel's taps, border-aware like the windows: index ``(key - query) + (k - 1)`` per axis. Cached per
    shape and device in eager mode (every block of a stage asks for the same); do not modify it in place.
    TorchScript compiles it (uncached)."""
    if torch.jit.is_scripting():
        return _rpb_index(kernel_size, height, width, device)
    return _eager_rpb_index(kernel_size, height, width, device)


@torch.jit.unused
def _eager_rpb_index(kernel_size: int, height: int, width: int, device: torch.device | None) -> torch.Tensor:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if torch.compiler.is_compiling():  # a traced graph builds it inline (Dynamo would bypass the cache)
        return _rpb_index(kernel_size, height, width, device)
    return _cached_rpb_index(kernel_size, height, width, device)


def _rpb_index(k: int, height: int, width: int, device: torch.device | None) -> torch.Tensor:
    dy = neighborhood_windows(height, k, device) - torch.arange(height, device=device)[:, None] + k - 1  # [H, k]
    dx = neighborhood_windows(width, k, device) - torch.arange(width, device=device)[:, None] + k - 1  # [W, k]
    return (dy[:, None, :, None] * (2 * k - 1) + dx[None, :, None, :]).reshape(height, width, k * k)


_cached_rpb_index = functools.lru_cache(maxsize=64)(_rpb_index)


def _check(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> None:
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size={kernel_size!r} must be a positive odd int")
    if value.dim() != 5 or attn.dim() != 5:
        raise ValueError(f"value must be [B, G, H, W, D] and attn [B, G, H, W, k*k]; got {tuple(value.shape)}, {tuple(attn.shape)}")
    if attn.shape[:4] != value.shape[:4] or attn.shape[4] != kernel_size**2:
        raise ValueError(
            f"attn {tuple(attn.shape)} must be {(*value.shape[:4], kernel_size**2)} for value {tuple(value.shape)} "
            f"and kernel_size={kernel_size}"
        )
    h, w = value.shape[2:4]
    if min(h, w) < kernel_size:
        raise ValueError(f"the map ({h}x{w}) is smaller than kernel_size={kernel_size}; upsample it first")
    if attn.device != value.device:
        raise ValueError(f"attn is on {attn.device} but value is on {value.device}")
    if not attn.is_floating_point() or not value.is_floating_point():
        raise ValueError(f"attn and value must be floating point, got {attn.dtype} and {value.dtype}")


def _reference(attn: torch.Tensor, value: torch.Tensor, k: int) -> torch.Tensor:
    """Gather every pixel's k*k window (a k*k-fold copy, as an unfold does), then weight and sum."""
    b, g, h, w, d = value.shape
    rows, cols = neighborhood_windows(h, k, value.device), neighborhood_windows(w, k, value.device)  # [H, k], [W, k]
    src = (rows[:, None, :, None] * w + cols[None, :, None, :]).reshape(-1)  # [H * W * k * k]
    windows = value.float().flatten(2, 3)[:, :, src].view(b, g, h, w, k * k, d)
    return torch.einsum("bghwt,bghwtd->bghwd", attn.float(), windows).to(value.dtype)


def neighborhood_aggregate_plain(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """:func:`neighborhood_aggregate` in plain torch ops, for TorchScript and export: a loop over the ``k*k``
    taps adding ``attn[..., t] * value`` at the tap's shifted rows and columns (fp32 accumulation, one
    map-sized copy per tap, autograd through the ops). Shapes are not checked here."""
    k = kernel_size
    v = value.float()
    rows, cols = neighborhood_windows(v.shape[2], k, v.device), neighborhood_windows(v.shape[3], k, v.device)
    out = torch.zeros_like(v)
    for a in range(k):
        v_rows = v.index_select(2, rows[:, a])
        for c in range(k):
            out = out + attn[..., a * k + c, None].float() * v_rows.index_select(3, cols[:, c])
    return out.to(value.dtype)


def _regions(width: int, k: int) -> list[slice]:
    """Output columns by how their window moves: the interior (a plain shift) and the two border
    strips (windows pinned to the image edge)."""
    nh = k // 2
    return [slice(nh, width - nh)] + ([slice(0, nh), slice(width - nh, width)] if nh else [])


def _src_cols(dst: slice, c: int, k: int, width: int) -> slice:
    """Value columns read by the output columns ``dst`` for window column ``c``."""
    nh = k // 2
    if dst.start == nh:  # interior: column j reads j - nh + c
        return slice(c, c + width - 2 * nh)
    start = c if dst.start == 0 else width - k + c  # border strip: one column for all
    return slice(start, start + 1)


class _TapLoop(torch.autograd.Function):
    """Loop over the k*k taps, adding ``attn[..., t] * shifted(value)`` into the output.

    For window row ``a`` the value rows are gathered once (``index_select``); along the columns the
    shift is a plain slice for interior pixels and one broadcast column for each border strip, so no
    k*k-fold copy is ever formed. Backward mirrors it (slices, then ``index_add_`` over the rows)."""

    @staticmethod
    def forward(ctx, attn: torch.Tensor, value: torch.Tensor, k: int) -> torch.Tensor:
        v = value.float()
        h, w = v.shape[2:4]
        rows, regions = neighborhood_window_start(h, k, v.device), _regions(w, k)
        out = torch.zeros_like(v)
        for a in range(k):
            v_rows = v.index_select(2, rows + a)  # row tap a for every output row
            for c in range(k):
                weights = attn[..., a * k + c].float()
                for dst in regions:
                    out[..., dst, :].addcmul_(weights[..., dst, None], v_rows[..., _src_cols(dst, c, k, w), :])
        ctx.k = k
        ctx.save_for_backward(attn, value)
        return out.to(value.dtype)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        attn, value = ctx.saved_tensors
        k = ctx.k
        v, dout = value.float(), dout.float()
        h, w = v.shape[2:4]
        rows, regions = neighborhood_window_start(h, k, v.device), _regions(w, k)
        dattn = torch.empty(attn.shape, dtype=torch.float32, device=attn.device)
        dvalue = torch.zeros_like(v)
        dv_rows = torch.empty_like(v)
        for a in range(k):
            v_rows = v.index_select(2, rows + a)
            dv_rows.zero_()
            for c in range(k):
                weights = attn[..., a * k + c].float()
                for dst in regions:
                    src = _src_cols(dst, c, k, w)
                    dattn[..., dst, a * k + c] = (dout[..., dst, :] * v_rows[..., src, :]).sum(-1)
                    part = weights[..., dst, None] * dout[..., dst, :]
                    if src.stop - src.start != dst.stop - dst.start:
                        part = part.sum(3, keepdim=True)  # a border strip reads one column
                    dv_rows[..., src, :] += part
            dvalue.index_add_(2, rows + a, dv_rows)
        return dattn.to(attn.dtype), dvalue.to(value.dtype), None


@torch.compiler.disable  # opaque to torch.compile: tracing unrolls k*k taps per call
def _tap_loop(attn: torch.Tensor, value: torch.Tensor, k: int) -> torch.Tensor:
    return _TapLoop.apply(attn, value, k)


def neighborhood_aggregate(
    attn: torch.Tensor, value: torch.Tensor, kernel_size: int, *, backend: str | None = None
) -> torch.Tensor:
    """``out[b, g, i, j] = sum_t attn[b, g, i, j, t] * value[b, g, rows(i)[t // k], cols(j)[t % k]]``.

    Args:
        attn: ``[B, G, H, W, k*k]`` per-pixel weights (e.g. softmaxed dynamic kernels).
        value: ``[B, G, H, W, D]``.
        kernel_size: odd ``k``; ``H, W >= k``.
        backend: ``"reference"`` (gathers every window: k*k-fold memory), ``"torch"`` (the CPU default;
            a tap loop over slices, forward and backward) or ``"triton"`` (the CUDA default; fused
            kernels, deterministic backward without atomics; on CPU only under ``TRITON_INTERPRET=1``).

    Returns:
        ``[B, G, H, W, D]`` in ``value.dtype`` (fp32 accumulation). Every tap is read, so NaN or Inf in
        ``attn`` or ``value`` reaches the outputs whose windows hold it (not checked, as in a convolution).
    """
    _check(attn, value, kernel_size)
    needs_grad = torch.is_grad_enabled() and (attn.requires_grad or value.requires_grad)
    name = resolve_backend(
        backend, value.device, needs_grad=needs_grad, needs_lse=False, supports=("reference", "torch", "triton")
    )
    if name == "reference":
        return _reference(attn, value, kernel_size)
    if name == "triton":
        from .neighborhood_triton import aggregate

        return aggregate(attn, value, kernel_size)
    return _tap_loop(attn, value, kernel_size)
