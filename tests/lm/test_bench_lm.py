"""The language-model benchmark helpers: densities against what the methods select, rows on a short prompt."""

from __future__ import annotations

import torch

from vzoo.bench_lm import blockrank_density, format_lm, lm_rows, longgen_density, moba_density, topk_block_density
from vzoo.lm import SeerAttentionConfig
from vzoo.lm.moba import moba_routing
from vzoo.lm.seer import _selected_blocks


def test_densities_count_the_pairs_the_methods_select():
    n, block, topk, sink, window = 200, 16, 3, 5, 37
    causal = n * (n + 1) / 2
    torch.manual_seed(0)
    routed = moba_routing(torch.randn(1, 1, n, 8), torch.randn(1, 1, n, 8), block, topk)[0, 0].tolist()
    moba = sum(1 for i in range(n) for j in range(i + 1) if j // block in routed[i])  # what MoBA really selects
    assert abs(moba_density(n, block, topk) - moba / causal) < 1e-12
    sw = sum(sum(1 for j in range(i + 1) if j < sink or j > i - window) for i in range(n))
    assert abs(longgen_density(n, sink, window) - sw / causal) < 1e-12
    logits = torch.randn(1, 2, 10, 10).masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    chosen = _selected_blocks(SeerAttentionConfig(topk=3), logits)  # SeerAttention's own top-k selection
    assert abs(topk_block_density(10, 3) - chosen.sum().item() / (2 * 55)) < 1e-12
    m, h = 5, 4
    pairs = sum(1 for i in range(m * h) for j in range(i + 1)
                if i // h == j // h or j // h == 0 or i // h == m - 1)
    assert abs(blockrank_density(m, h) - pairs / (m * h * (m * h + 1) / 2)) < 1e-12


def test_rows_on_a_short_prompt(monkeypatch):
    from vzoo.kernels.break_even import BREAK_EVEN

    monkeypatch.setitem(BREAK_EVEN, ("cpu", "moba"), 0.5)
    monkeypatch.setitem(BREAK_EVEN, ("cpu", "seerattention"), 0.5)
    rows = lm_rows([1024], repeats=1, progress=False, peak=False)  # the fresh-process peaks take a minute
    assert [r.method.split()[0] for r in rows] == ["sdpa", "moba", "flashmoba-style", "seerattention", "blockrank", "longgen"]
    full_kv = 4 * 2 * 1024 * 256 * 4 / 2**20  # 4 layers, K and V, 1024 tokens, 4 x 64 fp32
    assert rows[0].kv_mb == full_kv and rows[0].speedup == 1.0
    assert rows[5].kv_mb == full_kv  # 1024 tokens fit in sink + window: nothing evicted
    # 1024 tokens: MoBA's top-3 of 512-token blocks, top-8 of 128 and SeerAttention's top-32 of 16 blocks
    # select everything (density 1 > break-even 0.5): every call runs dense; the fixed patterns never do
    assert [r.density == 1.0 for r in rows[1:4]] == [True] * 3
    assert [r.dense_share for r in rows] == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    table = format_lm(rows)
    assert "dense" in table.splitlines()[0] and len(table.splitlines()) == 2 + len(rows)
