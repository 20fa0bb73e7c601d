"""Pyramid Sparse Attention against a loop oracle: importance, levels and similarity cap by loops,
attention as one dense softmax over the concatenation of all pyramid levels with a +ln(p) bias."""

from __future__ import annotations

import math

import pytest
import torch

from vzoo.gilbert import gilbert_order
from vzoo.psa import PSAConfig, PyramidSparseAttention, psa_attention, psa_levels, psa_offsets


def _oracle_levels(q, k, cfg, scale, offsets):
    """Official selection by loops: sampled importance, level intervals with rounding, sim cap."""
    b, h, s, _ = q.shape
    bq, bk = cfg.block_q, cfg.block_k
    nqb, nkb = -(-s // bq), -(-s // bk)
    levels = torch.zeros(b, h, nqb, nkb, dtype=torch.long)
    for bi in range(b):
        for hi in range(h):
            off_q, off_k = offsets[0][bi, hi].tolist(), offsets[1][bi, hi].tolist()
            score = torch.zeros(nqb, nkb, dtype=torch.float64)
            for i in range(nqb):
                for oq in off_q:
                    qi = q[bi, hi, min(i * bq + oq, s - 1)].double()
                    r = [max((qi @ k[bi, hi, min(j * bk + ok, s - 1)].double()).item() * scale for ok in off_k) for j in range(nkb)]
                    top = max(r)
                    for j in range(nkb):
                        score[i, j] = max(score[i, j], math.exp(r[j] - top))
            score /= score.sum(-1, keepdim=True)
            for i in range(nqb):
                order = sorted(range(nkb), key=lambda j: (-score[i, j].item(), j))
                cum = [sum(score[i, j].item() for j in order[: n + 1]) for n in range(nkb)]
                start = 0
                for level, pool in enumerate((1, 2, 4, 8), 1):
                    if cfg.mode == "threshold":
                        count = sum(c / cum[-1] <= cfg.thresholds[level - 1] + 1e-6 for c in cum)
                        end = count + 1 if count else start
                    else:
                        end = min(nkb, int(nkb * round(sum(cfg.quantiles[:level]), 12)))
                    m = math.ceil(pool / max(1, bk // cfg.tile_k))
                    if m > 1:
                        end = min(nkb, start + math.ceil(max(end - start, 0) / m) * m)
                        if end == nkb:
                            end = start + (end - start) // m * m
                    else:
                        end = max(min(end, nkb), start)
                        if cfg.mode == "threshold" and level == 1:
                            end = max(end, min(nkb, int(nkb * cfg.min_full) + 1))
                    for j in order[start:end]:
                        levels[bi, hi, i, j] = level
                    start = end
            if cfg.sim_cap is not None:
                for j in range(nkb):
                    keys = [k[bi, hi, min(j * bk + t, s - 1)].double() for t in range(bk)]
                    cap = 1
                    for level, (p, c) in enumerate(zip((2, 4, 8), cfg.sim_cap), 2):
                        sims = [torch.cosine_similarity(keys[t], keys[t + p - 1], dim=0).item() for t in range(0, bk, p)]
                        if sum(sims) / len(sims) > c:
                            cap = level
                    row = levels[bi, hi, :, j]
                    levels[bi, hi, :, j] = torch.where(row > 0, row.clamp_max(cap), row)
    return levels


def _oracle_attention(q, k, v, levels, cfg, scale):
    """Dense softmax over [K^1 | K^2 | K^4 | K^8] with +ln p and a token mask from the levels."""
    b, h, s, d = q.shape
    bq, bk = cfg.block_q, cfg.block_k
    padded = -(-s // bk) * bk
    keys, vals, bias, owner, lvl_of = [], [], [], [], []
    for level, p in enumerate((1, 2, 4, 8), 1):
        n = s if p == 1 else padded // p
        for m in range(n):
            idx = [min(m * p + t, s - 1) for t in range(p)]  # replicate padding past the end
            keys.append(k[:, :, idx].double().mean(2))
            vals.append(v[:, :, idx].double().mean(2))
            bias.append(math.log(p))
            owner.append(m * p // bk)
            lvl_of.append(level)
    kk, vv = torch.stack(keys, 2), torch.stack(vals, 2)
    logits = (q.double() @ kk.transpose(-1, -2)) * scale + torch.tensor(bias, dtype=torch.float64)
    qblock = torch.arange(s) // bq
    allowed = levels[:, :, qblock][..., torch.tensor(owner)] == torch.tensor(lvl_of)  # [B, H, S, N_all]
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ vv


@pytest.mark.parametrize(
    "grid,cfg",
    [
        ((4, 8, 8), PSAConfig(block_q=32, block_k=32)),  # balanced preset thresholds, sim cap, Hilbert order
        ((3, 7, 9), PSAConfig(block_q=16, block_k=32, thresholds=(0.3, 0.5, 0.7, 0.9), sim_cap=None)),  # ragged
        ((4, 8, 8), PSAConfig(block_q=32, block_k=16, mode="quantile", quantiles=(0.25, 0.25, 0.25, 0.1), reorder=False)),
    ],
)
def test_matches_loop_oracle_with_gradients(grid, cfg):
    torch.manual_seed(0)
    s = math.prod(grid)
    # smooth keys so that pooling levels and the similarity cap both occur
    base = torch.randn(1, 2, s, 8).cumsum(2) / 4
    q = (base + 0.3 * torch.randn_like(base)).requires_grad_()
    k = (base + 0.1 * torch.randn_like(base)).requires_grad_()
    v = torch.randn(1, 2, s, 8, requires_grad=True)
    scale = 8**-0.5
    perm = gilbert_order(grid) if cfg.reorder else torch.arange(s)
    qo, ko, vo = (x.detach()[:, :, perm] for x in (q, k, v))
    offsets = psa_offsets(1, (2, 2), cfg, "cpu", torch.Generator().manual_seed(5))
    levels = _oracle_levels(qo, ko, cfg, scale, offsets)
    assert torch.equal(psa_levels(qo, ko, cfg, scale, offsets=offsets), levels)
    assert len(levels.unique()) >= 3, levels.unique()  # several pyramid levels really in use
    qr, kr, vr = (x[:, :, perm] for x in (q, k, v))
    want = torch.empty(1, 2, s, 8, dtype=torch.float64).index_copy(2, perm, _oracle_attention(qr, kr, vr, levels, cfg, scale))
    got, density, dense = psa_attention(q, k, v, grid, cfg, return_density=True, offsets=offsets, dense_fallback=False)
    assert not dense
    weights = torch.tensor([0, 1, 1 / 2, 1 / 4, 1 / 8], dtype=torch.float64)
    assert density == pytest.approx(weights[levels].mean().item())
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    up = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), up), torch.autograd.grad(want, (q, k, v), up.double())):
        torch.testing.assert_close(a, b.float(), atol=1e-5 * b.abs().max().item(), rtol=1e-4)


def test_all_full_is_dense_attention_and_gqa():
    torch.manual_seed(1)
    q = torch.randn(1, 4, 4 * 8 * 8, 16)
    k, v = (torch.randn(1, 2, 4 * 8 * 8, 16) for _ in range(2))
    cfg = PSAConfig(block_q=32, block_k=32, min_full=1.0)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    out, density, ran_dense = psa_attention(q, k, v, (4, 8, 8), cfg, return_density=True, dense_fallback=False)
    assert density == 1.0 and not ran_dense
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    out, density, ran_dense = psa_attention(q, k, v, (4, 8, 8), cfg, return_density=True)  # above break-even: dense kernel
    assert density == 1.0 and ran_dense
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(block_q=12), "block_q"),
        (dict(mode="topk"), "mode"),
        (dict(thresholds=(0.6, 0.5, 0.7, 0.8)), "thresholds"),
        (dict(thresholds=(0.0, 0.5, 0.7, 0.8)), "thresholds"),
        (dict(quantiles=(0.5, 0.5, 0.5, 0.0)), "quantiles"),
        (dict(sim_cap=(0.7, 0.6)), "sim_cap"),
        (dict(mode="quantile", quantiles=(0.0, 0.0, 0.0, 0.0)), "quantiles"),  # selects nothing
        (dict(seed=1.5), "seed"),
        (dict(dense_fallback="no"), "dense_fallback"),
        (dict(tile_k=4), "tile_k"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"PSAConfig.{field}"):
        PSAConfig(**kwargs)



def test_presets_match_the_official_config_and_grid_check():
    """configs/attention_config.yaml of ziplab/Pyramid-Sparse-Attention@be122cf, psa_balanced entries."""
    official = {  # name: (block_k, level bounds, similarity mask)
        "balanced": (128, (0.5, 0.6, 0.7, 0.8), (0.7, 0.65, 0.6)),
        "wan2.1-14b": (128, (0.4, 0.5, 0.6, 0.8), None),
        "wan2.2-a14b": (32, (0.5, 0.6, 0.6, 0.8), None),
        "wan2.2-5b": (32, (0.6, 0.7, 0.7, 0.8), None),
    }
    for name, (block_k, bounds, sim) in official.items():
        cfg = PSAConfig.preset(name)
        assert (cfg.block_q, cfg.block_k, cfg.tile_k, cfg.mode) == (128, block_k, 32, "threshold")
        assert (cfg.thresholds, cfg.sim_cap) == (bounds, sim), name
    assert PSAConfig.preset("wan2.2-5b", seed=3).seed == 3
    with pytest.raises(ValueError, match="unknown preset"):
        PSAConfig.preset("fast")
    q = torch.randn(1, 1, 100, 8)
    with pytest.raises(ValueError, match="grid"):
        psa_attention(q, q, q, (4, 5, 6))


def test_triton_path_matches_oracle_with_gradients():
    """The per-level Triton block-sparse kernels (the interpreter on CPU), pooled levels with 4-key blocks."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(2)
    grid, s = (4, 8, 8), 256
    base = torch.randn(1, 2, s, 16).cumsum(2) / 4
    q = (base + 0.3 * torch.randn_like(base)).to(dev).requires_grad_()
    k = (base + 0.1 * torch.randn_like(base)).to(dev).requires_grad_()
    v = torch.randn(1, 2, s, 16, device=dev, requires_grad=True)
    cfg = PSAConfig(block_q=32, block_k=32, thresholds=(0.3, 0.5, 0.7, 0.9), sim_cap=None)
    perm = gilbert_order(grid)
    qo, ko, vo = (x.detach().cpu()[:, :, perm] for x in (q, k, v))
    offsets = psa_offsets(1, (2, 2), cfg, "cpu", torch.Generator().manual_seed(6))
    levels = _oracle_levels(qo, ko, cfg, 0.25, offsets)
    assert len(levels.unique()) >= 4
    qr, kr, vr = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    want = torch.empty(1, 2, s, 16, dtype=torch.float64).index_copy(2, perm, _oracle_attention(qr[:, :, perm], kr[:, :, perm], vr[:, :, perm], levels, cfg, 0.25))
    got = psa_attention(q, k, v, grid, cfg, backend="triton", offsets=tuple(o.to(dev) for o in offsets), dense_fallback=False)
    torch.testing.assert_close(got.cpu(), want.float(), atol=1e-5, rtol=1e-5)
    up = torch.randn(got.shape)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), up.to(dev)), torch.autograd.grad(want, (qr, kr, vr), up.double())):
        torch.testing.assert_close(a.cpu(), b.float(), atol=5e-5 * b.abs().max().item(), rtol=1e-4)  # fp32 kernels vs fp64


@pytest.mark.parametrize(
    "grid,cfg",
    [
        ((4, 8, 8), PSAConfig(block_q=32, block_k=32, thresholds=(0.3, 0.5, 0.7, 0.9), sim_cap=None)),
        ((3, 7, 9), PSAConfig(block_q=16, block_k=32, thresholds=(0.3, 0.5, 0.7, 0.9), sim_cap=None)),  # ragged
        ((4, 8, 8), PSAConfig(block_q=32, block_k=16, mode="quantile", quantiles=(0.25, 0.25, 0.25, 0.1), reorder=False)),
    ],
)
def test_fused_pyramid_kernel_matches_oracle(grid, cfg):
    """Inference on the Triton backend takes the fused multi-level kernel (the interpreter on CPU)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(4)
    s = math.prod(grid)
    base = torch.randn(1, 2, s, 16).cumsum(2) / 4
    q, k = base + 0.3 * torch.randn_like(base), base + 0.1 * torch.randn_like(base)
    v = torch.randn(1, 2, s, 16)
    perm = gilbert_order(grid) if cfg.reorder else torch.arange(s)
    qo, ko, vo = (x[:, :, perm] for x in (q, k, v))
    offsets = psa_offsets(1, (2, 2), cfg, "cpu", torch.Generator().manual_seed(7))
    levels = _oracle_levels(qo, ko, cfg, 0.25, offsets)
    assert len(levels.unique()) >= 4
    want = torch.empty(1, 2, s, 16, dtype=torch.float64).index_copy(2, perm, _oracle_attention(qo, ko, vo, levels, cfg, 0.25))
    with torch.no_grad():
        got, lse = psa_attention(q.to(dev), k.to(dev), v.to(dev), grid, cfg, backend="triton", return_lse=True,
                                 offsets=tuple(o.to(dev) for o in offsets), dense_fallback=False)
    torch.testing.assert_close(got.cpu(), want.float(), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(lse).all()


def test_quantiles_that_select_no_block_raise_at_call_time():
    """int(n * 0.35) = 0 of 2 key blocks: nothing selected, so every output row would be zero."""
    q = torch.randn(1, 1, 64, 8)
    cfg = PSAConfig(block_q=32, block_k=32, mode="quantile", reorder=False, sim_cap=None)
    with pytest.raises(ValueError, match="PSAConfig.quantiles"):
        psa_attention(q, q, q, None, cfg)


def test_level_rounding_and_min_full_follow_the_official_rules():
    """Equal importance over 20 key blocks (ties keep block order): threshold mode gives level 1 to
    int(0.06 * 20) + 1 = 2 blocks here only through min_full; block_k = tile_k makes pooled levels
    multiples of 2 / 4 / 8 blocks, rounded up, and down again at the row's end."""
    from vzoo.psa import _sorted_levels

    ranked = torch.full((1, 20), 0.05)
    cfg = PSAConfig(block_q=32, block_k=32, thresholds=(0.01, 0.16, 0.3, 0.9), sim_cap=None)
    # level 1: nothing within 0.01 -> min_full 2; level 2: 3 within 0.16 (+1 = 4) -> [2, 4);
    # level 3: 6 within 0.3 -> 7, [4, 7) rounded up to 4 blocks -> [4, 8); level 4: 18 -> 19, [8, 19)
    # rounded up to 16 -> past the end -> down to 8 blocks -> [8, 16); the rest skipped
    want = [1] * 2 + [2] * 2 + [3] * 4 + [4] * 8 + [0] * 4
    assert _sorted_levels(cfg, ranked)[0].tolist() == want
    quant = PSAConfig(block_q=32, block_k=32, mode="quantile", quantiles=(0.1, 0.05, 0.0, 0.2))
    # ends int(20 * .1) = 2, int(20 * .15) = 3 -> [2, 3) rounded to 2 -> [2, 4); 4x: nothing; 8x: int(7) = 7 -> [4, 7) -> 8 -> [4, 12)
    assert _sorted_levels(quant, ranked)[0].tolist() == [1] * 2 + [2] * 2 + [4] * 8 + [0] * 8


def test_bad_offsets_raise():
    q = torch.randn(1, 2, 64, 8)
    cfg = PSAConfig(block_q=32, block_k=32, reorder=False, sim_cap=None)
    good = psa_offsets(1, (2, 2), cfg, "cpu")
    for bad in ((good[0][:, :1], good[1]), (good[0], good[1] + 32), (good[0].float(), good[1])):
        with pytest.raises(ValueError, match="offsets"):
            psa_attention(q, q, q, None, cfg, offsets=bad)


def test_offsets_are_drawn_per_call_and_head_and_seed_reproduces():
    gen = torch.Generator().manual_seed(0)
    cfg = PSAConfig(block_q=32, block_k=32)
    a, b = psa_offsets(2, (3, 3), cfg, "cpu", gen), psa_offsets(2, (3, 3), cfg, "cpu", gen)
    assert a[0].shape == (2, 3, 8) and a[1].shape == (2, 3, 8)
    assert not torch.equal(a[0], b[0])  # fresh per call
    assert len({tuple(x.sort().values.tolist()) for x in a[0].flatten(0, 1)}) > 1  # per head
    assert all(len(set(x.tolist())) == 8 and 0 <= min(x) and max(x) < 32 for x in a[0].flatten(0, 1))
    q = torch.randn(1, 2, 256, 8).cumsum(2)
    seeded = lambda seed: PyramidSparseAttention(PSAConfig(block_q=32, block_k=32, seed=seed, dense_fallback=False))  # noqa: E731
    m1, m2 = seeded(4), seeded(4)
    first = m1(q, q, q, (4, 8, 8))
    assert torch.equal(first, m2(q, q, q, (4, 8, 8)))  # same seed, same run
    assert not torch.equal(m1(q, q, q, (4, 8, 8)), first)  # the generator advanced: fresh offsets
    assert not torch.equal(seeded(5)(q, q, q, (4, 8, 8)), first)  # another seed, other offsets
