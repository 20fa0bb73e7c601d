"""Routing Transformer attention as a module swap (Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based Sparse
Attention with Routing Transformers", TACL 2021, arXiv 2003.05997; reference ``lucidrains/routing-transformer``
``routing_transformer/routing_transformer.py``: ``SelfAttention``, ``KmeansAttention``, ``Kmeans``).

``vzoo.lm.convert(model, RoutingConfig(layers=(1,)))`` replaces those decoder layers' ``self_attn`` by
:class:`RoutingAttention`: the model's q / k / v / o projections (copied from the replaced attention), RoPE from
``position_embeddings``; the first ``routing_heads`` query heads are routing heads
(:func:`vzoo.kernels.routing_attention`), the others local heads (causal sliding window of ``local_window``
tokens, :func:`vzoo.kernels.sink_window_attention`), as the paper mixes routing and local heads.

Routing rule (causal by completed segments; see :mod:`vzoo.kernels.routing` for why it differs from lucidrains's
whole-sequence top-``window``): keys join clusters per complete segment of ``segment`` tokens (each centroid takes
its ``window`` nearest keys of the segment), a query joins its ``query_clusters`` nearest centroids and attends, per
cluster, over a learned null key/value and the cluster's keys of the earlier segments; outputs averaged.
Routing uses the **pre-RoPE** q / k, L2-normalised: cluster membership then depends on content, not on position
(RoPE rotates by position, so rotated keys of equal content would land in different clusters); attention itself
uses the rotated q / k as the model's attention does. Key routing vectors of head ``h`` are the keys of its GQA
group.

Centroids: a persistent buffer ``[Hr, C, D]`` of unit vectors (random at construction; saved with the model).
Training (``module.training`` and grad enabled), each forward
- stores the commitment loss ``commitment * mean((x - mu)^2)`` on ``self.aux_loss`` (lucidrains's
  ``F.mse_loss(x, routed_means) * commitment``: ``x`` the normalised routing vectors of the queries and keys,
  ``mu`` their nearest centroid, detached); :func:`routing_aux_loss` sums them for a training loop;
- computes the k-means step of the batch (per cluster, the normalised sum of the routing vectors nearest to it;
  clusters nobody chose keep their centroid) and applies ``centroids <- normalise(ema_decay * centroids +
  (1 - ema_decay) * step)`` once, from a gradient hook on the layer's output and on its aux loss, i.e. during the
  backward pass, after this layer's forward used the old centroids (as lucidrains's backward hook). The routing
  holds no gradient graph, so the backward pass never reads the centroids. With gradient checkpointing the
  recomputed forward sees the updated centroids: call ``apply_kmeans_update`` yourself there instead.

Cache (``layer_state``): ``routed_k`` / ``routed_v`` ``[B, Hr, C, n * W, D]`` (rotated keys and values of the
routing heads' clusters in the ``n`` complete segments, cluster-major, segment-minor), ``pending_k`` /
``pending_v`` / ``pending_r`` (the current segment's rotated keys, values and routing vectors, fewer than
``segment``), ``local_k`` / ``local_v`` (the local heads' last ``local_window - 1`` keys and values). Prompts may
end mid-segment. Padded batches are refused (segments are token positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vzoo.kernels import routing_attention, sink_window_attention
from vzoo.kernels.routing import cluster_attention, gather_members, key_members, nearest_clusters

from .convert import LMLayer, ModelDims, check_layers, copy_projections, layer_state, register_lm_layer, token_validity

__all__ = ["RoutingAttention", "RoutingConfig", "routing_aux_loss"]


@dataclass(frozen=True)
class RoutingConfig:
    """Args:
        layers: decoder layers to convert (``None``: all).
        clusters: ``C`` centroids per routing head (about ``sqrt(T)`` for 4k-16k tokens; default 64).
        window: keys each centroid takes from each complete segment (default 8, so ``C * window == segment``: on
            average every key joins one cluster).
        segment: tokens per segment (default 512); a routing head sees keys of earlier segments only.
        routing_heads: query heads that route (the first ones); the others are local heads. ``None``: half the heads
            (at least 1).
        local_window: keys per query of the local heads, itself included (default 512).
        query_clusters: clusters each query joins (outputs averaged; default 1).
        ema_decay: centroid EMA decay in [0, 1) (default 0.999).
        commitment: weight of the commitment loss (default 1e-4).
        backend: ``"torch"`` or ``"reference"`` for the uncached forward; ``None``: the default (torch).
    """

    layers: tuple[int, ...] | None = None
    clusters: int = 64
    window: int = 8
    segment: int = 512
    routing_heads: int | None = None
    local_window: int = 512
    query_clusters: int = 1
    ema_decay: float = 0.999
    commitment: float = 1e-4
    backend: str | None = None

    def __post_init__(self) -> None:
        check_layers("RoutingConfig", self.layers)
        for name in ("clusters", "window", "segment", "local_window", "query_clusters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RoutingConfig.{name}={value!r} must be an int >= 1")
        heads = self.routing_heads
        if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
            raise ValueError(f"RoutingConfig.routing_heads={heads!r} must be None or an int >= 1")
        if self.window > self.segment:
            raise ValueError(f"RoutingConfig.window={self.window} must be <= segment={self.segment}")
        if self.query_clusters > self.clusters:
            raise ValueError(f"RoutingConfig.query_clusters={self.query_clusters} must be <= clusters={self.clusters}")
        decay = self.ema_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"RoutingConfig.ema_decay={decay!r} must be a number in [0, 1)")
        weight = self.commitment
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"RoutingConfig.commitment={weight!r} must be a finite number >= 0")
        if self.backend not in (None, "torch", "reference"):
            raise ValueError(f"RoutingConfig.backend={self.backend!r} must be None, 'torch' or 'reference'")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama RoPE (rotate-half): ``x [B, H, T, D]``, ``cos, sin [B, T, D]``."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]


def _cat(state, name: str, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
    return x if name not in state else torch.cat([state[name], x], dim)


class RoutingAttention(nn.Module):
    """Drop-in ``self_attn``: ``hidden_states [B, T, C]`` -> ``(out [B, T, C], None)``."""

    def __init__(self, config: RoutingConfig, model_config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        dims = ModelDims.of(model_config)
        self.num_heads, self.num_kv_heads, self.head_dim = dims.heads, dims.kv_heads, dims.head_dim
        hr = config.routing_heads if config.routing_heads is not None else max(1, dims.heads // 2)
        if hr > dims.heads:
            raise ValueError(f"RoutingConfig.routing_heads={hr} must be <= the {dims.heads} attention heads")
        self.routing_heads = hr
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = dims.projections()
        c, d = config.clusters, dims.head_dim
        self.register_buffer("centroids", F.normalize(torch.randn(hr, c, d), dim=-1))
        self.null_k = nn.Parameter(torch.zeros(hr, c, d))  # a zero null key and value: at first a query with
        self.null_v = nn.Parameter(torch.zeros(hr, c, d))  # nothing routed outputs 0, as an empty row would
        self.aux_loss: torch.Tensor | None = None
        self._step: torch.Tensor | None = None  # the k-means step waiting for the backward pass

    def init_from_attention(self, attn: nn.Module) -> None:
        """Copy the replaced attention's q / k / v / o projections (weights and biases) where the shapes match."""
        copy_projections(self, attn)

    @torch.no_grad()
    def apply_kmeans_update(self) -> None:
        """Apply the pending k-means step (from the last training forward) to the centroids by EMA; no-op if none."""
        if self._step is None:
            return
        decay = self.config.ema_decay
        mixed = decay * self.centroids.float() + (1.0 - decay) * self._step
        self.centroids.copy_(F.normalize(mixed, dim=-1))
        self._step = None

    def _kmeans(self, rq: torch.Tensor, rk: torch.Tensor) -> torch.Tensor:
        """Commitment loss of the routing vectors ``rq, rk [B, Hr, T, D]``; records the batch's k-means step."""
        x = F.normalize(torch.cat([rq, rk], 2).float(), dim=-1)  # [B, Hr, 2T, D]
        mu = self.centroids.float()
        with torch.no_grad():
            nearest = torch.einsum("bhtd,hcd->bhtc", x, mu).argmax(-1)  # [B, Hr, 2T]
            hr, c, d = mu.shape
            flat = (torch.arange(hr, device=x.device)[None, :, None] * c + nearest).reshape(-1)
            sums = x.new_zeros(hr * c, d).index_add_(0, flat, x.reshape(-1, d)).view(hr, c, d)
            counts = torch.bincount(flat, minlength=hr * c).view(hr, c, 1)
            self._step = torch.where(counts > 0, F.normalize(sums, dim=-1), mu)
        routed = mu[torch.arange(mu.shape[0], device=x.device)[None, :, None], nearest]
        return self.config.commitment * F.mse_loss(x, routed)

    def _routing_cached(self, state, q, k, v, rq, rk) -> torch.Tensor:
        """Routing heads through the cache: complete the pending segment(s), then attend over the stored clusters."""
        cfg = self.config
        s, w = cfg.segment, cfg.window
        pk, pv, pr = _cat(state, "pending_k", k), _cat(state, "pending_v", v), _cat(state, "pending_r", rk)
        done = pk.shape[2] // s * s
        if done:
            idx = key_members(pr[:, :, :done], self.centroids, w, s)  # [B, Hr, C, n_new, W]
            state["routed_k"] = _cat(state, "routed_k", gather_members(pk[:, :, :done], idx), 3)
            state["routed_v"] = _cat(state, "routed_v", gather_members(pv[:, :, :done], idx), 3)
        state["pending_k"], state["pending_v"], state["pending_r"] = pk[:, :, done:], pv[:, :, done:], pr[:, :, done:]
        b, hr, t, d = q.shape
        c = self.centroids.shape[1]
        keys = state["routed_k"] if "routed_k" in state else q.new_zeros(b, hr, c, 0, d)
        values = state["routed_v"] if "routed_v" in state else v.new_zeros(b, hr, c, 0, v.shape[-1])
        q_seg = (torch.arange(t, device=q.device) + state.seen) // s
        q_cl = nearest_clusters(rq, self.centroids, cfg.query_clusters)
        return cluster_attention(q, q_cl, q_seg, keys, values, w, 1.0 / math.sqrt(d), self.null_k, self.null_v)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.get("past_key_values")
        b, t, _ = hidden_states.shape
        if token_validity(attention_mask, t) is not None:
            raise ValueError("Routing attention does not support padded batches: segments are token positions, so a "
                             "row shifted by padding would be segmented differently; run rows of different lengths "
                             "separately")
        state = layer_state(cache, self.layer_idx, t)
        h, g, d, hr, cfg = self.num_heads, self.num_kv_heads, self.head_dim, self.routing_heads, self.config
        x = hidden_states
        q = self.q_proj(x).view(b, t, h, d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, g, d).transpose(1, 2).repeat_interleave(h // g, 1)  # per query head
        v = self.v_proj(x).view(b, t, g, d).transpose(1, 2).repeat_interleave(h // g, 1)
        rq, rk = q[:, :hr], k[:, :hr]  # routing vectors: pre-RoPE
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        training = self.training and torch.is_grad_enabled()
        self.aux_loss = self._kmeans(rq, rk) if training else None
        if state is None:
            out = routing_attention(q[:, :hr], k[:, :hr], v[:, :hr], self.centroids, window=cfg.window,
                                    segment=cfg.segment, null_k=self.null_k, null_v=self.null_v,
                                    query_clusters=cfg.query_clusters, route_q=rq, route_k=rk, backend=cfg.backend)
        else:
            out = self._routing_cached(state, q[:, :hr], k[:, :hr], v[:, :hr], rq, rk)
        if hr < h:
            kl, vl = k[:, hr:], v[:, hr:]
            if state is not None:
                kl, vl = _cat(state, "local_k", kl), _cat(state, "local_v", vl)
                keep = max(0, kl.shape[2] - (cfg.local_window - 1))
                state["local_k"], state["local_v"] = kl[:, :, keep:], vl[:, :, keep:]
            out = torch.cat([out, sink_window_attention(q[:, hr:], kl, vl, cfg.local_window)], 1)
        y = self.o_proj(out.transpose(1, 2).reshape(b, t, h * d))
        if training:
            for tensor in (y, self.aux_loss):
                if tensor.requires_grad:
                    tensor.register_hook(self._on_backward)
        return y, None

    def _on_backward(self, grad: torch.Tensor) -> torch.Tensor:
        self.apply_kmeans_update()
        return grad


def routing_aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of the commitment losses the :class:`RoutingAttention` layers of ``model`` stored in their last
    training forward (a zero scalar when there are none); add it to the training loss."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, RoutingAttention) and m.aux_loss is not None]
    if not losses:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack(losses).sum()


register_lm_layer(LMLayer(
    config=RoutingConfig, name="routing", label="Routing Transformer (k-means routed attention + local heads)",
    layer=RoutingAttention,
    paper="Efficient Content-Based Sparse Attention with Routing Transformers", arxiv="2003.05997",
    ops=("routing_attention", "sink_window_attention"),
    status="balanced k-means routing made causal per completed segment (differs from lucidrains's whole-sequence "
           "top-window, which is not causal); routing heads + local heads, EMA centroids updated in backward, "
           "commitment loss via routing_aux_loss; cached decoding == recomputation; padded batches refused; "
           "new null key/values and centroids need fine-tuning",
))
