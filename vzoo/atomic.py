"""Writing files so that a reader never sees a half-written one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["save_figure", "write_atomic", "write_json_atomic"]


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a hidden file next to ``path`` (same suffix, so format-by-extension writers work),
    then rename it over ``path``; the temporary file is removed if ``write`` fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(obj: object, path: str | Path) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def save_figure(fig, path: str | Path, dpi: int | None = None) -> None:
    """A matplotlib figure saved at ``path`` (format from its suffix), atomically, then closed."""
    import matplotlib.pyplot as plt

    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi))
    finally:
        plt.close(fig)
