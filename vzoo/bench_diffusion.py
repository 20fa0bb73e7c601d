"""Block-diffusion LMs: the speed of their attention masks on vzoo's kernels against the same masks as
dense 4-D masks through SDPA, same process. Used by ``benchmarks/diffusion_lm.py``.

Shapes follow issue 17's bar: B=1, H=4, D=64, fp32 on the CPU, diffusion blocks of 32. ``tokens`` is the
attention length: the BD3 training mask over ``[x_t ; x_0]`` of ``tokens / 2`` positions each (forward and
forward+backward), and the block-causal mask of a ``tokens``-token prefill (forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vzoo.bench import mode_ms
from vzoo.kernels.block_diffusion import (
    additive_mask, bd3_attention, bd3_layout, bd3_mask, block_causal_attention, block_causal_layout, block_causal_mask,
)

__all__ = ["BAR", "MaskRow", "check_diffusion_bar", "format_masks", "mask_rows"]

B, H, D, BLOCK = 1, 4, 64, 32


@dataclass
class MaskRow:
    mask: str  # "bd3 (training)" | "block-causal (prefill)"
    mode: str
    tokens: int
    ms: float  # vzoo's attention function for the mask
    dense_ms: float  # the same mask as a dense additive 4-D mask through SDPA
    density: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.ms


CASES = (("bd3 (training)", "fwd"), ("bd3 (training)", "fwd+bwd"), ("block-causal (prefill)", "fwd"))


def mask_rows(tokens: Sequence[int] = (2048, 4096, 8192), repeats: int = 3, block: int = BLOCK) -> list[MaskRow]:
    """Each of :data:`CASES` at each length: vzoo's path (:func:`~vzoo.kernels.block_diffusion.bd3_attention`,
    :func:`~vzoo.kernels.block_diffusion.block_causal_attention`) and the dense mask through SDPA, timed back to back
    on the same inputs (medians of ``repeats``)."""
    rows = []
    for t in tokens:
        for mask, mode in CASES:
            grad = mode == "fwd+bwd"
            q, k, v = (torch.randn(B, H, t, D, requires_grad=grad) for _ in range(3))
            if mask.startswith("bd3"):
                layout, dense = bd3_layout(t // 2, block), bd3_mask(t // 2, block)
                def run():
                    return bd3_attention(q, k, v, block)
            else:
                layout, dense = block_causal_layout(t, t, block), block_causal_mask(t, t, block)
                def run():
                    return block_causal_attention(q, k, v, block)
            add = additive_mask(dense)
            ms = mode_ms(run, mode, torch.device("cpu"), repeats)
            dense_ms = mode_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=add), mode, torch.device("cpu"),
                               repeats)
            rows.append(MaskRow(mask, mode, t, ms, dense_ms, layout.density()))
    return rows


def format_masks(rows: Sequence[MaskRow]) -> str:
    head = f"{'mask':<24} {'mode':>8} {'tokens':>7} {'density':>8} {'sparse ms':>10} {'dense ms':>10} {'speedup':>8}"
    return "\n".join([head, "-" * len(head)] + [
        f"{r.mask:<24} {r.mode:>8} {r.tokens:>7} {r.density:>8.3f} {r.ms:>10.1f} {r.dense_ms:>10.1f} {r.speedup:>7.2f}x"
        for r in rows])


BAR = {"bd3 (training) fwd+bwd @8k": 2.0, "bd3 (training) fwd @8k": 2.0, "block-causal (prefill) fwd @8k": 2.0}


def check_diffusion_bar(rows: Sequence[MaskRow]) -> list[str]:
    """``PASS|FAIL item: measured (bar)`` for the 8k rows measured."""
    got = {f"{r.mask} {r.mode} @8k": r.speedup for r in rows if r.tokens == 8192}
    return [f"{'PASS' if got[k] >= v else 'FAIL'} {k} vs dense 4-D mask through SDPA: {got[k]:.2f}x (bar {v}x)"
            for k, v in BAR.items() if k in got]
