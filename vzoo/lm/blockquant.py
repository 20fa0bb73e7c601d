"""BCT: blockwise post-training quantisation of a whole transformer (Dong & Chen, "Blockwise Compression
of Transformer-based Models without Retraining", arXiv 2304.01483; earlier "BBCT", arXiv 2303.09184).

No official code exists; the abstracts are the only primary source found (checked with a search in this
session). They state: every tensor is cut into small blocks, each quantised with its own scale
(instead of one per layer), applied to every component (embedding, matrix multiplications, GELU,
Softmax, layer normalisation and the intermediate results), with no retraining; up to 7.988x
compression and < 0.9 % accuracy loss on most GLUE tasks for an "efficient BERT". Bit widths, block
sizes and the scale rule are not given there; what this file assumes:

- **Symmetric signed codes** in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (``b`` bits, no zero point; the
  code ``-2^(b-1)`` is unused so the grid is symmetric), one scale per block of ``block`` consecutive
  elements along one axis (the last block may be shorter); ``block=None`` is per-tensor (one scale).
- **Scales** (``scale="absmax"``): the block's ``max |x| / qmax`` rounded *up* to bfloat16, so the
  scale is a real 16-bit number, nothing is clipped, every element's error is at most ``scale / 2``
  and ``code * scale`` (at most 15 + 8 significant bits) is exact in float32: dequantisation is
  integer-exact. ``scale="pow2"``: the smallest power of two ``>= max |x| / qmax`` (an 8-bit
  exponent; multiplying by it is a shift). Scales never go below ``2^-110`` (an all-zero block gets
  that scale and zero codes).
- **Where** (:func:`blockquant`): Linear (and Embedding) weights are quantised in blocks along their
  input dimension, Linear inputs along their last (feature) dimension; the two blocks then line up
  along the contraction, so a matmul is a sum over blocks of integer dot products times
  ``scale_w * scale_x``. Attention probabilities are quantised after the softmax in blocks along the
  keys (attention function :func:`blockquant_attention`, registered as ``vzoo_blockquant``); the
  outputs of RMSNorm / LayerNorm modules and of the MLP's activation module (SiLU, GELU) along their
  last dimension. Activations are fake-quantised (quantised, then dequantised in float32); weights
  are replaced by their dequantised values until ``remove()``.
- **Accounting** (:func:`compression_ratio`, :func:`model_compression`): the stored bits of the codes
  plus the scales (16 bits for ``absmax``, 8 for ``pow2``) against 32 bits a parameter; parameters
  not quantised (norm weights, biases) count 32 bits.

The attention part goes through the LM method registry (:func:`vzoo.lm.apply_sparse_attention`)
rather than a second hand-made transformers registration: the registry already handles GQA,
transformers' masks, sliding windows, refusing soft-capping, and restoring the model's attention.
Its contract configuration is ``BlockQuantAttentionConfig(bits=None)`` (probabilities left in float),
under which the function must equal the model's own attention on every model the registry tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import transformers.activations

from .apply import apply_sparse_attention
from .layers import masked_softmax, select_layers, visible_mask
from .registry import LMMethod, register_lm_method

__all__ = [
    "BlockQuantAttentionConfig", "BlockQuantConfig", "BlockQuantHandle", "QuantizedTensor", "SCALE_BITS",
    "blockquant", "blockquant_attention", "compression_ratio", "dequantize", "fake_quantize", "model_compression",
    "quantize_blockwise",
]

SCALES = ("absmax", "pow2")
SCALE_BITS = {"absmax": 16, "pow2": 8}  # stored bits per scale: bfloat16 / an 8-bit exponent
MIN_SCALE = 2.0 ** -110
_ACTIVATIONS = (nn.SiLU, nn.GELU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.Softplus, nn.LeakyReLU, nn.ELU, nn.Hardswish)


@dataclass(frozen=True)
class QuantizedTensor:
    """A blockwise-quantised tensor.

    Attributes:
        codes: integer codes, the input's shape (``int8`` for ``bits <= 8``, else ``int16``).
        scales: ``bfloat16``, the input's shape with the size along ``axis`` replaced by the number
            of blocks ``ceil(n / block)``; per-tensor (``block=None``): shape ``()``.
        bits, block, axis (non-negative), scale (``"absmax"`` / ``"pow2"``), dtype (the input's).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    block: int | None
    axis: int
    scale: str
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def stored_bits(self) -> int:
        """Bits of the codes plus the scales (:data:`SCALE_BITS` each)."""
        return self.codes.numel() * self.bits + self.scales.numel() * SCALE_BITS[self.scale]


def _check(bits: object, block: object, scale: object, owner: str = "") -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError(f"{owner}bits={bits!r} must be an int in [2, 16] (symmetric signed codes)")
    if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block < 1):
        raise ValueError(f"{owner}block={block!r} must be None (per-tensor) or an int >= 1")
    if scale not in SCALES:
        raise ValueError(f"{owner}scale={scale!r} must be one of {SCALES}")


def _round_scales(ratio: torch.Tensor, scale: str) -> torch.Tensor:
    """float32 ``max |x| / qmax`` -> the stored scales (bfloat16, never below it, at least ``MIN_SCALE``)."""
    ratio = ratio.clamp_min(MIN_SCALE)
    if scale == "pow2":
        mantissa, exponent = torch.frexp(ratio)  # ratio = m * 2^e, m in [0.5, 1)
        return torch.ldexp(torch.ones_like(ratio), exponent - (mantissa == 0.5).int()).to(torch.bfloat16)
    raw = ratio.view(torch.int32)  # positive floats order like their bit patterns: round the low 16 bits up
    return ((raw + 0xFFFF) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


def _quantize(x: torch.Tensor, bits: int, block: int | None, axis: int, scale: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Checked arguments -> float codes and bfloat16 scales in the block layout: ``x`` moved so ``axis``
    is last, zero-padded to whole blocks and viewed ``[..., n_blocks, block]``, scales ``[..., n_blocks]``
    (per-tensor: ``x`` itself and a scalar), and the non-negative ``axis``."""
    _check(bits, block, scale)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"x must have at least one dimension and one element, got shape {tuple(x.shape)}")
    if not isinstance(axis, int) or isinstance(axis, bool) or not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis={axis!r} is out of range for x of shape {tuple(x.shape)}")
    qmax = 2 ** (bits - 1) - 1
    work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if block is not None:
        work = work.movedim(axis, -1)
        n = work.shape[-1]
        nb = -(-n // block)
        if nb * block != n:  # zeros leave each block's max |x| alone
            work = torch.nn.functional.pad(work, (0, nb * block - n))
        work = work.reshape(*work.shape[:-1], nb, block)
    ratio = (work.abs().amax() if block is None else work.abs().amax(-1)).float() / qmax
    if not bool(torch.isfinite(ratio).all()):  # amax propagates NaN and Inf
        raise ValueError("x has NaN or Inf values (or float64 values beyond float32's range); scales need finite data")
    scales = _round_scales(ratio, scale)
    divisor = scales.to(work.dtype) if block is None else scales.to(work.dtype)[..., None]
    return torch.round(work / divisor).clamp_(-qmax, qmax), scales, axis % x.dim()


def _unblock(t: torch.Tensor, like: torch.Tensor, block: int | None, axis: int) -> torch.Tensor:
    """Inverse of the block layout of :func:`_quantize` for a tensor shaped like ``like``."""
    if block is None:
        return t
    return t.reshape(*t.shape[:-2], -1)[..., : like.shape[axis]].movedim(-1, axis)


def quantize_blockwise(x: torch.Tensor, bits: int, block: int | None, axis: int = -1, scale: str = "absmax") -> QuantizedTensor:
    """Symmetric signed ``bits``-bit quantisation of ``x`` (floating, finite) with one scale per block of
    ``block`` consecutive elements along ``axis`` (the last block of a size not divisible by ``block``
    is shorter; ``block=None``: one scale for the whole tensor). ``codes = round(x / scale)``, with the
    scale rule of ``scale`` (module docstring): ``|x - codes * scale| <= scale / 2`` element-wise, up to
    the rounding of the float32 quotient."""
    codes, scales, axis = _quantize(x, bits, block, axis, scale)
    codes = _unblock(codes, x, block, axis).to(torch.int8 if bits <= 8 else torch.int16)
    return QuantizedTensor(codes, scales if block is None else scales.movedim(-1, axis), bits, block, axis, scale, x.dtype)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """``codes * scales`` (each scale repeated over its block) in float32, exact: a code has at most 15
    significant bits and a bfloat16 scale 8, so the float32 product is never rounded."""
    scales = qt.scales.float()
    if qt.block is not None:
        scales = scales.repeat_interleave(qt.block, dim=qt.axis).narrow(qt.axis, 0, qt.codes.shape[qt.axis])
    return qt.codes.float() * scales


def fake_quantize(x: torch.Tensor, bits: int, block: int | None, axis: int = -1, scale: str = "absmax") -> torch.Tensor:
    """:func:`dequantize` of :func:`quantize_blockwise`, cast back to ``x``'s dtype (no gradient:
    post-training); computed in the block layout, without the integer tensor."""
    codes, scales, axis = _quantize(x, bits, block, axis, scale)
    values = codes.float() * (scales.float() if block is None else scales.float()[..., None])
    return _unblock(values, x, block, axis).to(x.dtype)


def compression_ratio(bits: int, block: int | None, scale_bits: int = 16, numel: int | None = None) -> float:
    """fp32 bits over stored bits per element: ``32 / (bits + scale_bits / block)``; per-tensor
    (``block=None``) the one scale is amortised over the tensor's ``numel`` elements (required then)."""
    _check(bits, block, "absmax")
    if not isinstance(scale_bits, int) or isinstance(scale_bits, bool) or scale_bits < 0:
        raise ValueError(f"scale_bits={scale_bits!r} must be an int >= 0")
    if block is None:
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 1:
            raise ValueError(f"numel={numel!r} must be an int >= 1 for a per-tensor ratio (block=None)")
        return 32 / (bits + scale_bits / numel)
    return 32 / (bits + scale_bits / block)


# ------------------------------------------------------------------------------------ attention


@dataclass(frozen=True)
class BlockQuantAttentionConfig:
    """Attention with its probabilities quantised after the softmax, in blocks of ``block`` keys per
    query row (:func:`blockquant_attention`).

    Args:
        bits: code bits in [2, 16]; ``None``: the probabilities stay float (the model's attention, the
            registry's contract configuration).
        block: keys per block (``None``: one scale per query row).
        scale: ``"absmax"`` or ``"pow2"`` (module docstring).
        layers: layer indices it applies to (``None``: all); the others keep SDPA.
    """

    bits: int | None = 8
    block: int | None = 64
    scale: str = "absmax"
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check(8 if self.bits is None else self.bits, self.block, self.scale, "BlockQuantAttentionConfig.")
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ValueError(f"BlockQuantAttentionConfig.layers={self.layers!r} must be None or non-negative layer indices")

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        return select_layers("BlockQuantAttentionConfig.layers", self.layers, num_layers)


def blockquant_attention(
    config: BlockQuantAttentionConfig, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scale: float, module=None, sliding_window: int | None = None, **_,
) -> torch.Tensor:
    """Softmax attention of ``query [B, H, q, D]`` (the last ``q`` positions) over ``key, value [B, Hkv,
    kv, D]`` with the probabilities quantised blockwise along the keys; ``attention_mask`` is
    transformers' (bool or additive ``[B, 1, q, kv]``; ``None``: causal, within ``sliding_window``).
    Math in float32 (float64 stays), over chunks of queries so at most ~2^24 probabilities exist at once.
    Returns ``[B, H, q, D]`` in ``query``'s dtype; a row that sees no key gives zeros."""
    b, h, sq, _ = query.shape
    skv, groups = key.shape[2], h // key.shape[1]
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    k = key.to(dtype).repeat_interleave(groups, 1)
    v = value.to(dtype).repeat_interleave(groups, 1)
    visible = visible_mask(attention_mask, sq, skv, sliding_window, query.device)
    rows = max(1, 2 ** 24 // max(1, b * h * skv))
    out = []
    for start in range(0, sq, rows):
        part = visible[..., start : start + rows, :]
        scores = (query[:, :, start : start + rows].to(dtype) @ k.transpose(-1, -2)) * scale
        probs = masked_softmax(scores, part)
        if config.bits is not None:  # per query row: block=None is one scale per row
            probs = fake_quantize(probs, config.bits, config.block or skv, -1, config.scale)
        out.append(probs @ v)
    return torch.cat(out, 2).to(query.dtype)


register_lm_method(LMMethod(
    config=BlockQuantAttentionConfig, attn_implementation="vzoo_blockquant", label="BCT attention",
    attention=blockquant_attention,
    paper="Blockwise Compression of Transformer-based Models without Retraining", arxiv="2304.01483", ops=(),
    status="post-softmax blockwise quantised probabilities; whole-model BCT through vzoo.lm.blockquant.blockquant",
    bench=lambda tokens: {"bct attention probabilities 8 bit block 64": BlockQuantAttentionConfig()},
    contract=lambda: {"blockquant-float-probabilities": BlockQuantAttentionConfig(bits=None)},
    bench_tokens=8192,
))


# ------------------------------------------------------------------------------------ whole model


@dataclass(frozen=True)
class BlockQuantConfig:
    """What :func:`blockquant` quantises, and how.

    Args:
        bits: code bits in [2, 16], for every part.
        block: elements per block (``None``: per-tensor, one scale per weight tensor and per activation
            call; attention probabilities: one per query row).
        scale: ``"absmax"`` or ``"pow2"``.
        weights: Linear and Embedding weights, blocks along the input dimension.
        activations: the inputs of every Linear, blocks along the feature dimension.
        attention: attention probabilities after the softmax, blocks along the keys.
        norms: outputs of RMSNorm / LayerNorm modules.
        act_fns: outputs of activation modules (the MLP's SiLU / GELU).
    """

    bits: int = 8
    block: int | None = 64
    scale: str = "absmax"
    weights: bool = True
    activations: bool = True
    attention: bool = False
    norms: bool = False
    act_fns: bool = False

    def __post_init__(self) -> None:
        _check(self.bits, self.block, self.scale, "BlockQuantConfig.")
        parts = ("weights", "activations", "attention", "norms", "act_fns")
        for name in parts:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BlockQuantConfig.{name}={getattr(self, name)!r} must be a bool")
        if not any(getattr(self, name) for name in parts):
            raise ValueError(f"BlockQuantConfig: no part to quantise; set one of {parts}")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, _ACTIVATIONS) or type(module).__module__ == transformers.activations.__name__


def _weight_tensors(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the Linear and Embedding modules, each shared (tied) tensor once."""
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append(m.weight)
    return out


class BlockQuantHandle:
    """What :func:`blockquant` changed; ``remove()`` (or leaving a ``with`` block) puts back the original
    weight tensors (the same storage, bit for bit), removes the hooks and restores the attention."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.saved, self.hooks, self.attention = model, [], [], None

    def remove(self) -> None:
        if self.model is None:
            return
        for hook in self.hooks:
            hook.remove()
        if self.attention is not None:
            self.attention.remove()
        for param, original in self.saved:
            param.data = original
        del self.model.vzoo_blockquant
        self.model = None

    def __enter__(self) -> BlockQuantHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def blockquant(model: nn.Module, config: BlockQuantConfig) -> BlockQuantHandle:
    """Apply BCT to a transformers model (module docstring): fake-quantise the weights in place and add
    forward hooks for the chosen activations; the attention part switches the model to
    :func:`blockquant_attention` through :func:`~vzoo.lm.apply_sparse_attention`. Returns the handle
    that undoes it all. ``ValueError`` when a chosen part finds nothing to quantise in ``model``."""
    if not isinstance(config, BlockQuantConfig):
        raise ValueError(f"config must be a BlockQuantConfig, got {type(config).__name__}")
    if hasattr(model, "vzoo_blockquant"):
        raise RuntimeError("the model already has BCT applied; remove() it first")
    q = dict(bits=config.bits, block=config.block, scale=config.scale)
    found = {
        "norms": [m for m in model.modules() if _is_norm(m)] if config.norms else [],
        "act_fns": [m for m in model.modules() if _is_activation(m)] if config.act_fns else [],
        "activations": [m for m in model.modules() if isinstance(m, nn.Linear)] if config.activations else [],
    }
    for name, mods in found.items():
        if getattr(config, name) and not mods:
            raise ValueError(f"BlockQuantConfig.{name}=True but {type(model).__name__} has no such modules")
    weights = _weight_tensors(model) if config.weights else []
    if config.weights and not weights:
        raise ValueError(f"BlockQuantConfig.weights=True but {type(model).__name__} has no Linear or Embedding weights")

    def quantize_input(module, args, kwargs):
        if args:
            return (fake_quantize(args[0], **q), *args[1:]), kwargs
        return args, {**kwargs, "input": fake_quantize(kwargs["input"], **q)}

    def quantize_output(module, args, output):
        return fake_quantize(output, **q)

    handle = BlockQuantHandle(model)
    model.vzoo_blockquant = config
    try:  # a part that fails (e.g. a model the attention method refuses) leaves the model as it was
        if config.attention:
            handle.attention = apply_sparse_attention(model, BlockQuantAttentionConfig(config.bits, config.block, config.scale))
        handle.hooks += [m.register_forward_pre_hook(quantize_input, with_kwargs=True) for m in found["activations"]]
        handle.hooks += [m.register_forward_hook(quantize_output) for m in found["norms"] + found["act_fns"]]
        with torch.no_grad():
            for param in weights:
                handle.saved.append((param, param.data))
                param.data = fake_quantize(param.data, axis=-1, **q)
    except Exception:
        handle.remove()
        raise
    return handle


def model_compression(model: nn.Module, config: BlockQuantConfig) -> dict:
    """Storage of ``model``'s parameters under ``config`` against fp32. Quantised (``config.weights``):
    the Linear and Embedding weights (tied ones once), ``bits`` a code plus :data:`SCALE_BITS` per scale
    (blocks along the last dimension, the last one per row possibly short; per-tensor: one scale); every
    other parameter 32 bits. Activations are not stored and do not count. Returns ``params``,
    ``quantized_params``, ``scales``, ``fp32_bits``, ``stored_bits`` (codes + scales + the rest),
    ``ratio`` (fp32 / stored, whole model) and ``weights_ratio`` (the quantised tensors alone)."""
    if not isinstance(config, BlockQuantConfig):
        raise ValueError(f"config must be a BlockQuantConfig, got {type(config).__name__}")
    quantized = _weight_tensors(model) if config.weights else []
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    nq = sum(p.numel() for p in quantized)
    if config.block is None:
        scales = len(quantized)
    else:
        scales = sum(p.numel() // p.shape[-1] * math.ceil(p.shape[-1] / config.block) for p in quantized)
    quant_bits = nq * config.bits + scales * SCALE_BITS[config.scale]
    stored = quant_bits + 32 * (total - nq)
    return {
        "params": total, "quantized_params": nq, "scales": scales, "fp32_bits": 32 * total, "stored_bits": stored,
        "ratio": 32 * total / stored, "weights_ratio": 32 * nq / quant_bits if nq else 1.0,
    }
