"""VMoBA against an oracle that works on (t, h, w) coordinates directly: block ids from coordinates,
mean keys by masked averaging, selection by explicit loops, dense masked fp64 attention."""

from __future__ import annotations

import math

import pytest
import torch

from vzoo.vmoba import VMoBAConfig, vmoba_attention, vmoba_permutation

GRID = (4, 4, 6)
CFG = dict(temporal_block=(2,), spatial_block=(2, 3), cube_block=(2, 2, 3))


def _block_ids(grid, block):
    t, h, w = grid
    st, sh, sw = (s or n for s, n in zip(block, grid))
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    ids = (tt // st) * (h // sh) * (w // sw) + (hh // sh) * (w // sw) + ww // sw
    return ids.flatten(), (t // st) * (h // sh) * (w // sw)


def _oracle_mask(q, k, ids, nb, topk=None, tau=None, pool="head_global"):
    """[B, H, S, Nb] bool, by loops."""
    b, h, s, _ = q.shape
    means = torch.stack([k[:, :, ids == j].double().mean(2) for j in range(nb)], 2)  # [B, H, Nb, D]
    gate = q.double() @ means.transpose(-1, -2)
    mask = torch.zeros(b, h, s, nb, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            g = gate[bi, hi]
            if topk is not None:
                for i in range(s):
                    order = sorted(range(nb), key=lambda j: (j != ids[i].item(), -g[i, j].item()))
                    mask[bi, hi, i, order[:topk]] = True
                continue
            pools = [[(i, j) for i in range(s) for j in range(nb)]] if pool == "head_global" else [[(i, j) for j in range(nb)] for i in range(s)]
            for entries in pools:
                vals = {e: g[e].item() for e in entries}
                lo, hi_ = min(vals.values()), max(vals.values())
                norm = {e: (v - lo) / (hi_ - lo) for e, v in vals.items()}
                total = sum(norm.values())
                own = [e for e in entries if e[1] == ids[e[0]].item()]
                for e in own:
                    mask[bi, hi][e] = True
                remain = max(0.0, tau - sum(norm[e] for e in own) / total)
                rest = sorted((e for e in entries if e not in own), key=lambda e: -norm[e])
                acc = 0.0
                for e in rest:
                    mask[bi, hi][e] = True
                    acc += norm[e]
                    if acc / total >= remain:
                        break
    return mask


def _oracle_attention(q, k, v, token_mask):
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(logits.masked_fill(~token_mask, float("-inf")), -1) @ v.double()


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_matches_coordinate_oracle_with_gradients(layer, mode):
    torch.manual_seed(layer)
    config = VMoBAConfig(**CFG, mode=mode, topk=(1, 3, 4), tau=0.3)
    s = math.prod(GRID)
    q, k, v = (torch.randn(2, 2, s, 8, requires_grad=True) for _ in range(3))
    ids, nb = _block_ids(GRID, config.block(layer, GRID))
    kw = dict(topk=config.topk[layer % 3]) if mode == "topk" else dict(tau=0.3)
    mask = _oracle_mask(q.detach(), k.detach(), ids, nb, **kw)
    want = _oracle_attention(q, k, v, mask[..., ids])
    got, density, dense = vmoba_attention(q, k, v, GRID, layer, config, return_density=True, dense_fallback=False)
    assert density == pytest.approx(mask.double().mean().item()) and not dense
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    up = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), up), torch.autograd.grad(want, (q, k, v), up.double())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_query_head_pool_and_gqa():
    torch.manual_seed(7)
    s = math.prod(GRID)
    q = torch.randn(1, 4, s, 8)
    k, v = (torch.randn(1, 2, s, 8) for _ in range(2))
    config = VMoBAConfig(**CFG, mode="threshold", tau=0.5, pool="query_head")
    ids, nb = _block_ids(GRID, config.block(2, GRID))
    kx, vx = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    mask = _oracle_mask(q, kx, ids, nb, tau=0.5, pool="query_head")
    want = _oracle_attention(q, kx, vx, mask[..., ids]).float()
    torch.testing.assert_close(vmoba_attention(q, k, v, GRID, 2, config, dense_fallback=False), want, atol=1e-5, rtol=1e-5)


def test_full_selection_is_dense_attention():
    torch.manual_seed(8)
    s = math.prod(GRID)
    q, k, v = (torch.randn(1, 2, s, 16) for _ in range(3))
    config = VMoBAConfig(**CFG, topk=(2, 4, 8))  # every block of every layer type
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for layer in range(3):
        torch.testing.assert_close(vmoba_attention(q, k, v, GRID, layer, config, dense_fallback=False), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(tau=0.0), "tau"),
        (dict(tau=1.5), "tau"),
        (dict(mode="global"), "mode"),
        (dict(pool="block"), "pool"),
        (dict(spatial_block=(2, 0)), "spatial_block"),
        (dict(cube_block=(True, 2, 2)), "cube_block"),
        (dict(dense_fallback=1), "dense_fallback"),
        (dict(topk=(1, 2)), "topk"),
        (dict(dense_warmup=2.0), "dense_warmup"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"VMoBAConfig.{field}"):
        VMoBAConfig(**kwargs)


def test_automatic_blocks_follow_the_grid():
    config = VMoBAConfig()
    assert [config.block(i, (16, 32, 32)) for i in range(3)] == [(2, 0, 0), (0, 8, 8), (4, 8, 8)]
    assert [config.block(i, (21, 30, 52)) for i in range(3)] == [(3, 0, 0), (0, 6, 13), (7, 6, 13)]
    # prime axes: no divisor near the target, so blocks of the target size with a shorter last one
    assert [config.block(i, (13, 29, 53)) for i in range(3)] == [(1, 0, 0), (0, 7, 13), (3, 7, 13)]
    assert config.block(2, (4, 4, 6)) == (4, 4, 6)  # small grids: blocks grow to >= 64 tokens


def test_prime_grid_keeps_the_gate_small():
    """13x29x53 = 19981 tokens: blocks of 1 token would make an S x S fp32 gate (1.6 GB per head);
    automatic blocks keep at most 5 x 5 x 5 = 125 key blocks, and the call runs within that memory."""
    grid, config = (13, 29, 53), VMoBAConfig(topk=(1, 1, 1))
    s = math.prod(grid)
    for layer in range(3):
        slots, block_n = vmoba_permutation(grid, config.block(layer, grid))
        assert block_n >= 273 and slots.numel() // block_n <= 125
        assert sorted(slots[slots >= 0].tolist()) == list(range(s))  # every token exactly once
    q = torch.randn(1, 1, s, 4)
    out, density, dense = vmoba_attention(q, q, q, grid, 2, config, return_density=True, dense_fallback=False)
    assert out.shape == q.shape and torch.isfinite(out).all() and not dense
    assert density < 0.02  # own block only: about 1/125 of the keys


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_ragged_blocks_match_the_coordinate_oracle(layer, mode):
    """Sizes that do not divide the axes (5x5x7 grid): the last block along an axis is shorter, its
    mean key averages its real tokens only, and padding never reaches a query."""
    torch.manual_seed(10 + layer)
    grid = (5, 5, 7)
    config = VMoBAConfig(temporal_block=(2,), spatial_block=(2, 3), cube_block=(2, 2, 3), mode=mode, topk=(2, 3, 5), tau=0.3)
    s = math.prod(grid)
    q, k, v = (torch.randn(1, 2, s, 8) for _ in range(3))
    st, sh, sw = (b or n for b, n in zip(config.block(layer, grid), grid))
    tt, hh, ww = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    nh, nw = -(-grid[1] // sh), -(-grid[2] // sw)
    ids = ((tt // st) * nh * nw + (hh // sh) * nw + ww // sw).flatten()
    nb = int(ids.max()) + 1
    kw = dict(topk=config.topk[layer]) if mode == "topk" else dict(tau=0.3)
    mask = _oracle_mask(q, k, ids, nb, **kw)
    want = _oracle_attention(q, k, v, mask[..., ids]).float()
    torch.testing.assert_close(vmoba_attention(q, k, v, grid, layer, config, dense_fallback=False), want, atol=1e-5, rtol=1e-5)


def test_dense_fallback_above_break_even():
    torch.manual_seed(9)
    s = math.prod(GRID)
    q, k, v = (torch.randn(1, 2, s, 16) for _ in range(3))
    config = VMoBAConfig(**CFG, topk=(2, 4, 8))  # everything selected: density 1 > break-even
    out, lse, density, dense = vmoba_attention(q, k, v, GRID, 2, config, return_lse=True, return_density=True)
    assert density == 1.0 and dense
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 4, -1), atol=1e-5, rtol=1e-5)


def test_triton_path_matches_torch_path_with_gradients():
    """The CUDA default (the tile-union Triton kernels; the interpreter on CPU) against the CPU default
    (per key block), both exact."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(3)
    s = math.prod(GRID)
    config = VMoBAConfig(**CFG, mode="threshold", tau=0.3)
    q, k, v = (torch.randn(1, 2, s, 16, requires_grad=True) for _ in range(3))
    ref = vmoba_attention(q, k, v, GRID, 2, config, backend="torch", dense_fallback=False)
    up = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (q, k, v), up)
    qd, kd, vd = (x.detach().to(dev).requires_grad_() for x in (q, k, v))
    got = vmoba_attention(qd, kd, vd, GRID, 2, config, backend="triton", dense_fallback=False)
    torch.testing.assert_close(got.cpu(), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (qd, kd, vd), up.to(dev)), grads_ref):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5)
