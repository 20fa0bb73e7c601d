"""routing_attention (Routing Transformer, causal per completed segment) against per-query loop oracles: cluster
assignment, outputs and gradients (float64), GQA, several query clusters, null key/value, Tq < Tk, lengths that are
not a multiple of the segment, causality by perturbation, reference vs torch backend, input checks."""

from __future__ import annotations

import math

import pytest
import torch

from vzoo.kernels import routing_attention
from vzoo.kernels.routing import routing_assignment

F64 = torch.float64


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


def oracle_assignment(centroids, rq, rk, window, segment, query_clusters):
    """Loops: members[b][h][(c, s)] = sorted positions of the window keys of complete segment s nearest to
    centroid c; chosen[b][h][i] = the query_clusters nearest centroids, best first."""
    b_, h_, tq, _ = rq.shape
    g_, tk = rk.shape[1], rk.shape[2]
    c_ = centroids.shape[1]
    members, chosen = {}, {}
    for b in range(b_):
        for h in range(h_):
            g = h // (h_ // g_)
            mu = [unit(centroids[h, c]) for c in range(c_)]
            for s in range(tk // segment):
                for c in range(c_):
                    pos = list(range(s * segment, (s + 1) * segment))
                    score = {j: float(unit(rk[b, g, j]) @ mu[c]) for j in pos}
                    members[b, h, c, s] = sorted(sorted(pos, key=lambda j: -score[j])[:window])
            for i in range(tq):
                score = [float(unit(rq[b, h, i]) @ mu[c]) for c in range(c_)]
                chosen[b, h, i] = sorted(range(c_), key=lambda c: -score[c])[:query_clusters]
    return members, chosen


def oracle(q, k, v, centroids, window, segment, null_k=None, null_v=None, query_clusters=1, rq=None, rk=None):
    """Per query, per chosen cluster: softmax over [null] + the cluster's keys of earlier segments; average."""
    rq = q if rq is None else rq
    rk = k if rk is None else rk
    b_, h_, tq, d = q.shape
    g_, tk = k.shape[1], k.shape[2]
    members, chosen = oracle_assignment(centroids.detach(), rq.detach(), rk.detach(), window, segment, query_clusters)
    out = [[[None] * tq for _ in range(h_)] for _ in range(b_)]
    for b in range(b_):
        for h in range(h_):
            g = h // (h_ // g_)
            for i in range(tq):
                s = (i + tk - tq) // segment
                acc = torch.zeros(v.shape[-1], dtype=q.dtype)
                for c in chosen[b, h, i]:
                    keys = [j for s2 in range(s) for j in members[b, h, c, s2]]
                    logits = [q[b, h, i] @ k[b, g, j] / math.sqrt(d) for j in keys]
                    vals = [v[b, g, j] for j in keys]
                    if null_k is not None:
                        logits.append(q[b, h, i] @ null_k[h, c] / math.sqrt(d))
                        vals.append(null_v[h, c])
                    if logits:
                        p = torch.softmax(torch.stack(logits), 0)
                        acc = acc + (p[:, None] * torch.stack(vals)).sum(0)
                out[b][h][i] = acc / query_clusters
    return torch.stack([torch.stack([torch.stack(row) if row else q.new_zeros(0, v.shape[-1]) for row in heads])
                        for heads in out])


def make(b=1, h=4, g=2, tq=23, tk=23, d=6, dv=5, c=3, seed=0, dtype=F64, grad=False):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return dict(q=rnd(b, h, tq, d), k=rnd(b, g, tk, d), v=rnd(b, g, tk, dv), centroids=rnd(h, c, d).detach(),
                null_k=rnd(h, c, d), null_v=rnd(h, c, dv))


CASES = [  # (shape kwargs, window, segment, query_clusters, with null)
    (dict(), 2, 4, 1, True),                      # GQA, T not a multiple of the segment
    (dict(g=4, tq=17, tk=29), 3, 5, 2, True),     # Tq < Tk, two clusters per query
    (dict(g=1, h=2, tk=20, tq=20), 4, 4, 1, False),  # window == segment, no null: first segment gives zeros
    (dict(b=2, h=2, g=1, c=4, tq=9, tk=26), 1, 6, 3, False),
]


@pytest.mark.parametrize("shape,window,segment,qc,null", CASES)
def test_assignment_matches_loops(shape, window, segment, qc, null):
    t = make(**shape)
    key_idx, q_cl = routing_assignment(t["centroids"], t["q"], t["k"], window=window, segment=segment,
                                       query_clusters=qc)
    members, chosen = oracle_assignment(t["centroids"], t["q"], t["k"], window, segment, qc)
    b_, h_, c_, n, w = key_idx.shape
    assert (n, w) == (t["k"].shape[2] // segment, window)
    for (b, h, c, s), pos in members.items():
        assert key_idx[b, h, c, s].tolist() == pos
    for (b, h, i), cl in chosen.items():
        assert q_cl[b, h, i].tolist() == cl


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("shape,window,segment,qc,null", CASES)
def test_forward_matches_loops(backend, shape, window, segment, qc, null):
    t = make(**shape)
    nk, nv = (t["null_k"], t["null_v"]) if null else (None, None)
    out = routing_attention(t["q"], t["k"], t["v"], t["centroids"], window=window, segment=segment, null_k=nk,
                            null_v=nv, query_clusters=qc, backend=backend)
    ref = oracle(t["q"], t["k"], t["v"], t["centroids"], window, segment, nk, nv, qc)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    first = segment - (t["k"].shape[2] - t["q"].shape[2])  # queries of the first segment see no routed key
    if not null and first > 0:
        assert out[:, :, :first].abs().max() == 0 and out[:, :, first:].abs().max() > 0


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradients_match_loops(backend):
    t = make(tq=14, tk=19, grad=True)
    args = (t["q"], t["k"], t["v"], t["centroids"])
    out = routing_attention(*args, window=2, segment=4, null_k=t["null_k"], null_v=t["null_v"], query_clusters=2,
                            backend=backend)
    ref = oracle(*args, 2, 4, t["null_k"], t["null_v"], 2)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    leaves = [t[n] for n in ("q", "k", "v", "null_k", "null_v")]
    got = torch.autograd.grad((out * w).sum(), leaves)
    want = torch.autograd.grad((ref * w).sum(), leaves)
    for name, a, b in zip(("q", "k", "v", "null_k", "null_v"), got, want):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11, msg=name)


def test_separate_routing_vectors():
    """route_q / route_k decide the clusters; q / k only score."""
    t = make(tq=21, tk=21)
    gen = torch.Generator().manual_seed(9)
    rq, rk = torch.randn(t["q"].shape, generator=gen, dtype=F64), torch.randn(t["k"].shape, generator=gen, dtype=F64)
    kw = dict(window=2, segment=4, null_k=t["null_k"], null_v=t["null_v"])
    out = routing_attention(t["q"], t["k"], t["v"], t["centroids"], route_q=rq, route_k=rk, **kw)
    ref = oracle(t["q"], t["k"], t["v"], t["centroids"], 2, 4, t["null_k"], t["null_v"], 1, rq, rk)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert (out - routing_attention(t["q"], t["k"], t["v"], t["centroids"], **kw)).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_causal_by_perturbation(backend):
    t = make(h=2, g=1, tq=40, tk=40, c=3, seed=3)
    kw = dict(window=2, segment=5, null_k=t["null_k"], null_v=t["null_v"], query_clusters=2, backend=backend)
    base = routing_attention(t["q"], t["k"], t["v"], t["centroids"], **kw)
    for pos in (7, 22):
        q, k, v = (x.clone() for x in (t["q"], t["k"], t["v"]))
        q[:, :, pos:] += 1.5
        k[:, :, pos:] = torch.randn_like(k[:, :, pos:])
        v[:, :, pos:] += 3.0
        moved = routing_attention(q, k, v, t["centroids"], **kw)
        assert torch.equal(moved[:, :, :pos], base[:, :, :pos])
        assert (moved[:, :, pos:] - base[:, :, pos:]).abs().max() > 1e-3


def test_torch_matches_reference_float32_and_bf16():
    t = make(b=2, h=4, g=2, tq=150, tk=200, d=16, dv=16, c=5, seed=4, dtype=torch.float32)
    kw = dict(window=4, segment=16, null_k=t["null_k"], null_v=t["null_v"], query_clusters=2)
    ref = routing_attention(t["q"], t["k"], t["v"], t["centroids"], backend="reference", **kw)
    out = routing_attention(t["q"], t["k"], t["v"], t["centroids"], backend="torch", **kw)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)
    low = routing_attention(*(t[n].bfloat16() for n in ("q", "k", "v")), t["centroids"], window=4, segment=16,
                            query_clusters=2, null_k=t["null_k"].bfloat16(), null_v=t["null_v"].bfloat16(),
                            route_q=t["q"], route_k=t["k"])  # same clusters as float32
    assert low.dtype == torch.bfloat16
    rel = (low.float() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
    assert rel < 3e-2


def test_no_complete_segment_gives_null_value():
    t = make(tq=6, tk=7)
    out = routing_attention(t["q"], t["k"], t["v"], t["centroids"], window=2, segment=8, null_k=t["null_k"],
                            null_v=t["null_v"])
    _, chosen = routing_assignment(t["centroids"], t["q"], t["k"], window=2, segment=8)
    want = t["null_v"][torch.arange(4)[None, :, None], chosen[..., 0]]
    torch.testing.assert_close(out, want, atol=0, rtol=0)


@pytest.mark.parametrize("change,match", [
    (dict(window=5, segment=4), "window=5 must be <= segment=4"),
    (dict(window=0), "window=0"),
    (dict(segment=0), "segment=0"),
    (dict(query_clusters=4), "query_clusters=4"),
    (dict(centroids=torch.randn(4, 3, 5, dtype=F64)), "centroids has shape"),
    (dict(null_k=None), "both null_k and null_v"),
    (dict(null_v=torch.randn(4, 3, 6, dtype=F64)), "null_v"),
    (dict(k=torch.randn(1, 3, 23, 6, dtype=F64)), "multiple of G"),
    (dict(q=torch.randn(1, 4, 30, 6, dtype=F64)), "more than the 23 keys"),
    (dict(route_q=torch.randn(1, 4, 23, 5, dtype=F64)), "route_q has shape"),
    (dict(backend="triton"), "does not implement"),
])
def test_bad_input(change, match):
    t = make()
    kw = dict(q=t["q"], k=t["k"], v=t["v"], centroids=t["centroids"], window=2, segment=4, null_k=t["null_k"],
              null_v=t["null_v"])
    kw.update(change)
    with pytest.raises((ValueError, RuntimeError), match=match):
        routing_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("centroids"), **kw)
