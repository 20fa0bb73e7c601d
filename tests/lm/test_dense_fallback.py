"""Never slower than dense: a MoBA call or SeerAttention prompt above the device's break-even density
runs dense attention instead, and the handle's density statistics say so."""

from __future__ import annotations

import pytest
import torch

from vzoo.kernels.break_even import BREAK_EVEN
from vzoo.lm import MoBAConfig, SeerAttentionConfig, apply_sparse_attention
from vzoo.lm.moba import moba_routing, routed_density


@pytest.fixture(autouse=True)
def _break_even(monkeypatch):
    """Fixed break-even densities, whatever the measured table holds."""
    monkeypatch.setitem(BREAK_EVEN, ("cpu", "moba"), 0.5)
    monkeypatch.setitem(BREAK_EVEN, ("cpu", "seerattention"), 0.5)


@pytest.mark.parametrize("window", [None, 11])
def test_moba_density_counts_the_selected_pairs(window):
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 30, 8), torch.randn(2, 1, 50, 8)
    ids = moba_routing(q, k, 4, 3, window)
    hits = total = 0
    for b in range(2):
        for h in range(2):
            for i in range(30):
                p = 20 + i
                for j in range(p + 1):
                    if window is None or j > p - window:
                        total += 1
                        hits += j // 4 in ids[b, h, i].tolist()
    assert abs(routed_density(ids, 50, 4, window) - hits / total) < 1e-12


@pytest.mark.parametrize("method", ["moba", "seer"])
def test_dense_above_break_even_sparse_below_and_counted(lm, method):
    model = lm.make()  # 3 layers
    ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(2))
    dense, sparse = {  # every block: density 1; the own (diagonal) block only: 64 * 4.5 / 2080 ~ 0.14
        "moba": (MoBAConfig(block_size=8, topk=8), MoBAConfig(block_size=8, topk=1)),
        "seer": (SeerAttentionConfig(block_size=8, topk=8), SeerAttentionConfig(block_size=8, topk=1)),
    }[method]
    pos = torch.arange(64)
    own_block = (pos[None] <= pos[:, None]) & (pos[None] // 8 == pos[:, None] // 8)
    with torch.no_grad():
        stock = model(ids).logits
        model.set_attn_implementation("eager")  # a 4-D float mask is used as given: the own-block-only pattern
        own_only = model(ids, attention_mask=torch.zeros(1, 1, 64, 64).masked_fill(~own_block, -1e30)).logits
        model.set_attn_implementation("sdpa")
        for config, runs_dense in ((dense, True), (sparse, False)):
            with apply_sparse_attention(model, config) as handle:
                assert handle.density is None and handle.sparse_calls == 0
                out = model(ids).logits
                assert handle.sparse_calls == 3 and handle.dense_calls == (3 if runs_dense else 0)
                want = 1.0 if runs_dense else (64 * 4.5) / (64 * 65 / 2)  # own block: (i % 8) + 1 keys
                assert abs(handle.density - want) < 1e-9
            torch.testing.assert_close(out, stock if runs_dense else own_only, atol=1e-5, rtol=1e-5)
        off = MoBAConfig(block_size=8, topk=4, dense_fallback=False) if method == "moba" else SeerAttentionConfig(
            block_size=8, topk=4, dense_fallback=False)
        with apply_sparse_attention(model, off) as handle:
            model(ids)
            assert handle.dense_calls == 0 and handle.density > 0.5  # above break-even, sparse as asked
