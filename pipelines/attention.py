"""The sparse replacement for one self-attention ``scaled_dot_product_attention`` call of a video DiT.

Video-to-video attention goes through VMoBA or PSA on the latent grid; text tokens (a prefix in
CogVideoX, a suffix in HunyuanVideo) stay dense: video queries attend to the text keys densely and the
two parts are merged by log-sum-exp, text queries attend to everything.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vzoo.kernels import merge_attention_states
from vzoo.kernels.reference import dense_attention
from vzoo.psa import PSAConfig, psa_attention
from vzoo.vmoba import VMoBAConfig, vmoba_attention

__all__ = ["video_attention", "TokenCountMismatch", "Unsupported"]


class Unsupported(Exception):
    """This call cannot take the sparse path; the caller falls back to the stock attention."""


class TokenCountMismatch(Unsupported):
    """The call's tokens do not hold the latent grid (a sequence slice under context parallelism?)."""


def _key_mask(attn_mask: torch.Tensor | None, b: int, s: int) -> torch.Tensor | None:
    """A boolean key-padding mask ``[B, 1, 1, S]`` from SDPA's ``attn_mask`` (or ``Unsupported``)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1:
        raise Unsupported(f"attention mask of shape {tuple(attn_mask.shape)} and dtype {attn_mask.dtype} (only a boolean key-padding mask is supported)")
    return attn_mask.expand(b, 1, 1, s)


def video_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    *,
    grid: tuple[int, int, int],
    layer_idx: int,
    config: VMoBAConfig | PSAConfig,
    text_first: bool,
    generator: torch.Generator | None = None,
    offsets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float, bool]:
    """``q, k, v [B, H, S, D]`` with ``S = T*H*W`` video tokens plus text tokens (before them when
    ``text_first``, else after). Returns the attention output, the density the method selected for the
    video part and whether the dense kernel ran instead (selection above the device's break-even).
    ``generator``: PSA's offset sampling (torch's global generator if None); ``offsets``: PSA's sampled
    offsets, when the caller drew them (see :func:`vzoo.psa.psa_offsets`)."""
    b, h, s, d = q.shape
    n_video = math.prod(grid)
    n_text = s - n_video
    if n_text < 0 or k.shape[2] != s:
        raise TokenCountMismatch(f"{s} tokens do not hold the latent grid {grid} ({n_video} tokens)")
    scale = d**-0.5 if scale is None else scale
    keep = _key_mask(attn_mask, b, s)
    video = slice(n_text, s) if text_first else slice(0, n_video)
    text = slice(0, n_text) if text_first else slice(n_video, s)
    if keep is not None and not bool(keep[..., video].all()):
        raise Unsupported("the attention mask hides video tokens")
    qv, kv, vv = q[:, :, video], k[:, :, video], v[:, :, video]  # GQA stays unexpanded: the methods handle it
    if isinstance(config, VMoBAConfig):
        method, args, kw = vmoba_attention, (grid, layer_idx, config), {}
    else:
        method, args, kw = psa_attention, (grid, config), dict(generator=generator, offsets=offsets)
    # lse_v: [the video part's log-sum-exp] when there are text tokens to merge with, else []
    out_v, *lse_v, density, dense = method(qv, kv, vv, *args, scale=scale, return_lse=n_text > 0, return_density=True, **kw)
    if n_text == 0:
        return out_v, density, dense
    keep_text = torch.ones((), dtype=torch.bool, device=q.device) if keep is None else keep[..., text]
    out_t, lse_t = dense_attention(qv, k[:, :, text], v[:, :, text], keep_text, scale)  # a few text keys: exact and small
    out_v = merge_attention_states([out_v, out_t], [*lse_v, lse_t])[0]
    text_out = F.scaled_dot_product_attention(q[:, :, text], k, v, attn_mask=keep, scale=scale, enable_gqa=k.shape[1] != h)
    parts = [text_out, out_v] if text_first else [out_v, text_out]
    return torch.cat(parts, 2), density, dense
