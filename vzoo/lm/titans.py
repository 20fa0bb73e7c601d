"""Titans blocks for transformers causal LMs (Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test
Time", arXiv 2501.00663): a neural long-term memory (:class:`NeuralMemory`) next to the model's own attention,
in the paper's three arrangements, each a drop-in for a decoder layer's ``self_attn`` (``vzoo.lm.convert``).

- MAC (memory as context): the sequence is cut into segments; a segment's tokens attend (causally, with the
  model's q/k/v/o and RoPE) over the persistent tokens, the memory's answers ``h_j = M_s(q_j)`` to the segment's
  tokens (``M_s``: the memory at the segment's start; ``h_j`` sits at ``x_j``'s position and is seen by the
  tokens ``>= j``) and the segment's tokens; the attention output ``y`` is written to the memory and leaves
  as ``y * sigmoid(M(y))`` (lucidrains/titans-pytorch ``MemoryAsContextTransformer``'s output gate).
- MAG (memory as gate): sliding-window attention with persistent tokens, ``y``, in parallel with the memory
  read / write of ``x``; out ``y * sigmoid(M(x))``.
- MAL (memory as layer): ``z = x + M(x)`` (the memory as a residual layer), then sliding-window attention
  with persistent tokens over ``z``.

The persistent tokens are learned key / value vectors per key-value head, without RoPE, prepended as the
attention sinks of :func:`vzoo.kernels.sink_window_attention` (the paper prepends learned input tokens; the
keys and values are what those tokens reduce to in one layer). The memory reads ``M`` as it was when the
token's memory mini-batch began (see :mod:`vzoo.kernels.titans`), so every block is causal and a cached
``generate()`` equals recomputation: the cache keeps the memory (read weights, running weights, momentum),
the sliding window's keys / values (MAG, MAL) or the current segment's keys / values and ``M_s`` (MAC).
Padded batches are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vzoo.kernels import sink_window_attention
from vzoo.kernels.titans import MemoryState, memory_mlp, neural_memory

from .convert import LMLayer, ModelDims, check_layers, copy_projections, layer_state, register_lm_layer, token_validity

__all__ = ["MACBlock", "MAGBlock", "MALBlock", "NeuralMemory", "TitansConfig", "titans_layer"]

_VARIANTS = ("mac", "mag", "mal")


@dataclass(frozen=True)
class TitansConfig:
    """Which layers become Titans blocks, and how.

    Attributes:
        layers: decoder layers to convert (``None``: all).
        variant: ``"mac"``, ``"mag"`` or ``"mal"``.
        window: sliding-window length of MAG / MAL attention (the query included).
        segment: MAC segment length.
        persistent_tokens: learned key / value vectors every query sees.
        memory_depth: layers of the memory MLP (1: linear memory).
        memory_expansion: hidden width of the memory MLP, in multiples of the head dim.
        batch_size: memory mini-batch (gradients inside one are taken at its start); MAC: divides ``segment``.
        max_lr: ``theta = max_lr * sigmoid(.)``.
        activation: ``"gelu"`` or ``"silu"`` inside the memory MLP.
        memory_residual: memory ``M(k) = k + MLP(k)``.
        max_grad_norm: soft-clamp every per-token gradient of every memory weight matrix to a Frobenius norm
            below this before it is written (``g * c tanh(||g|| / c) / ||g||``, lucidrains' ``max_grad_norm``);
            ``None``: the paper's unclamped rule. The paper has no clamp; the default is on because without it
            the MLP memory diverges in training (its gradient grows like the cube of its weights, and a
            mini-batch of gradients taken at one point, amplified by momentum, can push the weights past the
            point of no return: from norm ~1 to 1e2, 1e6, 1e19, inf over four 16-token mini-batches on MQAR).
            With the clamp a token moves each weight matrix by less than ``theta * max_grad_norm``.
    """

    layers: tuple[int, ...] | None = None
    variant: str = "mag"
    window: int = 64
    segment: int = 64
    persistent_tokens: int = 4
    memory_depth: int = 2
    memory_expansion: int = 2
    batch_size: int = 16
    max_lr: float = 0.1
    activation: str = "gelu"
    memory_residual: bool = False
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        check_layers("TitansConfig", self.layers)
        if self.variant not in _VARIANTS:
            raise ValueError(f"variant={self.variant!r} must be one of {', '.join(_VARIANTS)}")
        for name, low in (("window", 1), ("segment", 1), ("persistent_tokens", 0), ("memory_depth", 1),
                          ("memory_expansion", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an int >= {low}")
        if isinstance(self.max_lr, bool) or not isinstance(self.max_lr, (int, float)) or not 0 < self.max_lr < math.inf:
            raise ValueError(f"max_lr={self.max_lr!r} must be a finite number > 0")
        if self.max_grad_norm is not None and (isinstance(self.max_grad_norm, bool)
                                               or not isinstance(self.max_grad_norm, (int, float))
                                               or not 0 < self.max_grad_norm < math.inf):
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r} must be None or a finite number > 0")
        if self.activation not in ("gelu", "silu"):
            raise ValueError(f"activation={self.activation!r} must be 'gelu' or 'silu'")
        if not isinstance(self.memory_residual, bool):
            raise ValueError(f"memory_residual={self.memory_residual!r} must be a bool")
        if self.variant == "mac" and self.segment % self.batch_size:
            raise ValueError(f"batch_size={self.batch_size} must divide segment={self.segment} for variant 'mac'")


class NeuralMemory(nn.Module):
    """The neural long-term memory of a layer: ``heads`` memories of width ``head_dim``.

    ``q, k = l2norm(silu(x W_Q)), l2norm(silu(x W_K))``, ``v = silu(x W_V)`` (the paper's §4.4), per-token
    gates ``theta = max_lr * sigmoid(.)``, ``eta = sigmoid(.)``, ``alpha = sigmoid(.)`` per head, the MLP's
    initial weights as parameters ``[heads, out, in]``; output ``[B, T, hidden]`` through ``W_O``. Per-token
    memory gradients are soft-clamped to ``max_grad_norm`` (``None``: not).
    """

    def __init__(self, hidden: int, heads: int, head_dim: int, depth: int = 2, expansion: int = 2, batch_size: int = 16,
                 max_lr: float = 0.1, activation: str = "gelu", residual: bool = False,
                 max_grad_norm: float | None = None) -> None:
        super().__init__()
        self.heads, self.head_dim, self.batch_size, self.max_grad_norm = heads, head_dim, batch_size, max_grad_norm
        self.max_lr, self.activation, self.residual = max_lr, activation, residual
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(hidden, inner, bias=False) for _ in range(3))
        self.to_lr, self.to_momentum, self.to_decay = (nn.Linear(hidden, heads) for _ in range(3))
        nn.init.constant_(self.to_decay.bias, -4.0)  # forget ~2% per token at the start, not half
        self.out = nn.Linear(inner, hidden, bias=False)
        dims = (head_dim, *[expansion * head_dim] * (depth - 1), head_dim)
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(heads, o, i) / math.sqrt(i)) for i, o in zip(dims[:-1], dims[1:]))

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # [B, T, H*D] -> [B*H, T, D]
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2).reshape(b * self.heads, n, self.head_dim)

    def _merge(self, t: torch.Tensor, batch: int) -> torch.Tensor:  # [B*H, T, D] -> [B, T, H*D]
        return t.view(batch, self.heads, -1, self.head_dim).transpose(1, 2).reshape(batch, -1, self.heads * self.head_dim)

    def _gate(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B*H, T]
        return torch.sigmoid(linear(x).float()).transpose(1, 2).reshape(-1, x.shape[1])

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.silu(self._split(self.to_q(x))).float(), dim=-1)

    def initial(self, batch: int) -> tuple[torch.Tensor, ...]:
        """The initial memory for ``batch`` sequences: ``[batch * heads, out, in]`` float32 per layer."""
        return tuple(w.float().unsqueeze(0).expand(batch, *w.shape).reshape(batch * w.shape[0], *w.shape[1:]) for w in self.weights)

    def read(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``M(q(x))`` with the given weights, no write: ``x [B, T, hidden]`` -> ``[B, T, hidden]``."""
        y = memory_mlp(weights, self._query(x), self.activation, self.residual)
        return self.out(self._merge(y, x.shape[0]).to(x.dtype))

    def forward(self, x: torch.Tensor, state: MemoryState | None) -> tuple[torch.Tensor, MemoryState]:
        """Read then write the tokens ``x [B, T, hidden]`` after ``state`` (``None``: the initial memory)."""
        k = F.normalize(F.silu(self._split(self.to_k(x))).float(), dim=-1)
        v = F.silu(self._split(self.to_v(x))).float()
        lr = self.max_lr * self._gate(self.to_lr, x)
        y, state = neural_memory(self._query(x), k, v, lr, self._gate(self.to_momentum, x), self._gate(self.to_decay, x),
                                 self.initial(x.shape[0]) if state is None else state, batch_size=self.batch_size,
                                 activation=self.activation, residual=self.residual,
                                 max_grad_norm=self.max_grad_norm, output_final_state=True)
        return self.out(self._merge(y, x.shape[0]).to(x.dtype)), state


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama RoPE: ``x [B, H, T, D]``, ``cos, sin [B, T, D]``."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + turned * sin[:, None]


class _TitansBlock(nn.Module):
    """What the three blocks share: the model's attention projections, persistent tokens, the memory and
    the memory's place in the layer's decoding state."""

    def __init__(self, config: TitansConfig, model_config, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        dims = ModelDims.of(model_config)
        self.heads, self.kv_heads, self.head_dim = dims.heads, dims.kv_heads, dims.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = dims.projections()
        n = config.persistent_tokens
        self.persistent_k = nn.Parameter(torch.randn(self.kv_heads, n, self.head_dim) / math.sqrt(self.head_dim))
        self.persistent_v = nn.Parameter(torch.randn(self.kv_heads, n, self.head_dim) / math.sqrt(self.head_dim))
        self.memory = NeuralMemory(dims.hidden, self.heads, self.head_dim, config.memory_depth, config.memory_expansion,
                                   config.batch_size, config.max_lr, config.activation, config.memory_residual,
                                   config.max_grad_norm)

    def init_from_attention(self, attn: nn.Module) -> None:
        """Copy the replaced attention's q / k / v / o projections (weights and biases) where the shapes match."""
        copy_projections(self, attn)

    def _project(self, x: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q [B, Hq, T, D]``, ``k, v [B, Hkv, T, D]`` with RoPE on ``q, k``."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        return q, k, v

    def _persistent(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (batch, *self.persistent_k.shape)
        return self.persistent_k.to(like.dtype).expand(shape), self.persistent_v.to(like.dtype).expand(shape)

    def _heads_out(self, y: torch.Tensor) -> torch.Tensor:  # [B, Hq, T, D] -> o_proj
        return self.o_proj(y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1))

    def _window_attention(self, x: torch.Tensor, position_embeddings, state) -> torch.Tensor:
        """Sliding-window attention with the persistent tokens as sinks; keeps the window's keys / values in ``state``."""
        q, k, v = self._project(x, position_embeddings)
        if state is not None and "window_k" in state:
            k, v = torch.cat([state["window_k"], k], 2), torch.cat([state["window_v"], v], 2)
        pk, pv = self._persistent(x.shape[0], k)
        y = sink_window_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), self.config.window,
                                  self.config.persistent_tokens)
        if state is not None:
            keep = max(0, k.shape[2] - (self.config.window - 1))
            state["window_k"], state["window_v"] = k[:, :, keep:], v[:, :, keep:]
        return self._heads_out(y)

    def _load_memory(self, state) -> MemoryState | None:
        if state is None or "memory_read0" not in state:
            return None
        depth = len(self.memory.weights)
        parts = [tuple(state[f"memory_{name}{i}"].flatten(0, 1) for i in range(depth)) for name in ("read", "weights", "momentum")]
        return MemoryState(*parts, state.seen % self.config.batch_size)

    def _save_memory(self, state, memory: MemoryState, batch: int) -> None:
        if state is None:
            return
        for name, ws in (("read", memory.read), ("weights", memory.weights), ("momentum", memory.momentum)):
            for i, w in enumerate(ws):
                state[f"memory_{name}{i}"] = w.view(batch, -1, *w.shape[1:])

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.get("past_key_values")
        state = layer_state(cache, self.layer_idx, hidden_states.shape[1])
        if token_validity(attention_mask, hidden_states.shape[1]) is not None:
            raise ValueError("Titans does not support padded batches: the memory would write the padding tokens; "
                             "run one sequence per call or batch sequences of equal length")
        return self._block(hidden_states, position_embeddings, state), None


class MAGBlock(_TitansBlock):
    """Memory as a gate: ``o_proj(SWA(x)) * sigmoid(M(x))``."""

    def _block(self, x, position_embeddings, state):
        b = x.shape[0]
        mem, memory = self.memory(x, self._load_memory(state))
        self._save_memory(state, memory, b)
        return self._window_attention(x, position_embeddings, state) * torch.sigmoid(mem)


class MALBlock(_TitansBlock):
    """Memory as a layer: ``o_proj(SWA(x + M(x)))``."""

    def _block(self, x, position_embeddings, state):
        b = x.shape[0]
        mem, memory = self.memory(x, self._load_memory(state))
        self._save_memory(state, memory, b)
        return self._window_attention(x + mem, position_embeddings, state)


class MACBlock(_TitansBlock):
    """Memory as context: per segment, attention over [persistent ‖ M_s(q) ‖ segment], then ``y * sigmoid(M(y))``."""

    def _block(self, x, position_embeddings, state):
        b, n, _ = x.shape
        seg = self.config.segment
        seen = 0 if state is None else state.seen
        memory = self._load_memory(state)
        start = None if state is None or "segment_read0" not in state else tuple(
            state[f"segment_read{i}"].flatten(0, 1) for i in range(len(self.memory.weights)))
        kv = [state[name] for name in ("segment_kh", "segment_vh", "segment_kx", "segment_vx")] if start is not None else None
        outs, a = [], 0
        while a < n:
            offset = (seen + a) % seg
            e = min(a + seg - offset, n)
            if offset == 0:  # a new segment: its tokens read the memory as it is now (a mini-batch boundary)
                start = self.memory.initial(b) if memory is None else memory.read
                kv = None
            pe = None if position_embeddings is None else tuple(t[:, a:e] for t in position_embeddings)
            piece = x[:, a:e]
            q, kx, vx = self._project(piece, pe)
            _, kh, vh = self._project(self.memory.read(piece, start), pe)
            new = [kh, vh, kx, vx]
            kv = new if kv is None else [torch.cat([old, t], 2) for old, t in zip(kv, new)]
            pk, pv = self._persistent(b, kx)
            m = kv[0].shape[2]  # segment tokens so far
            q_pos = torch.arange(m - (e - a), m, device=x.device)[:, None]
            seg_pos = torch.arange(m, device=x.device)[None, :]
            visible = torch.cat([torch.ones(e - a, pk.shape[2], dtype=torch.bool, device=x.device),
                                 (seg_pos <= q_pos).repeat(1, 2)], 1)
            y = F.scaled_dot_product_attention(q, torch.cat([pk, kv[0], kv[2]], 2), torch.cat([pv, kv[1], kv[3]], 2),
                                               attn_mask=visible, enable_gqa=self.kv_heads != self.heads)
            y = self._heads_out(y)
            gate, memory = self.memory(y, memory)
            outs.append(y * torch.sigmoid(gate))
            a = e
        if state is not None:
            self._save_memory(state, memory, b)
            for i, w in enumerate(start):
                state[f"segment_read{i}"] = w.view(b, -1, *w.shape[1:])
            for name, t in zip(("segment_kh", "segment_vh", "segment_kx", "segment_vx"), kv):
                state[name] = t
        return torch.cat(outs, 1)


def titans_layer(config: TitansConfig, model_config, layer_idx: int) -> _TitansBlock:
    """The block of ``config.variant`` (the layer factory :func:`vzoo.lm.convert` calls)."""
    return {"mac": MACBlock, "mag": MAGBlock, "mal": MALBlock}[config.variant](config, model_config, layer_idx)


register_lm_layer(LMLayer(
    config=TitansConfig, name="titans", label="Titans (neural memory)", layer=titans_layer,
    paper="Titans: Learning to Memorize at Test Time", arxiv="2501.00663", ops=("neural_memory", "sink_window_attention"),
    status="MAC / MAG / MAL blocks; memory exact to the paper's update (tested against token loops); causal, cached "
           "generate == recomputation; no padded batches",
))
