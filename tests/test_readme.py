"""The README's kernel quickstart runs as written, and its merge example is exact."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F


def test_quickstart_runs_and_merge_is_exact():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    scope: dict = {}
    exec(code, scope)  # noqa: S102  (our own README)
    q, k, v, out = scope["q"], scope["k"], scope["v"], scope["out"]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-5, rtol=1e-4)
