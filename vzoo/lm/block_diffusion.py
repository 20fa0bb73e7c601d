"""Block-diffusion attention for transformers causal LMs (Fast-dLLM v2, arXiv 2509.26328; Efficient-DLM, arXiv
2512.14067; masks of BD3-LM, arXiv 2503.09573), on vzoo's kernels.

``apply_sparse_attention(model, BlockDiffusionConfig(block=32))`` makes the model's attention causal across
blocks of ``block`` tokens and bidirectional inside each (the inference mask, on absolute positions, so prefill,
a block on top of a KV cache and decoding all use it). :func:`bd3_forward` runs the training input
``[x_t ; x_0]`` (both halves at positions ``0 .. T-1``) under the BD3 mask: noisy tokens see their own noisy
block and the clean blocks before it, clean tokens the clean blocks up to their own. Both masks run
through :mod:`vzoo.kernels.block_diffusion` (``bd3_attention``, ``block_causal_attention``): fused CPU flash pieces
with a backward in float32 on the CPU, exact block-sparse layouts elsewhere; no dense ``[T, T]`` mask is built.

Padded batches: padded keys are hidden; blocks count from the first column, so left-pad prompts to a multiple of
``block``. A 4-D mask passed to the model (``attention_mask=[B, 1, q, kv]``, additive or bool) is honoured as
given, by SDPA; that is also how a model without this method runs the masks (``bd3_forward(..., block=)`` passes
the BD3 mask as a float 4-D mask, the form eager attention needs).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vzoo.kernels.block_diffusion import additive_mask, bd3_attention, bd3_mask, block_causal_attention, block_causal_mask

from .diffusion_objectives import bd3_inputs
from .convert import check_layers
from .layers import select_layers
from .registry import LMMethod, register_lm_method

__all__ = ["BlockDiffusionConfig", "bd3_forward", "block_diffusion_attention"]

_BD3_TOKENS: contextvars.ContextVar[int | None] = contextvars.ContextVar("vzoo_bd3_tokens", default=None)


@dataclass(frozen=True)
class BlockDiffusionConfig:
    """Args:
        block: diffusion block size in tokens (32 in Fast-dLLM v2 and Efficient-DLM).
        layers: the layers that use it (``None``: all; a block-diffusion LM converts every layer).
    """

    block: int = 32
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"BlockDiffusionConfig.block={self.block!r} must be a positive int")
        check_layers("BlockDiffusionConfig", self.layers)

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        return select_layers("BlockDiffusionConfig.layers", self.layers, num_layers)


def block_diffusion_attention(config: BlockDiffusionConfig, query, key, value, attention_mask, scale, module=None,
                              **_) -> torch.Tensor:
    """``query [B, H, q, D]`` (the last ``q`` positions), ``key, value [B, Hkv, kv, D]`` -> ``[B, H, q, D]``
    under the block-causal mask, or the BD3 mask inside :func:`bd3_forward`, or a 4-D mask given by the caller."""
    groups = query.shape[1] // key.shape[1]
    if attention_mask is not None and attention_mask.dim() == 4:  # the caller's own mask, exactly as given
        return F.scaled_dot_product_attention(query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1),
                                              attn_mask=attention_mask, scale=scale)
    keys = attention_mask  # None, or the key validity [B, kv] of a padded batch
    q_len, kv_len = query.shape[2], key.shape[2]
    tokens = _BD3_TOKENS.get()
    if tokens is not None:
        if q_len != kv_len or q_len != 2 * tokens:
            raise ValueError(f"bd3_forward with {tokens} tokens needs the 2 x {tokens} inputs in one call, got {q_len} "
                             f"queries over {kv_len} keys (no KV cache in training)")
        return bd3_attention(query, key, value, config.block, scale=scale)
    if (kv_len - q_len) % config.block == 0:
        return block_causal_attention(query, key, value, config.block, scale=scale, key_mask=keys)
    mask = block_causal_mask(q_len, kv_len, config.block, query.device)  # a chunk starting inside a block
    if keys is not None:
        mask = mask & keys[:, None, None, :]
    return F.scaled_dot_product_attention(query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1),
                                          attn_mask=mask, scale=scale)


def bd3_forward(model, noisy: torch.Tensor, clean: torch.Tensor, **kwargs):
    """Run ``model`` on ``[noisy ; clean]`` (``[N, T]`` each, ``T`` a multiple of the block) under the BD3 mask with
    both halves at positions ``0 .. T-1``; returns the model output for the ``2T`` tokens (the loss reads the noisy
    half, ``logits[:, :T]``). With :class:`BlockDiffusionConfig` applied the mask runs on vzoo's kernels;
    otherwise pass ``block=`` and it goes in as a 4-D float mask (eager or SDPA attention)."""
    ids, positions = bd3_inputs(noisy, clean)
    t = noisy.shape[1]
    block = kwargs.pop("block", None)
    config = getattr(model.config, "_attn_implementation", None) == "vzoo_block_diffusion"
    if not config:
        if block is None:
            raise ValueError("bd3_forward: the model does not use BlockDiffusionConfig; pass block= to use a 4-D mask")
        mask = additive_mask(bd3_mask(t, block, ids.device), model.dtype)
        return model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False, **kwargs)
    token = _BD3_TOKENS.set(t)
    try:
        return model(input_ids=ids, position_ids=positions, use_cache=False, **kwargs)
    finally:
        _BD3_TOKENS.reset(token)


register_lm_method(LMMethod(
    config=BlockDiffusionConfig, attn_implementation="vzoo_block_diffusion", label="Block diffusion",
    attention=block_diffusion_attention,
    paper="Fast-dLLM v2: Efficient Block-Diffusion LLM (2025)", arxiv="2509.26328",
    ops=("flash_pieces_attention", "block_sparse_attention"),
    status="block-causal inference mask and BD3 [x_t ; x_0] training mask, exact (fused flash pieces on CPU fp32, "
           "block-sparse layouts elsewhere); caller 4-D masks honoured by SDPA",
    mask="keys",
    window_error=lambda config, window: "its blocks see the whole causal prefix",
    bench=lambda tokens: {"block diffusion (block 32)": BlockDiffusionConfig()},
    contract=lambda: {"block diffusion (block 1 = causal)": BlockDiffusionConfig(block=1)},
))
