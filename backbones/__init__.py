"""timm model families built from vzoo modules; importing this registers them with timm."""

from . import biformer, overlock  # noqa: F401  (registers biformer_* and overlock_* with timm)
