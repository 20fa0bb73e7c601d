"""The language-model benchmark: densities measured through the handles against counts of the pairs the
methods select, rows for every registered method on a short prompt."""

from __future__ import annotations

import torch

from vzoo.bench_lm import bench_configs, format_lm, lm_rows
from vzoo.lm import LongGenConfig, MoBAConfig, SeerAttentionConfig, apply_sparse_attention, lm_methods
from vzoo.lm.blockrank import blockrank_density
from vzoo.lm.longgen import sink_window_density
from vzoo.lm.moba import moba_routing
from vzoo.lm.seer import _selected_blocks


def moba_pairs(n: int, block: int, topk: int) -> float:
    """Query ``i`` sees its own block up to itself plus ``min(topk - 1, complete past blocks)`` whole blocks."""
    return sum(i % block + 1 + block * min(topk - 1, i // block) for i in range(n)) / (n * (n + 1) / 2)


def test_closed_form_densities_count_the_pairs_the_methods_select():
    n, block, topk, sink, window = 200, 16, 3, 5, 37
    causal = n * (n + 1) / 2
    torch.manual_seed(0)
    routed = moba_routing(torch.randn(1, 1, n, 8), torch.randn(1, 1, n, 8), block, topk)[0, 0].tolist()
    moba = sum(1 for i in range(n) for j in range(i + 1) if j // block in routed[i])  # what MoBA really selects
    assert abs(moba_pairs(n, block, topk) - moba / causal) < 1e-12
    sw = sum(sum(1 for j in range(i + 1) if j < sink or j > i - window) for i in range(n))
    assert abs(sink_window_density(n, sink, window) - sw / causal) < 1e-12
    assert sink_window_density(20, 5, 37) == 1.0
    m, h = 5, 4
    pairs = sum(1 for i in range(m * h) for j in range(i + 1) if i // h == j // h or j // h == 0 or i // h == m - 1)
    assert abs(blockrank_density(m, h) - pairs / (m * h * (m * h + 1) / 2)) < 1e-12


def test_handles_measure_the_selected_density(lm):
    model = lm.make(layers=3)
    ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for config, want in (
            (MoBAConfig(block_size=8, topk=3, dense_fallback=False), moba_pairs(64, 8, 3)),
            (LongGenConfig(sink=4, window=16, full_layers=()), sink_window_density(64, 4, 16)),
        ):
            with apply_sparse_attention(model, config) as handle:
                model(ids)
                assert handle.sparse_calls == 3 and abs(handle.density - want) < 1e-9
        logits = torch.randn(1, 2, 8, 8).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
        chosen = _selected_blocks(SeerAttentionConfig(topk=3), logits)  # SeerAttention's own top-k selection
        assert chosen.sum().item() == 2 * sum(min(3, i + 1) for i in range(8))


def test_rows_for_every_registered_method_on_a_short_prompt(monkeypatch):
    from vzoo.kernels.break_even import BREAK_EVEN

    monkeypatch.setitem(BREAK_EVEN, ("cpu", "moba"), 0.5)
    monkeypatch.setitem(BREAK_EVEN, ("cpu", "seerattention"), 0.5)
    names = list(bench_configs(1024))
    assert names[0] == "sdpa" and len(names) >= 1 + len(lm_methods())  # a row (or more) per method
    assert {type(c) for c in bench_configs(1024).values() if c is not None} == {m.config for m in lm_methods()}
    rows = lm_rows([1024], repeats=1, progress=False, peak=False)  # the fresh-process peaks take a minute
    assert [r.method for r in rows] == names
    by = {r.method: r for r in rows}
    full_kv = 4 * 2 * 1024 * 256 * 4 / 2**20  # 4 layers, K and V, 1024 tokens, 4 x 64 fp32
    assert by["sdpa"].kv_mb == full_kv and by["sdpa"].speedup == 1.0 and by["sdpa"].density == 1.0
    longgen = next(r for r in rows if r.method.startswith("longgen"))
    assert longgen.kv_mb == full_kv and longgen.density == 1.0  # 1024 tokens fit in sink + window
    # 1024 tokens: MoBA's top-3 of 512-token blocks selects everything (1 > break-even 0.5): every call
    # runs dense; the fixed patterns never do
    assert by["moba (512, top-3)"].density == 1.0 and by["moba (512, top-3)"].dense_share == 1.0
    blockrank = next(r for r in rows if r.method.startswith("blockrank"))
    assert abs(blockrank.density - blockrank_density(8, 128)) < 1e-9 and blockrank.dense_share == 0.0
    table = format_lm(rows)
    assert "dense" in table.splitlines()[0] and len(table.splitlines()) == 2 + len(rows)


def test_explicit_probability_methods_leave_the_long_speed_rows():
    from vzoo.lm import lm_methods

    capped = [m for m in lm_methods() if m.bench_tokens is not None]
    assert capped, "ACT and BCT attention cap their speed rows"
    for m in capped:
        assert {type(c) for c in bench_configs(m.bench_tokens).values()} >= {m.config}
        assert m.config not in {type(c) for c in bench_configs(m.bench_tokens + 1).values()}
