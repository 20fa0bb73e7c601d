"""SeerAttention: a learned gate picks the key blocks each query block attends to (arXiv 2410.13276;
microsoft/SeerAttention, prefill-sparse variant).

Each patched attention layer gets an :class:`AttnGate` (``self_attn.attn_gate``, the official module
name). The gate pools the layer's pre-RoPE queries (average) and keys (max, min, average concatenated)
over blocks of ``block_size`` tokens, projects them per head, applies RoPE at the blocks' first
positions and scores query blocks against block-causal key blocks.

- Training (``model.train()``): attention stays dense (SDPA, exact) and each gate stores its
  self-distillation loss: KL divergence between ``log_softmax`` of its scores and the block max-pooled
  attention map of the frozen model (rows renormalised), skipping the first quarter of query blocks.
- Inference: gate probabilities above ``threshold`` (or the ``topk`` best per row), plus each query
  block's own diagonal block, select the blocks of :func:`vzoo.kernels.block_sparse_attention`
  (dense attention instead when the selection is above the device's break-even density,
  ``dense_fallback``). Decoding steps and chunked prefill stay dense, as in the prefill-sparse reference.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vzoo.kernels import attention_block_max

from .layers import Attachment, attend_blocks, dense_attention, key_validity, select_layers
from .registry import LMMethod, register_lm_method

__all__ = [
    "AttnGate", "SeerAttentionConfig", "attach_gate", "block_recall", "gate_parameters", "load_gates", "save_gates",
    "seer_attention", "seer_distill_loss",
]

POOLS = ("avg", "max", "min")


@dataclass(frozen=True)
class SeerAttentionConfig:
    """SeerAttention settings (official defaults: blocks of 64, Q avg, K max+min+avg, hidden 128).

    Args:
        block_size: gate and kernel block size in tokens.
        q_pooling, k_pooling: pooling functions from ``("avg", "max", "min")``.
        hidden: gate projection width (``None``: the head dim).
        threshold: keep blocks whose gate probability exceeds it (official default 2e-3).
        topk: keep the ``topk`` best blocks per row instead (overrides ``threshold``).
        last_block_dense: the last two query blocks attend to every key block (as the official).
        force_double: project queries too, even when one Q pooling and ``hidden == head_dim``.
        layers: layer indices with gates (``None``: all); the others keep SDPA.
        dense_fallback: a prompt whose selection is denser than the break-even density of this
            device (:func:`vzoo.kernels.dense_is_faster`, op ``"seerattention"``) runs dense attention
            instead (the model the gates approximate): never slower than dense. ``False``: always the
            selection, as the official code.
    """

    block_size: int = 64
    q_pooling: tuple[str, ...] = ("avg",)
    k_pooling: tuple[str, ...] = ("max", "min", "avg")
    hidden: int | None = None
    threshold: float = 2e-3
    topk: int | None = None
    last_block_dense: bool = False
    force_double: bool = False
    layers: tuple[int, ...] | None = None
    dense_fallback: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"SeerAttentionConfig.block_size={self.block_size!r} must be a positive int")
        for name in ("q_pooling", "k_pooling"):
            value = getattr(self, name)
            if not value or any(p not in POOLS for p in value) or len(set(value)) != len(value):
                raise ValueError(f"SeerAttentionConfig.{name}={value!r} must be distinct names from {POOLS}")
        if self.hidden is not None and (not isinstance(self.hidden, int) or self.hidden < 2 or self.hidden % 2):
            raise ValueError(f"SeerAttentionConfig.hidden={self.hidden!r} must be None or an even int >= 2 (RoPE)")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"SeerAttentionConfig.threshold={self.threshold!r} must lie in [0, 1)")
        if self.topk is not None and (not isinstance(self.topk, int) or self.topk < 1):
            raise ValueError(f"SeerAttentionConfig.topk={self.topk!r} must be None or a positive int")
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ValueError(f"SeerAttentionConfig.layers={self.layers!r} must be None or non-negative layer indices")
        if not isinstance(self.dense_fallback, bool):
            raise ValueError(f"SeerAttentionConfig.dense_fallback={self.dense_fallback!r} must be a bool")

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        """The layers that get gates."""
        return select_layers("SeerAttentionConfig.layers", self.layers, num_layers)


class MultiHeadLinear(nn.Module):
    """Per-head linear map without bias: ``x [B, H, N, in] -> [B, H, N, out]`` with ``weight [H, in, out]``."""

    def __init__(self, heads: int, in_features: int, out_features: int, std: float = 0.02) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(heads, in_features, out_features) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype)


def _pool(x: torch.Tensor, block: int, how: str) -> torch.Tensor:
    """``x [B, H, S, D]`` -> ``[B, H, ceil(S / block), D]`` over blocks of tokens (a short last block
    pools only its own tokens)."""
    b, h, s, d = x.shape
    n = -(-s // block)
    pad = n * block - s
    fill = {"avg": 0.0, "max": float("-inf"), "min": float("inf")}[how]
    xb = F.pad(x, (0, 0, 0, pad), value=fill).view(b, h, n, block, d)
    if how == "max":
        return xb.amax(3)
    if how == "min":
        return xb.amin(3)
    count = torch.full((n,), float(block), device=x.device, dtype=x.dtype)
    count[-1] = block - pad
    return xb.sum(3) / count[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half convention) on ``x [B, H, N, E]`` with ``cos, sin [B, N, E]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


class AttnGate(nn.Module):
    """SeerAttention's gate for one attention layer.

    ``forward(q, k, position_ids)`` takes pre-RoPE ``q [B, Hq, S, D]``, ``k [B, Hkv, S, D]`` and
    ``position_ids [B, S]`` and returns block-causal logits ``[B, Hq, NB, NB]`` (``finfo.min`` above
    the block diagonal)."""

    def __init__(
        self, config: SeerAttentionConfig, heads: int, kv_heads: int, head_dim: int, rotary: nn.Module,
        layer_type: str | None = None,
    ) -> None:
        super().__init__()
        self.block, self.q_pooling, self.k_pooling = config.block_size, config.q_pooling, config.k_pooling
        self.heads, self.kv_heads = heads, kv_heads
        hidden = config.hidden or head_dim
        self.hidden = hidden
        if len(config.q_pooling) > 1 or hidden != head_dim or config.force_double:
            self.mask_linear_q = MultiHeadLinear(heads, head_dim * len(config.q_pooling), hidden)
            self.mask_linear_k = MultiHeadLinear(kv_heads, head_dim * len(config.k_pooling), hidden)
        else:  # one pooled query per head already has the right width: project only the keys (per query head)
            self.mask_linear_q = None
            self.mask_linear_k = MultiHeadLinear(heads, head_dim * len(config.k_pooling), hidden)
        self.rotary = rotary  # RoPE of width ``hidden`` (no parameters)
        # models with per-layer-type RoPE (Gemma 3: local / global bases) take the layer's type
        self.rope_kwargs = {"layer_type": layer_type} if "layer_type" in inspect.signature(rotary.forward).parameters else {}
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # pre-RoPE q, k of the current call
        self.loss: torch.Tensor | None = None  # last distillation loss (training)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # last (logits, target), detached

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        group = self.heads // self.kv_heads
        qp = torch.cat([_pool(q, self.block, p) for p in self.q_pooling], -1)
        kp = torch.cat([_pool(k, self.block, p) for p in self.k_pooling], -1)
        if self.mask_linear_q is not None:
            qp = self.mask_linear_q(qp)
            kp = self.mask_linear_k(kp).repeat_interleave(group, 1)
        else:
            kp = self.mask_linear_k(kp.repeat_interleave(group, 1))
        cos, sin = self.rotary(qp, position_ids[:, :: self.block], **self.rope_kwargs)
        qp, kp = _rotate(qp, cos.to(qp.dtype), sin.to(qp.dtype)), _rotate(kp, cos.to(kp.dtype), sin.to(kp.dtype))
        logits = (qp @ kp.transpose(-1, -2)) / math.sqrt(self.hidden)
        n = logits.shape[-1]
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        return logits.masked_fill(future, torch.finfo(logits.dtype).min)


def _block_rotary(model: nn.Module, hidden: int) -> nn.Module:
    """The model's own rotary embedding class, rebuilt for width ``hidden`` (the official
    ``block_rotary_emb``)."""
    base = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    if base is None:
        raise ValueError(f"{type(model).__name__}: no rotary embedding module found (SeerAttention needs RoPE)")
    cfg = copy.deepcopy(model.config.get_text_config())
    cfg.head_dim = hidden
    cfg.hidden_size = hidden * cfg.num_attention_heads
    return type(base)(config=cfg).to(next(model.parameters()).device)


def attach_gate(model: nn.Module, module: nn.Module, config: SeerAttentionConfig) -> Attachment:
    """Give ``module`` its ``attn_gate`` and hooks that hand it the pre-RoPE projections (after the
    per-head ``q_norm`` / ``k_norm`` of models that have them, Qwen3 and Gemma 3, as the official
    Qwen3 SeerAttention feeds its gate)."""
    ref = module.q_proj.weight
    cfg = module.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    rotary = _block_rotary(model, config.hidden or module.head_dim)
    gate = AttnGate(config, heads, kv_heads, module.head_dim, rotary, getattr(module, "layer_type", None))
    module.attn_gate = gate.to(ref.device, ref.dtype)
    shape = {}

    def grab(name: str, n_heads: int):
        norm = getattr(module, f"{name}_norm", None)  # RMSNorm over the head dim: the same in any layout

        def hook(mod, args, out):
            x = out.unflatten(-1, (n_heads, -1))
            shape[name] = (x if norm is None else norm(x)).transpose(1, 2)  # [B, H, S, D]
            if name == "k":
                gate.pending = (shape.pop("q"), shape.pop("k"))
        return hook

    hooks = [module.q_proj.register_forward_hook(grab("q", heads)), module.k_proj.register_forward_hook(grab("k", kv_heads))]
    return Attachment(module, ("attn_gate",), tuple(hooks))


def _topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool like ``scores [..., N]``: the ``min(k, N)`` largest entries of each row."""
    top = scores.topk(min(k, scores.shape[-1]), -1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)


def _selected_blocks(config: SeerAttentionConfig, logits: torch.Tensor) -> torch.Tensor:
    """bool ``[B, H, NB, NB]`` blocks to compute, from gate logits (block-causal), always with the
    diagonal.

    The official rule (``seer_attn/modules/common.py``, ``get_sparse_attn_mask_from_threshold`` /
    ``_from_nz_ratio``) keeps nothing else: past about ``1 / threshold`` blocks (500 at the default 2e-3)
    a near-uniform row has no probability above the threshold, and the official Triton kernel then
    divides by a zero softmax sum. vzoo always keeps each query block's own (diagonal) block, so
    every query sees at least itself; rows that selected anything keep the official selection plus
    that block. Under ``topk`` the diagonal is one of the ``topk`` blocks (the official top-k may
    leave it out). ``last_block_dense`` makes the last two query blocks dense, as the official does."""
    n = logits.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=logits.device).tril()
    diagonal = torch.eye(n, dtype=torch.bool, device=logits.device)
    if config.topk is not None:  # the diagonal counts as one of the topk, as MoBA's own block does
        chosen = _topk_mask(logits.masked_fill(diagonal, float("inf")), config.topk)
    else:
        chosen = torch.softmax(logits.float(), -1) > config.threshold
    if config.last_block_dense:
        chosen[..., -2:, :] = True
    return (chosen | diagonal) & causal


def seer_attention(
    config: SeerAttentionConfig, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scale: float, module=None, position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None, **_,
) -> torch.Tensor:
    """SeerAttention over ``query [B, H, q, D]`` (after RoPE), the last ``q`` of ``key, value
    [B, Hkv, kv, D]``; ``module`` carries the ``attn_gate`` (see :func:`attach_gate`). Returns
    ``[B, H, q, D]``. On a model's sliding-window layer each query also keeps only the last
    ``sliding_window`` keys (gate distillation there is refused: its target has no window)."""
    gate: AttnGate = module.attn_gate
    pending, gate.pending = gate.pending, None
    sq, skv = query.shape[2], key.shape[2]
    keys = None if attention_mask is None else key_validity(attention_mask, sliding_window is not None)[:, :skv]
    prefill = sq == skv and sq > 1 and pending is not None
    if module.training and prefill and sliding_window is not None:
        raise ValueError(
            f"SeerAttention gate distillation on sliding-window layers (sliding_window={sliding_window}, layer "
            f"{module.layer_idx}) is not supported; leave those layers out of SeerAttentionConfig.layers"
        )
    if module.training or not prefill:  # dense: distillation, decoding, chunked prefill
        out = dense_attention(query, key, value, attention_mask, scale, sliding_window)
        if module.training and prefill:
            gate.loss = _distill_loss(gate, pending, query, key, keys, position_ids, scale)
        return out
    with torch.no_grad():
        logits = gate(*pending, _positions(position_ids, sq, query.device))
        if keys is not None:  # as the official gate mask: key blocks made only of padding get no probability
            nb = logits.shape[-1]
            pad = F.pad(~keys, (0, nb * gate.block - skv), value=True).view(-1, nb, gate.block).all(-1)  # [B, NB]
            logits = logits.masked_fill(pad[:, None, None, :], torch.finfo(logits.dtype).min)
        chosen = _selected_blocks(config, logits)
    return attend_blocks(chosen, gate.block, gate.block, "seerattention", config.dense_fallback, query, key, value,
                         attention_mask, scale, module, keys, sliding_window)


def _positions(position_ids: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)[None] if position_ids is None else position_ids


def distill_target(
    query: torch.Tensor, key: torch.Tensor, block: int, scale: float, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """The gates' training target ``[B, H, NB, NB]``: the block max-pooled causal attention map of
    ``query [B, H, S, D]`` (after RoPE) over ``key [B, Hkv, S, D]`` (the unpadded ``keys [B, S]``), rows
    renormalised to sum to 1 (the official attention-pooling kernel's ``Po``)."""
    target = attention_block_max(query, key, block, scale=scale, key_mask=keys)
    return target / target.sum(-1, keepdim=True).clamp_min(1e-20)


def _distill_loss(gate: AttnGate, pending, query, key, keys, position_ids, scale) -> torch.Tensor:
    """KL(target || gate) on query blocks past the first quarter (the official ``nn.KLDivLoss()``, mean
    over elements); the target is the renormalised block max-pooled map of the dense attention."""
    q_pre, k_pre = (t.detach() for t in pending)
    logits = gate(q_pre, k_pre, _positions(position_ids, query.shape[2], query.device))
    target = distill_target(query.detach(), key.detach(), gate.block, scale, keys)
    gate.last = (logits.detach(), target)
    start = logits.shape[2] // 4
    logp, target = F.log_softmax(logits[:, :, start:].float(), -1), target[:, :, start:]
    return (torch.xlogy(target, target) - target * logp).mean()


def gate_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The gates' parameters by their state-dict names (``model.layers.{i}.self_attn.attn_gate...``)."""
    return {name: p for name, p in model.named_parameters() if ".attn_gate." in name}


def seer_distill_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the distillation losses the gates stored in the last training forward pass."""
    losses = [m.loss for m in model.modules() if isinstance(m, AttnGate) and m.loss is not None]
    if not losses:
        raise RuntimeError("no gate losses: run a training-mode forward pass with SeerAttention applied first")
    total = torch.stack(losses).sum()
    for m in model.modules():
        if isinstance(m, AttnGate):
            m.loss = None
    return total


def block_recall(model: nn.Module, input_ids: torch.Tensor, topk: int) -> float:
    """Share of the dense model's block max-pooled attention mass (rows renormalised) that the gates'
    ``topk`` best blocks per row capture, averaged over gated layers, heads and query blocks past the
    first quarter. Runs one dense (training-mode) forward pass without gradients."""
    was = model.training
    model.train()
    try:
        with torch.no_grad():
            model(input_ids, logits_to_keep=1)
    finally:
        model.train(was)
    recalls = []
    for gate in (m for m in model.modules() if isinstance(m, AttnGate)):
        logits, target = gate.last
        start = logits.shape[2] // 4
        recalls.append((target * _topk_mask(logits, topk)).sum(-1)[:, :, start:].mean())
        gate.loss = None
    return float(torch.stack(recalls).mean())


def save_gates(model: nn.Module, path: str | Path) -> Path:
    """Write the gate weights (official key names) as safetensors, atomically."""
    from safetensors.torch import save_file

    from vzoo.atomic import write_atomic

    params = {k: v.detach().cpu().contiguous() for k, v in gate_parameters(model).items()}
    if not params:
        raise ValueError("the model has no SeerAttention gates; apply_sparse_attention(model, SeerAttentionConfig()) first")
    write_atomic(Path(path), lambda tmp: save_file(params, str(tmp)))
    return Path(path)


def load_gates(model: nn.Module, path: str | Path) -> None:
    """Load gate weights saved by :func:`save_gates` or an official ``*AttnGates`` safetensors file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no gate file at {path}")
    params = gate_parameters(model)
    state = load_file(str(path))
    missing = sorted(set(params) - set(state))
    if missing:
        raise ValueError(f"{path}: no weights for {len(missing)} gate parameters, e.g. {missing[0]}")
    for name, p in params.items():
        if state[name].shape != p.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(state[name].shape)}, the model's gate {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(state[name])


register_lm_method(LMMethod(
    config=SeerAttentionConfig, attn_implementation="vzoo_seer", label="SeerAttention", attention=seer_attention,
    paper="SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs (2024)", arxiv="2410.13276",
    ops=("block_sparse_attention", "attention_block_max"),
    status="gates + self-distillation + threshold/top-k inference (golden outputs of the official gate)",
    attach=attach_gate,
    bench=lambda tokens: {"seerattention (top-32 of 64-token blocks)": SeerAttentionConfig(block_size=64, topk=32)},
    contract=lambda: {"seer": SeerAttentionConfig(block_size=8, threshold=0.0, dense_fallback=False)},
))
