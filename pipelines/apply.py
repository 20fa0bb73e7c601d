"""``apply_sparse_attention``: VMoBA or PSA in a diffusers video pipeline, one call, fully removable.

Mechanism: each self-attention module gets a vzoo processor that wraps the module's own (stock)
processor. On a sparse step it runs the stock processor under a ``TorchFunctionMode`` that catches the
one ``scaled_dot_product_attention`` call it makes (after the projections, qk-norm and RoPE, whatever
the diffusers version) and answers it with :func:`vzoo.pipelines.attention.video_attention`; on a
dense step it just calls the stock processor. A forward pre-hook on the transformer records the
latent grid and the denoising step. Nothing is patched at class level; ``remove()`` puts the original
processors back and drops the hooks.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from vzoo.kernels.break_even import DensityReport, DensityStats, shared_density
from vzoo.psa import PSAConfig, psa_offsets, seeded_generator
from vzoo.vmoba import VMoBAConfig

from .adapters import Adapter, adapter_for, call_arguments
from .attention import TokenCountMismatch, Unsupported, video_attention
from .parallel import UlyssesTokens, check_parallel, context_parallel, mean_over_ulysses, ulysses_heads

__all__ = ["DenseConfig", "SparseAttentionHandle", "apply_sparse_attention", "make_config"]


@dataclass(frozen=True)
class DenseConfig:
    """Stock attention everywhere (through vzoo's processors): the parity baseline."""


CONFIGS = {"vmoba": VMoBAConfig, "psa": PSAConfig, "dense": DenseConfig}


def make_config(method: str, **fields) -> VMoBAConfig | PSAConfig | DenseConfig:
    """``make_config("vmoba", tau=0.3)``; ``ValueError`` naming the method or field if unknown."""
    if method not in CONFIGS:
        raise ValueError(f"method={method!r} is unknown; choose from {sorted(CONFIGS)}")
    return CONFIGS[method](**fields)


class _State:
    """Per-transformer view of the current call: grid, denoising step, measured density."""

    def __init__(self, adapter: Adapter, config, scheduler, num_inference_steps: int | None) -> None:
        self.adapter, self.config, self.scheduler, self.total = adapter, config, scheduler, num_inference_steps
        self.grid: tuple[int, int, int] | None = None
        self.step, self.last_t = -1, None
        self.warned: set[str] = set()
        self.stats = DensityStats()
        self.generators: dict = {}  # PSA offset sampling when config.seed is set

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = call_arguments(module, args, kwargs)
        self.grid = tuple(int(n) for n in self.adapter.grid(module, arguments))
        t = arguments.get("timestep")
        t = float(t.max()) if isinstance(t, torch.Tensor) else None if t is None else float(t)
        timesteps = getattr(self.scheduler, "timesteps", None)
        if t is not None and timesteps is not None and len(timesteps):
            self.step = int((timesteps.float().cpu() - t).abs().argmin())
            self.total = len(timesteps)
        elif t != self.last_t:  # count timestep changes: split and batched CFG alike
            self.step = 0 if self.last_t is None or t is None or t > self.last_t else self.step + 1
        self.last_t = t

    def sparse_config(self, layer_idx: int) -> VMoBAConfig | PSAConfig | None:
        config = self.config
        if isinstance(config, DenseConfig) or layer_idx in config.dense_layers or self.grid is None:
            return None
        warm = math.floor(config.dense_warmup * (self.total or 0) + 0.5)
        return None if self.step < warm else config

    def warn_once(self, reason: str) -> None:
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(f"vzoo sparse attention falls back to the stock processor: {reason}", stacklevel=3)


class _CatchSDPA(TorchFunctionMode):
    """Answers ``F.scaled_dot_product_attention`` calls with ``run`` (the mode is off inside handlers)."""

    def __init__(self, run) -> None:
        super().__init__()
        self.run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.run(func, args, kwargs)
        return func(*args, **kwargs)


def _forwarded(name: str) -> property:
    """An attribute diffusers sets on processors (``_parallel_config`` by ``enable_parallelism``,
    ``_attention_backend`` by ``set_attention_backend``), kept on the stock processor it must reach, so
    vzoo and those calls can come in either order and ``remove()`` keeps them."""
    return property(lambda self: getattr(self.original, name, None), lambda self, value: setattr(self.original, name, value))


class _SparseProcessor:
    """Wraps a stock processor; subclasses fix the call signature (diffusers filters kwargs by it)."""

    _attention_backend = _forwarded("_attention_backend")
    _parallel_config = _forwarded("_parallel_config")

    def __init__(self, original, layer_idx: int, state: _State) -> None:
        self.original, self.layer_idx, self.state = original, layer_idx, state

    def _call(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary: dict):
        config = self.state.sparse_config(self.layer_idx)
        parallel = context_parallel(self.original) is not None
        if config is None and not parallel:  # under Ulysses vzoo orders the tokens of dense calls too
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **rotary)
        check_parallel(self.original)
        caught = []

        def attend(func, args, kwargs):
            caught.append(True)
            return self._attend(config, func, args, kwargs)

        with _CatchSDPA(attend):
            out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **rotary)
        if not caught:
            self.state.warn_once("the stock processor made no scaled_dot_product_attention call (another attention backend active?)")
        return out

    def _attend(self, config, func, args, kwargs):
        """One caught SDPA call: ``config`` (None: the stock SDPA) on the whole sequence in one-process
        order; under Ulysses the call's tokens are put in that order first (:class:`UlyssesTokens`)."""
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        call = dict(zip(names, args)) | kwargs
        if call.get("dropout_p", 0.0) or call.get("is_causal", False):
            self.state.warn_once("dropout or causal attention")
            return func(*args, **kwargs)
        share = ulysses_heads(self.original)
        tokens = None
        q, k, v = call.pop("query"), call.pop("key"), call.pop("value")
        if share is not None:
            tokens = UlyssesTokens(self.original, math.prod(self.state.grid), self.state.adapter.text_first, self.state.adapter.gathers)
            q, k, v = tokens.into(q), tokens.into(k), tokens.into(v)
        out = func(q, k, v, **call) if config is None else self._sparse(config, func, q, k, v, call, share)
        return out if tokens is None else tokens.back(out)

    def _sparse(self, config, func, q, k, v, call: dict, share: tuple[int, int] | None):
        generator = seeded_generator(getattr(config, "seed", None), q.device, self.state.generators)
        offsets = None
        if isinstance(config, PSAConfig) and share is not None:  # draw for every head, as one process does
            rank, degree = share
            drawn = psa_offsets(q.shape[0], (q.shape[1] * degree, k.shape[1] * degree), config, q.device, generator)
            offsets = tuple(o.chunk(degree, 1)[rank] for o in drawn)
        shared = shared_density(mean_over_ulysses(self.original, q.device)) if share else contextlib.nullcontext()
        try:
            with shared:  # under Ulysses the dense fallback is decided on the density of all heads
                out, density, dense = video_attention(
                    q, k, v, call.get("attn_mask"), call.get("scale"),
                    grid=self.state.grid, layer_idx=self.layer_idx, config=config, text_first=self.state.adapter.text_first,
                    generator=generator, offsets=offsets,
                )
        except Unsupported as why:
            if isinstance(why, TokenCountMismatch) and share is not None:
                raise RuntimeError(f"vzoo sparse attention under context parallelism: {why}") from None
            self.state.warn_once(str(why))
            return func(q, k, v, **call)
        self.state.stats.add(density, dense)
        return out


class _RotaryEmbProcessor(_SparseProcessor):  # Wan
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self._call(attn, hidden_states, encoder_hidden_states, attention_mask, dict(rotary_emb=rotary_emb))


class _ImageRotaryEmbProcessor(_SparseProcessor):  # CogVideoX, HunyuanVideo, LTX
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return self._call(attn, hidden_states, encoder_hidden_states, attention_mask, dict(image_rotary_emb=image_rotary_emb))


_PROCESSORS = {"rotary_emb": _RotaryEmbProcessor, "image_rotary_emb": _ImageRotaryEmbProcessor}


class SparseAttentionHandle(DensityReport):
    """What :func:`apply_sparse_attention` installed. ``remove()`` (or leaving a ``with`` block) restores
    the stock processors and removes the hooks; ``density`` is the mean density the method selected in
    the sparse calls so far (``None`` before any); ``dense_calls`` of them ran the dense kernel instead
    because their selection was above the device's break-even density (never slower than dense)."""

    def __init__(self) -> None:
        self._restore: list[tuple[nn.Module, object]] = []
        self._hooks: list = []
        self._states: list[_State] = []

    def density_stats(self) -> list[DensityStats]:
        return [s.stats for s in self._states]

    def remove(self) -> None:
        for attn, original in reversed(self._restore):
            attn.set_processor(original)
        for hook in self._hooks:
            hook.remove()
        self._restore, self._hooks = [], []

    def __enter__(self) -> SparseAttentionHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_sparse_attention(
    pipe_or_transformer, config: VMoBAConfig | PSAConfig | DenseConfig, *, num_inference_steps: int | None = None
) -> SparseAttentionHandle:
    """Install sparse self-attention on a diffusers video pipeline (``transformer`` and ``transformer_2``)
    or on one transformer.

    Args:
        pipe_or_transformer: a pipeline with ``.transformer`` or a Wan, CogVideoX, HunyuanVideo or LTX
            video transformer.
        config: :class:`VMoBAConfig`, :class:`PSAConfig` or :class:`DenseConfig`.
        num_inference_steps: needed for ``dense_warmup`` when a bare transformer is given (a pipeline's
            scheduler tells the step itself).

    Returns:
        A :class:`SparseAttentionHandle` (``.remove()``, context manager, ``.density``).
    """
    if not isinstance(config, tuple(CONFIGS.values())):
        raise ValueError(f"config must be a VMoBAConfig, PSAConfig or DenseConfig, got {type(config).__name__}")
    is_pipe = hasattr(pipe_or_transformer, "transformer")
    transformers = (
        [t for t in (pipe_or_transformer.transformer, getattr(pipe_or_transformer, "transformer_2", None)) if t is not None]
        if is_pipe
        else [pipe_or_transformer]
    )
    scheduler = getattr(pipe_or_transformer, "scheduler", None) if is_pipe else None
    warmup = getattr(config, "dense_warmup", 0)
    if warmup and scheduler is None and num_inference_steps is None:
        raise ValueError("dense_warmup needs the number of denoising steps: pass a pipeline or num_inference_steps")
    adapters = [adapter_for(t) for t in transformers]
    handle = SparseAttentionHandle()
    for transformer, adapter in zip(transformers, adapters):
        layers = adapter.self_attention(transformer)
        if any(isinstance(attn.processor, _SparseProcessor) for _, attn in layers):
            raise RuntimeError(f"{type(transformer).__name__} already has vzoo sparse attention; remove() it first")
        state = _State(adapter, config, scheduler, num_inference_steps)
        parallel = getattr(transformer, "_parallel_config", None)
        parallel = parallel if getattr(parallel, "context_parallel_config", None) is not None else None
        wrappers = []
        for layer_idx, attn in layers:
            wrapper = _PROCESSORS[adapter.rotary_arg](attn.processor, layer_idx, state)
            if parallel is not None and context_parallel(wrapper) is None:
                wrapper._parallel_config = parallel  # a processor enable_parallelism skips (CogVideoX's)
            check_parallel(wrapper)
            wrappers.append((attn, wrapper))
        handle._states.append(state)
        handle._hooks.append(transformer.register_forward_pre_hook(state.pre_forward, with_kwargs=True))
        for attn, wrapper in wrappers:
            handle._restore.append((attn, attn.processor))
            attn.set_processor(wrapper)
    return handle
