"""vzoo: a zoo of attention modules for vision and video, exact to the papers and fast.

``import vzoo`` is light: subpackages (``vzoo.kernels``, ``vzoo.backbones``, ``vzoo.pipelines``) load
on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("kernels", "backbones", "pipelines", "registry")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"vzoo.{name}")
    raise AttributeError(f"module 'vzoo' has no attribute {name!r}")
