"""vzoo: a zoo of attention modules for vision and video, exact to the papers and fast.

``import vzoo`` registers vzoo's timm models (``timm.create_model("biformer_tiny")``) and exposes the
attention modules; the kernels live in :mod:`vzoo.kernels`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import backbones  # noqa: E402,F401  (registers the timm models)
from .biformer import AttentionLePE, BiLevelRoutingAttention  # noqa: E402
from .overlock import GRN, ContMix, DilatedReparamBlock, DynamicConvBlock  # noqa: E402
from .psa import PSAConfig, PyramidSparseAttention, psa_attention  # noqa: E402
from .sab import SentenceAttentionBlock  # noqa: E402
from .vmoba import VMoBAAttention, VMoBAConfig, vmoba_attention  # noqa: E402

__all__ = [
    "AttentionLePE", "BiLevelRoutingAttention", "ContMix", "DilatedReparamBlock", "DynamicConvBlock", "GRN",
    "PSAConfig", "PyramidSparseAttention", "SentenceAttentionBlock", "VMoBAAttention", "VMoBAConfig", "psa_attention", "vmoba_attention", "__version__",
]
