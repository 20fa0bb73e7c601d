"""timm model families built from vzoo modules; importing this registers them with timm."""

from . import biformer  # noqa: F401  (registers biformer_* with timm)
