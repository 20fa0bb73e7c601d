"""Landmark Attention, tiled PyTorch fast path (the CPU default).

Mohtashami & Jaggi, arXiv 2305.16300; semantics of ``epfml/landmark-attention`` ``lm_benchmark/models/landmark.py``
(``LandmarkGroupedSoftmaxFunction``) and ``llama/llama_mem.py`` (top-k retrieval).

Exact op (``top_k=None``): an autograd function over query tiles of whole groups (``P = block + 1`` tokens; queries
and keys are zero-padded to whole groups). Stage 1 needs only the landmark scores (``q @ k_lm^T``, ``[rows, groups]``)
and the tile's diagonal ``[P, P]`` blocks, so each row's ``lse1`` is known before any past key is scored. Then the
past key groups are scored in chunks (``[rows, chunk groups, P]``, both stages reductions over reshaped dims, only
groups before the tile's last one) and, stage 2 being local to a group, every chunk's weights
``P1_g * P2_g(p) = exp(s_lm(g) - lse1) * exp(s_p - lse2_g)`` are final at once: no online rescaling. The forward
keeps ``lse1 [rows]`` and ``lse2 [rows, groups]``; the backward recomputes the scores chunk by chunk. Gradient
(``dA = dO . v``, ``a_g = sum_p P2_g(p) dA_p``, ``beta = dO . out``): a past regular key gets
``dS = P1_g P2_g(p) (dA_p - a_g)``, a past landmark ``dS = P1_g (a_g - beta)``, a current key
``dS = P1_p (dA_p - beta)``.

Top-k retrieval (``top_k=int``): per query, the landmark scores of all complete groups (``[Tk / P]``), then
``top_k`` far groups, the ``local_blocks`` nearest past groups and the current group are gathered (``[slots, P]``
keys) and the grouped softmax runs on those: ``O(Tk * D / P + slots * P * D)`` per query. Differentiable by plain
autograd, which keeps the gathered keys and values (``Tq * slots * P * (D + Dv)`` per head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["landmark_exact", "landmark_topk"]

# Query rows (heads sharing a kv head times tokens) per tile of the exact op, rounded down to whole groups.
_TILE_ROWS = 512
# Keys per chunk of past groups scored at once against a query tile, rounded down to whole groups.
_KEY_COLS = 2048
# Gathered key elements per chunk of queries in the top-k path.
_GATHER_ELEMS = 1 << 22

_NEG = float("-inf")


class _Plan:
    """Padding and tiling of ``Tq`` queries (the last ones of ``Tk`` positions) into whole groups."""

    def __init__(self, tq: int, tk: int, block: int, r: int):
        self.period = period = block + 1
        self.block = block
        self.c0 = (tk - tq) // period  # first query group
        self.front = tk - tq - self.c0 * period  # padded query rows before the first query
        self.ng = -(-tk // period)  # key groups (the last may be incomplete)
        self.rows = (self.ng - self.c0) * period  # padded query rows
        self.gt = max(1, _TILE_ROWS // (r * period))  # query groups per tile
        self.gk = max(1, _KEY_COLS // period)  # key groups per chunk
        p = torch.arange(period)
        self.cur_ok = (p[None, :] <= p[:, None]) & (p[None, :] < block)  # [Pq, Pk]

    def tiles(self):
        """``(ga, gt)``: tiles of ``gt`` query groups starting at group ``ga``."""
        for ga in range(self.c0, self.ng, self.gt):
            yield ga, min(self.gt, self.ng - ga)

    def chunks(self, ga: int, gt: int):
        """``(g0, g1)``: chunks of the key groups ``0 .. ga + gt - 2`` (past blocks of some row of the tile)."""
        for g0 in range(0, ga + gt - 1, self.gk):
            yield g0, min(g0 + self.gk, ga + gt - 1)


class _Tile:
    """Stage-1 quantities of a query tile (groups ``ga .. ga + gt - 1``): queries ``q5 [BG, r, gt, P, D]``, the
    probabilities ``p1_lm [BG, r, gt, P, ga + gt]`` of the landmarks (0 off the past blocks) and ``p1_cur
    [BG, r, gt, P, P]`` of the current keys, and the current group's keys ``k_cur [BG, 1, gt, P, D]`` and values."""

    def __init__(self, qs, kp, vp, k_lm, plan: _Plan, ga: int, gt: int, lse1: torch.Tensor | None):
        bg, r, _, d = qs.shape
        period = plan.period
        lo, hi = (ga - plan.c0) * period, (ga - plan.c0 + gt) * period
        self.rows = slice(lo, hi)
        self.q5 = qs[:, :, lo:hi].reshape(bg, r, gt, period, d)
        self.qt = self.q5.reshape(bg, r * (hi - lo), d)
        cols = slice(ga * period, (ga + gt) * period)
        self.k_cur = kp[:, cols].reshape(bg, 1, gt, period, d)
        self.v_cur = vp[:, cols].reshape(bg, 1, gt, period, vp.shape[-1])
        dev = qs.device
        lm = torch.bmm(self.qt, k_lm[:, : ga + gt].transpose(1, 2)).view(bg, r, gt, period, ga + gt)
        future = torch.arange(ga + gt, device=dev) >= torch.arange(ga, ga + gt, device=dev)[:, None]
        lm.masked_fill_(future[:, None, :], _NEG)
        cur = torch.matmul(self.q5, self.k_cur.transpose(-1, -2)).masked_fill_(~plan.cur_ok.to(dev), _NEG)
        if lse1 is None:  # forward: normalise
            m1 = torch.maximum(lm.amax(-1), cur.amax(-1))  # finite: every row has a current key
            lm.sub_(m1[..., None]).exp_()
            cur.sub_(m1[..., None]).exp_()
            z1 = lm.sum(-1) + cur.sum(-1)
            lm.div_(z1[..., None])
            cur.div_(z1[..., None])
            self.lse1 = m1 + z1.log()
        else:
            l1 = lse1[:, :, lo:hi].reshape(bg, r, gt, period, 1)
            lm.sub_(l1).exp_()
            cur.sub_(l1).exp_()
        self.p1_lm, self.p1_cur = lm, cur


class _LandmarkExact(torch.autograd.Function):
    """Exact grouped softmax; inputs in the compute dtype: ``q [B, H, Tq, D]``, ``k [B, G, Tk, D]``,
    ``v [B, G, Tk, Dv]``."""

    @staticmethod
    def forward(ctx, q, k, v, block: int, scale: float):
        b, h, tq, d = q.shape
        g, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
        r, bg = h // g, b * g
        plan = _Plan(tq, tk, block, r)
        period = plan.period
        qs = q.new_zeros(bg, r, plan.rows, d)
        qs[:, :, plan.front : plan.front + tq] = q.reshape(bg, r, tq, d) * scale
        pad = plan.ng * period - tk
        kp = F.pad(k.reshape(bg, tk, d), (0, 0, 0, pad))
        vp = F.pad(v.reshape(bg, tk, dv), (0, 0, 0, pad))
        k_lm = kp.view(bg, plan.ng, period, d)[:, :, block].contiguous()  # [BG, ng, D]
        out = q.new_empty(bg, r, plan.rows, dv)
        lse1 = q.new_empty(bg, r, plan.rows)
        lse2 = q.new_zeros(bg, r, plan.rows, plan.ng)
        for ga, gt in plan.tiles():
            t = _Tile(qs, kp, vp, k_lm, plan, ga, gt, None)
            n = t.rows.stop - t.rows.start
            lse1[:, :, t.rows] = t.lse1.reshape(bg, r, n)
            o = torch.matmul(t.p1_cur, t.v_cur).view(bg, r * n, dv)  # the current section
            p1 = t.p1_lm.view(bg, r * n, ga + gt)
            for g0, g1 in plan.chunks(ga, gt):
                s = torch.bmm(t.qt, kp[:, g0 * period : g1 * period].transpose(1, 2))
                s4 = s.view(bg, r * n, g1 - g0, period)
                reg = s4[..., :block]
                m2 = reg.amax(-1, keepdim=True)
                reg.sub_(m2).exp_()
                z2 = reg.sum(-1, keepdim=True)
                lse2[:, :, t.rows, g0:g1] = (m2 + z2.log()).view(bg, r, n, g1 - g0)
                reg.mul_(p1[..., g0:g1, None] / z2)  # weights P1_g P2_g(p)
                s4[..., block] = 0
                o.baddbmm_(s, vp[:, g0 * period : g1 * period])
            out[:, :, t.rows] = o.view(bg, r, n, dv)
        ctx.save_for_backward(qs, kp, vp, k_lm, out, lse1, lse2)
        ctx.plan, ctx.scale, ctx.shapes = plan, scale, (q.shape, k.shape, v.shape)
        return out[:, :, plan.front : plan.front + tq].reshape(b, h, tq, dv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        qs, kp, vp, k_lm, out, lse1, lse2 = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        (b, h, tq, d), (_, g, tk, _), (*_, dv) = ctx.shapes
        r, bg, period, block = h // g, b * g, plan.period, plan.block
        do = qs.new_zeros(bg, r, plan.rows, dv)
        do[:, :, plan.front : plan.front + tq] = dout.reshape(bg, r, tq, dv)
        dq = torch.empty_like(qs)
        dk, dv_ = torch.zeros_like(kp), torch.zeros_like(vp)
        for ga, gt in plan.tiles():
            t = _Tile(qs, kp, vp, k_lm, plan, ga, gt, lse1)
            n = t.rows.stop - t.rows.start
            do5 = do[:, :, t.rows].reshape(bg, r, gt, period, dv)
            do_t = do5.reshape(bg, r * n, dv)
            beta = (do5 * out[:, :, t.rows].view(bg, r, gt, period, dv)).sum(-1, keepdim=True)
            # the current section: dS = P1 (dA - beta)
            ds = torch.matmul(do5, t.v_cur.transpose(-1, -2)).sub_(beta).mul_(t.p1_cur)
            dq5 = torch.matmul(ds, t.k_cur)
            cols = slice(ga * period, (ga + gt) * period)
            dk[:, cols] += torch.matmul(ds.transpose(-1, -2), t.q5).sum(1).view(bg, n, d)
            dv_[:, cols] += torch.matmul(t.p1_cur.transpose(-1, -2), do5).sum(1).view(bg, n, dv)
            dq_t = dq5.view(bg, r * n, d)
            p1 = t.p1_lm.view(bg, r * n, ga + gt)
            beta = beta.view(bg, r * n, 1)
            for g0, g1 in plan.chunks(ga, gt):
                keys = slice(g0 * period, g1 * period)
                s = torch.bmm(t.qt, kp[:, keys].transpose(1, 2))
                s4 = s.view(bg, r * n, g1 - g0, period)
                p2 = s4[..., :block]
                p2.sub_(lse2[:, :, t.rows, g0:g1].reshape(bg, r * n, g1 - g0, 1)).exp_()
                da = torch.bmm(do_t, vp[:, keys].transpose(1, 2))
                da4 = da.view(bg, r * n, g1 - g0, period)
                dreg = da4[..., :block].mul_(p2)
                a = dreg.sum(-1)  # a_g = sum_p P2 dA, [BG, R, g1 - g0]
                p1c = p1[..., g0:g1]
                dreg.addcmul_(p2, a[..., None], value=-1).mul_(p1c[..., None])
                da4[..., block] = p1c * (a - beta)
                p2.mul_(p1c[..., None])  # s becomes the weights
                s4[..., block] = 0
                dq_t.baddbmm_(da, kp[:, keys])
                dk[:, keys] += torch.bmm(da.transpose(1, 2), t.qt)
                dv_[:, keys] += torch.bmm(s.transpose(1, 2), do_t)
            dq[:, :, t.rows] = dq_t.view(bg, r, n, d)
        dq = (dq[:, :, plan.front : plan.front + tq] * scale).reshape(b, h, tq, d)
        dk = dk[:, :tk].reshape(b, g, tk, d)
        dv_ = dv_[:, :tk].reshape(b, g, tk, dv)
        return dq, dk, dv_, None, None


def landmark_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """Exact grouped softmax (all past blocks); inputs in the compute dtype, ``Tq >= 1``; returns
    ``[B, H, Tq, Dv]``."""
    return _LandmarkExact.apply(q, k, v, block, scale)


def landmark_topk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, top_k: int, local_blocks: int, scale: float,
) -> torch.Tensor:
    """Grouped softmax over retrieved blocks; inputs in the compute dtype, ``Tq >= 1``; returns
    ``[B, H, Tq, Dv]``."""
    b, h, tq, d = q.shape
    g, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
    r, period, dev = h // g, block + 1, q.device
    n_lm = tk // period  # complete groups
    k_lm = k[:, :, block::period][:, :, :n_lm]  # landmark keys [B, G, n_lm, D]
    n_top, n_loc = min(top_k, n_lm), min(local_blocks, n_lm)
    slots = n_top + n_loc + 1
    bi = torch.arange(b, device=dev)[:, None, None, None, None]
    gi = (torch.arange(h, device=dev) // r)[None, :, None, None, None]
    pk = torch.arange(period, device=dev)
    chunk = max(1, _GATHER_ELEMS // (b * h * slots * period * max(d, dv)))
    outs = []
    for a in range(0, tq, chunk):
        n = min(chunk, tq - a)
        qc = q[:, :, a : a + n] * scale
        i = torch.arange(tk - tq + a, tk - tq + a + n, device=dev)
        c = i // period
        loc = c[:, None] - n_loc + torch.arange(n_loc + 1, device=dev)  # [n, n_loc + 1]: local groups, current
        idx = [loc.expand(b, h, n, n_loc + 1)]
        valid = [(loc[:, :n_loc] >= 0).expand(b, h, n, n_loc)]
        if n_top:
            lm_s = torch.matmul(qc.reshape(b, g, r * n, d), k_lm.transpose(-1, -2)).reshape(b, h, n, n_lm)
            far = torch.arange(n_lm, device=dev) < (c - local_blocks)[:, None]
            vals, top = lm_s.detach().masked_fill(~far, _NEG).topk(n_top, dim=-1)
            idx.insert(0, top)
            valid.insert(0, vals > _NEG)
        idx = torch.cat(idx, dim=-1).clamp(min=0)  # [B, H, n, slots]
        valid = torch.cat(valid, dim=-1)  # the past slots, [B, H, n, slots - 1]
        pos = (idx[..., None] * period + pk).clamp(max=tk - 1)  # past the end: hidden keys of the current group
        ks, vs = k[bi, gi, pos], v[bi, gi, pos]  # [B, H, n, slots, P, D | Dv]
        s = torch.matmul(ks.reshape(b, h, n, slots * period, d), qc[..., None]).reshape(b, h, n, slots, period)
        lm = s[..., :-1, block].masked_fill(~valid, _NEG)  # [B, H, n, slots - 1]
        cur_ok = (pk < block) & (pk <= (i - c * period)[:, None])  # [n, P]
        cur = s[..., -1, :].masked_fill(~cur_ok, _NEG)  # [B, H, n, P]
        lse1 = torch.logsumexp(torch.cat([lm, cur], dim=-1), dim=-1, keepdim=True)
        w_past = (lm - lse1).exp()[..., None] * torch.softmax(s[..., :-1, :block], dim=-1)
        w = torch.cat([F.pad(w_past, (0, 1)), (cur - lse1).exp()[..., None, :]], dim=-2)  # [B, H, n, slots, P]
        outs.append(torch.matmul(w.reshape(b, h, n, 1, slots * period), vs.reshape(b, h, n, slots * period, dv)))
    return torch.cat(outs, dim=2).reshape(b, h, tq, dv)
