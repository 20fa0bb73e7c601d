"""The registry of language-model methods, filled by the method files themselves.

A method file (``moba.py``, ``pbs.py``, ...) ends with one :func:`register_lm_method` call. That
registers the ``attn_implementation`` transformers will dispatch to, the config class users pass to
:func:`vzoo.lm.apply_sparse_attention`, the mask function, what the method attaches to a layer and
its benchmark rows; it also lists the method in :mod:`vzoo.registry` for ``vzoo list``. ``vzoo.lm``
imports every module of its package, so adding a method touches only its own file (plus its test
and benchmark row); nothing here names a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vzoo.registry import Method, register_method

__all__ = ["LMMethod", "lm_method", "lm_methods", "register_lm_method"]


def _never(config) -> bool:
    return False


@dataclass(frozen=True)
class LMMethod:
    """One language-model method.

    Attributes:
        config: the frozen dataclass users pass to ``apply_sparse_attention``; it has
            ``layer_ids(num_layers) -> tuple[int, ...]``.
        attn_implementation: the name registered with transformers' ``AttentionInterface``.
        label: the method's name in messages and tables.
        attention: ``(config, query [B, H, q, D], key, value [B, Hkv, kv, D], attention_mask, scale,
            module, **kwargs) -> [B, H, q, D]``; ``query`` after RoPE, ``key, value`` after the
            cache update, ``attention_mask`` as the mask function below made it.
        paper, arxiv, ops, status: what ``vzoo list`` shows (``ops`` are names from ``vzoo.registry.OPS``).
        attach: ``(model, attention module, config) -> object with .remove() or None``: parameters,
            hooks or cache layers the method adds to a patched layer.
        mask: ``"sdpa"`` (transformers' boolean ``sdpa_mask``, ``None`` when only causality applies)
            or ``"keys"`` (the 2-D key validity ``[B, kv]``).
        window_error: ``(config, sliding_window) -> str | None``: why the method cannot honour a
            model's sliding window on a patched layer (``None``: every window is honoured).
        full_cache: ``(config) -> bool``: the method's blocks sit at absolute positions, so a model's
            sliding-window layers must keep their whole KV cache.
        bench: ``(tokens) -> {row label: config}``: the configurations ``vzoo bench`` and the
            quality benchmark measure at a prompt of ``tokens`` tokens.
        bench_tokens: the longest prompt ``vzoo bench`` times the method at (``None``: any), for methods
            that compute explicit ``q x kv`` probability maps and so cost far more than the speed table's
            other rows at 16k tokens; the quality benchmark measures them at every length.
        contract: ``() -> {name: config}``: configurations that select every key a query may see at
            the tiny sizes of the tests (blocks of at most 8 tokens, prompts of at most 64); with
            each, the method must reduce to the model's own attention on every model it accepts
            (the shared contract test runs them on Llama, Qwen2, Mistral and Gemma models).
    """

    config: type
    attn_implementation: str
    label: str
    attention: Callable
    paper: str
    arxiv: str
    ops: tuple[str, ...]
    status: str
    attach: Callable | None = None
    mask: str = "sdpa"
    window_error: Callable | None = None
    full_cache: Callable = field(default=_never)
    bench: Callable[[int], dict] | None = None
    contract: Callable[[], dict] | None = None
    bench_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.mask not in ("sdpa", "keys"):
            raise ValueError(f"LMMethod {self.label}: mask={self.mask!r} must be 'sdpa' or 'keys'")
        if not self.attn_implementation.startswith("vzoo_"):
            raise ValueError(f"LMMethod {self.label}: attn_implementation={self.attn_implementation!r} must start with 'vzoo_'")


_LM: dict[type, LMMethod] = {}


def register_lm_method(method: LMMethod) -> LMMethod:
    """Add ``method`` to the LM registry and to :mod:`vzoo.registry` (as ``attn_implementation``
    without its ``vzoo_`` prefix). A config class or name registered twice is an error."""
    if method.config in _LM or any(m.attn_implementation == method.attn_implementation for m in _LM.values()):
        raise ValueError(f"LM method {method.attn_implementation!r} ({method.config.__name__}) is already registered")
    register_method(Method(
        name=method.attn_implementation.removeprefix("vzoo_"), paper=method.paper, arxiv=method.arxiv,
        modality="language", ops=method.ops,
        status=f"{method.status}; transformers attn_implementation {method.attn_implementation!r}",
    ))
    _LM[method.config] = method
    return method


def lm_methods() -> list[LMMethod]:
    """Every registered LM method, in registration order."""
    return list(_LM.values())


def lm_method(config: object) -> LMMethod:
    """The method ``config`` (an instance of a registered config class) belongs to."""
    method = _LM.get(type(config))
    if method is None:
        raise ValueError(f"config must be one of {[c.__name__ for c in _LM]}, got {type(config).__name__}")
    return method
