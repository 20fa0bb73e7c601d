"""The language-model benchmark helpers: densities against brute-force counts, rows on a short prompt."""

from __future__ import annotations

import torch

from vzoo.bench_lm import blockrank_density, format_lm, lm_rows, longgen_density, moba_density, topk_block_density


def test_densities_count_the_attended_causal_pairs():
    n, block, topk, sink, window = 200, 16, 3, 5, 37
    causal = n * (n + 1) / 2
    moba = sum(len({j for j in range(i + 1) if j // block == i // block}) + block * min(topk - 1, i // block) for i in range(n))
    assert abs(moba_density(n, block, topk) - moba / causal) < 1e-12
    sw = sum(sum(1 for j in range(i + 1) if j < sink or j > i - window) for i in range(n))
    assert abs(longgen_density(n, sink, window) - sw / causal) < 1e-12
    assert topk_block_density(10, 3) == sum(min(3, i + 1) for i in range(10)) / 55
    m, h = 5, 4
    pairs = sum(1 for i in range(m * h) for j in range(i + 1)
                if i // h == j // h or j // h == 0 or i // h == m - 1)
    assert abs(blockrank_density(m, h) - pairs / (m * h * (m * h + 1) / 2)) < 1e-12


def test_rows_on_a_short_prompt():
    rows = lm_rows([1024], repeats=1, progress=False)
    assert [r.method.split()[0] for r in rows] == ["sdpa", "moba", "flashmoba-style", "seerattention", "blockrank", "longgen"]
    full_kv = 4 * 2 * 1024 * 256 * 4 / 2**20  # 4 layers, K and V, 1024 tokens, 4 x 64 fp32
    assert rows[0].kv_mb == full_kv and rows[0].speedup == 1.0
    assert rows[5].kv_mb == full_kv  # 1024 tokens fit in sink + window: nothing evicted
    for r in rows:
        assert r.ms > 0 and 0 < r.density <= 1 + 1e-12, r
    assert "longgen" in format_lm(rows) and torch.isfinite(torch.tensor([r.speedup for r in rows])).all()
