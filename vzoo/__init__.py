"""vzoo: a zoo of attention modules for vision and video, exact to the papers and fast.

``import vzoo`` makes vzoo's timm models available (``timm.create_model("biformer_tiny")``) and
exposes the attention modules, both lazily: ``import vzoo`` (and so ``import vzoo.kernels``) imports
neither timm, diffusers nor transformers. The models are registered with timm as soon as timm is
imported (right away if it already is); the modules load on first access (``vzoo.ContMix``). The
kernels live in :mod:`vzoo.kernels`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_LAZY = {  # attribute -> the submodule defining it
    "AttentionLePE": "biformer", "BiLevelRoutingAttention": "biformer",
    "GRN": "overlock", "ContMix": "overlock", "DilatedReparamBlock": "overlock", "DynamicConvBlock": "overlock",
    "PSAConfig": "psa", "PyramidSparseAttention": "psa", "psa_attention": "psa",
    "SentenceAttentionBlock": "sab",
    "VMoBAAttention": "vmoba", "VMoBAConfig": "vmoba", "vmoba_attention": "vmoba",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        register_timm_models()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _initializing(finished: str | None) -> bool:
    """Whether some vzoo module other than ``finished`` (whose body has run) is being imported right now
    (its import may have pulled timm in)."""
    return any(
        getattr(getattr(m, "__spec__", None), "_initializing", False)
        for n, m in list(sys.modules.items()) if n.startswith(f"{__name__}.") and n != finished
    )


def register_timm_models(finished: str | None = None) -> None:
    """Register vzoo's timm models (import :mod:`vzoo.backbones`) if timm is loaded and no vzoo module
    is half imported (registering then would import it circularly). The vzoo modules that import timm
    call this as their last line with ``finished=__name__``, so the models register however timm came in."""
    if "timm" in sys.modules and f"{__name__}.backbones" not in sys.modules and not _initializing(finished):
        importlib.import_module(f"{__name__}.backbones")


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Registers vzoo's timm models (imports :mod:`vzoo.backbones`) right after timm itself has loaded:
    wraps the loader of every ``timm`` spec it is asked for, and leaves ``sys.meta_path`` once timm really
    loads (a mere probe such as transformers' ``importlib.util.find_spec("timm")`` leaves it in place)."""

    def find_spec(self, name, path, target=None):
        if name != "timm":
            return None
        at = sys.meta_path.index(self)
        sys.meta_path.remove(self)  # find the real spec without asking this finder again
        try:
            spec = importlib.util.find_spec("timm")
        finally:
            sys.meta_path.insert(at, self)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            register_timm_models()

        spec.loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    register_timm_models()
elif not any(isinstance(f, _RegisterWithTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTimm())
