"""Pyramid Sparse Attention against a loop oracle: importance, levels and similarity cap by loops,
attention as one dense softmax over the concatenation of all pyramid levels with a +ln(p) bias."""

from __future__ import annotations

import math

import pytest
import torch

from vzoo.gilbert import gilbert_order
from vzoo.psa import PSAConfig, psa_attention, psa_levels


def _oracle_levels(q, k, cfg, scale):
    b, h, s, _ = q.shape
    bq, bk = cfg.block_q, cfg.block_k
    nqb, nkb = -(-s // bq), -(-s // bk)
    gen = torch.Generator().manual_seed(cfg.seed)
    off_q = sorted(torch.randperm(bq, generator=gen)[: bq // 4].tolist())
    off_k = sorted(torch.randperm(bk, generator=gen)[: bk // 4].tolist())
    levels = torch.zeros(b, h, nqb, nkb, dtype=torch.long)
    for bi in range(b):
        for hi in range(h):
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
                order = sorted(range(nkb), key=lambda j: -score[i, j].item())
                before = 0.0
                for rank, j in enumerate(order):
                    if cfg.mode == "threshold":
                        lvl = next((n for n, t in enumerate(cfg.thresholds, 1) if before < t - 1e-12), 0)
                    else:
                        edges = [round(sum(cfg.quantiles[:n]) * nkb) for n in range(1, 5)]
                        lvl = next((n for n, e in enumerate(edges, 1) if rank < e), 0)
                    if rank < math.ceil(cfg.min_full * nkb):
                        lvl = 1
                    if lvl and cfg.sim_cap is not None:
                        keys = [k[bi, hi, min(j * bk + t, s - 1)].double() for t in range(bk)]
                        cap = 1
                        for level, c in zip((2, 3, 4), cfg.sim_cap):
                            gap = 2 ** (level - 2)
                            sims = [torch.cosine_similarity(keys[t], keys[t + gap], dim=0).item() for t in range(bk - gap)]
                            if sum(sims) / len(sims) <= c:
                                break
                            cap = level
                        lvl = min(lvl, cap)
                    levels[bi, hi, i, j] = lvl
                    before += score[i, j].item()
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
    levels = _oracle_levels(qo, ko, cfg, scale)
    assert torch.equal(psa_levels(qo, ko, cfg, scale), levels)
    assert len(levels.unique()) >= 3, levels.unique()  # several pyramid levels really in use
    qr, kr, vr = (x[:, :, perm] for x in (q, k, v))
    want = torch.empty(1, 2, s, 8, dtype=torch.float64).index_copy(2, perm, _oracle_attention(qr, kr, vr, levels, cfg, scale))
    got, density = psa_attention(q, k, v, grid, cfg, return_density=True)
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
    out, density = psa_attention(q, k, v, (4, 8, 8), cfg, return_density=True)
    assert density == 1.0
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
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"PSAConfig.{field}"):
        PSAConfig(**kwargs)



def test_presets_and_grid_check():
    assert PSAConfig.preset("balanced").thresholds == (0.5, 0.6, 0.7, 0.8)
    assert PSAConfig.preset("wan2.2-5b", seed=3).block_k == 32
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
    levels = _oracle_levels(qo, ko, cfg, 0.25)
    assert len(levels.unique()) >= 4
    qr, kr, vr = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    want = torch.empty(1, 2, s, 16, dtype=torch.float64).index_copy(2, perm, _oracle_attention(qr[:, :, perm], kr[:, :, perm], vr[:, :, perm], levels, cfg, 0.25))
    got = psa_attention(q, k, v, grid, cfg, backend="triton")
    torch.testing.assert_close(got.cpu(), want.float(), atol=1e-5, rtol=1e-5)
    up = torch.randn(got.shape)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), up.to(dev)), torch.autograd.grad(want, (qr, kr, vr), up.double())):
        torch.testing.assert_close(a.cpu(), b.float(), atol=1e-5 * b.abs().max().item(), rtol=1e-4)


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
    levels = _oracle_levels(qo, ko, cfg, 0.25)
    assert len(levels.unique()) >= 4
    want = torch.empty(1, 2, s, 16, dtype=torch.float64).index_copy(2, perm, _oracle_attention(qo, ko, vo, levels, cfg, 0.25))
    with torch.no_grad():
        got, lse = psa_attention(q.to(dev), k.to(dev), v.to(dev), grid, cfg, backend="triton", return_lse=True)
    torch.testing.assert_close(got.cpu(), want.float(), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(lse).all()
