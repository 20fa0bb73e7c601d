"""Local Linear Attention, streamed three-pass form (FlashLLA; Zuo et al., arXiv 2510.01450).

The algorithm of ``flashlla/ops/forward.py`` and ``flashlla/ops/cg.py`` (github.com/Yifei-Zuo/FlashLLA)
in plain PyTorch, vectorised over all queries and heads, with the keys streamed in tiles of
``chunk_size``:

1. one pass with an online row max accumulates ``omega_i``, ``mu~_i = sum_j w_ij k_j`` and the Jacobi
   diagonal of ``Sigma_i``;
2. conjugate gradients solve ``Sigma_i rho_i = mu_i`` (``mu_i = mu~_i - omega_i q_i``); every
   matrix-vector product ``Sigma_i p = sum_j w_ij (p.k_j) k_j - (p.q_i) mu~_i - (p.mu~_i) q_i
   + omega_i (p.q_i) q_i + lambda omega_i p`` is one more streamed pass over the key tiles;
3. a last pass accumulates ``o_i = sum_j w_ij (1 - rho_i.(k_j - q_i)) v_j / delta_i``.

No ``D x D`` matrix per query and no ``Tq x Tk`` matrix is formed: the forward holds Theta((Tq + Tk) D)
plus one ``[Tq, chunk_size]`` weight tile per head. Under causality a key tile is only applied to the
queries that can see it.

Gradients: autograd through passes 1 and 3, and through ``rho`` by implicit differentiation (the
backward of the solve is one more CG solve with ``Sigma_i``, as in the reference backward), so the
gradient is that of the solved system, not of the truncated CG iterations. Autograd keeps the weight
tiles of passes 1 and 3 and of one residual pass, so training memory is Theta(Tq Tk) per head (there
is no hand-written tiled backward).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ..layout import check_int

__all__ = ["check_stream_options", "lla_chunk"]


def check_stream_options(cg_max_iters: object, cg_tol: object, chunk_size: object) -> None:
    """``ValueError`` naming the argument unless ``cg_max_iters`` is an int >= 0, ``cg_tol`` a number >= 0
    and ``chunk_size`` an int >= 1."""
    check_int("cg_max_iters", cg_max_iters, 0)
    check_int("chunk_size", chunk_size, 1)
    if isinstance(cg_tol, bool) or not isinstance(cg_tol, numbers.Real) or not cg_tol >= 0:
        raise ValueError(f"cg_tol={cg_tol!r} must be a number >= 0")


@dataclass
class _Problem:
    """The per-query quantities of one LLA problem, in the compute dtype; queries are grouped per kv head:
    ``q [B, Hkv, G, Tq, D]``, keys ``k [B, Hkv, 1, Tk, D]``."""

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    ridge: float
    shift: int  # Tk - Tq: query i sits at key position i + shift (used when causal)
    causal: bool
    key_mask: torch.Tensor | None  # [B, 1, 1, 1, Tk]
    chunk: int
    nb: int  # diagonal sub-blocks of Sigma
    m: torch.Tensor | None = None  # [B, Hkv, G, Tq, 1] final row max (detached)
    omega: torch.Tensor | None = None  # [B, Hkv, G, Tq, 1]
    mu_t: torch.Tensor | None = None  # [B, Hkv, G, Tq, D]

    def tiles(self):
        """Yield ``(i0, a, e)``: key tile ``[a, e)`` and the first query row ``i0`` that can see it."""
        tk = self.k.shape[-2]
        for a in range(0, tk, self.chunk):
            i0 = max(0, a - self.shift) if self.causal else 0
            yield i0, a, min(a + self.chunk, tk)

    def scores(self, i0: int, a: int, e: int) -> torch.Tensor:
        """``s q_i.k_j`` for rows ``i >= i0`` and keys ``[a, e)``, hidden keys at -inf: ``[B, Hkv, G, Tq - i0, e - a]``."""
        s = (self.q[..., i0:, :] @ self.k[..., a:e, :].transpose(-1, -2)) * self.scale
        keep = None
        if self.causal and e - 1 > i0 + self.shift:  # the tile crosses the diagonal
            rows = torch.arange(i0, self.q.shape[-2], device=s.device)
            keep = torch.arange(a, e, device=s.device)[None, :] <= rows[:, None] + self.shift
        if self.key_mask is not None:
            km = self.key_mask[..., a:e]
            keep = km if keep is None else keep & km
        return s if keep is None else s.masked_fill(~keep, float("-inf"))

    def weights(self, i0: int, a: int, e: int) -> torch.Tensor:
        return torch.exp(self.scores(i0, a, e) - self.m[..., i0:, :])

    def blockdot(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per sub-block dot products ``[..., D]`` x ``[..., D]`` -> ``[..., D]`` (each block's dot repeated over it)."""
        shape = (self.nb, x.shape[-1] // self.nb)
        return (x * y).unflatten(-1, shape).sum(-1, keepdim=True).expand(*x.shape[:-1], *shape).flatten(-2)

    def matvec(self, p: torch.Tensor) -> torch.Tensor:
        """``Sigma_i p_i`` for every query, streamed over the key tiles (no ``D x D`` matrix)."""
        d = p.shape[-1]
        bs = d // self.nb
        acc = torch.zeros_like(p)
        for i0, a, e in self.tiles():
            w = self.weights(i0, a, e)
            kb = self.k[..., a:e, :].unflatten(-1, (self.nb, bs)).movedim(-2, -3)  # [B, Hkv, 1, nb, t, bs]
            pb = p[..., i0:, :].unflatten(-1, (self.nb, bs)).movedim(-2, -3)  # [B, Hkv, G, nb, Tq', bs]
            acc[..., i0:, :] += ((w.unsqueeze(-3) * (pb @ kb.transpose(-1, -2))) @ kb).movedim(-3, -2).flatten(-2)
        pq = self.blockdot(p, self.q)
        pm = self.blockdot(p, self.mu_t)
        return acc - pq * self.mu_t - pm * self.q + self.omega * pq * self.q + (self.ridge * self.omega) * p


def _pass1(pr: _Problem, want_diag: bool) -> torch.Tensor | None:
    """Online-max pass: fills ``pr.m``, ``pr.omega``, ``pr.mu_t``; returns diag(Sigma_i) ``[..., Tq, D]`` if asked."""
    q, k = pr.q, pr.k
    shape = q.shape[:-1] + (1,)
    m = torch.full(shape, float("-inf"), dtype=q.dtype, device=q.device)
    omega = torch.zeros(shape, dtype=q.dtype, device=q.device)
    mu_t = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    ksq = torch.zeros(q.shape, dtype=q.dtype, device=q.device) if want_diag else None
    for i0, a, e in pr.tiles():
        s = pr.scores(i0, a, e)
        m_old = m[..., i0:, :]
        m_new = torch.maximum(m_old, s.detach().amax(-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with no key yet
        w = torch.exp(s - m_safe)
        alpha = torch.exp(m_old - m_safe)
        kt = k[..., a:e, :]
        omega = torch.cat([omega[..., :i0, :], omega[..., i0:, :] * alpha + w.sum(-1, keepdim=True)], -2)
        mu_t = torch.cat([mu_t[..., :i0, :], mu_t[..., i0:, :] * alpha + w @ kt], -2)
        if want_diag:
            ksq[..., i0:, :] = ksq[..., i0:, :] * alpha + w.detach() @ (kt * kt).detach()
        m = torch.cat([m[..., :i0, :], m_new], -2)
    pr.m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    pr.omega, pr.mu_t = omega, mu_t
    if not want_diag:
        return None
    qd, mtd, od = q.detach(), mu_t.detach(), omega.detach()
    diag = ksq - 2 * mtd * qd + od * qd * qd + pr.ridge * od
    return torch.where(diag > 0, diag, torch.ones_like(diag))


def _cg(pr: _Problem, rhs: torch.Tensor, diag: torch.Tensor | None, max_iters: int, tol: float) -> torch.Tensor:
    """(Jacobi-preconditioned) conjugate gradients for ``Sigma_i x_i = rhs_i``, one system per query, run
    together; a row stops when ``|r_i| <= tol |rhs_i|``, all stop when every row has (one host sync per
    iteration). No autograd."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    bound = tol * rhs.norm(dim=-1, keepdim=True)
    active = rhs.norm(dim=-1, keepdim=True) > 0
    z = r if diag is None else r / diag
    p = z.clone()
    rz = (r * z).sum(-1, keepdim=True)
    zero = torch.zeros_like(rz)
    for _ in range(max_iters):
        if not bool(active.any()):
            break
        ap = pr.matvec(p)
        pap = (p * ap).sum(-1, keepdim=True)
        ok = active & (pap > 0)
        alpha = torch.where(ok, rz / torch.where(ok, pap, torch.ones_like(pap)), zero)
        x = x + alpha * p
        r = r - alpha * ap
        active = ok & (r.norm(dim=-1, keepdim=True) > bound)
        z = r if diag is None else r / diag
        rz_new = (r * z).sum(-1, keepdim=True)
        beta = torch.where(active & (rz > 0), rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), zero)
        p = z + beta * p
        rz = rz_new
    return x


class _ImplicitSolve(torch.autograd.Function):
    """Zero in the forward; its backward maps ``g`` to ``Sigma^-1 g`` (a CG solve). Added to the solved
    ``rho`` as ``rho + _ImplicitSolve(mu - Sigma rho)`` it makes ``d rho = Sigma^-1 (d mu - d Sigma rho)``,
    the derivative of the exact solution (``Sigma`` is symmetric)."""

    @staticmethod
    def forward(ctx, residual, solve):
        ctx.solve = solve
        return torch.zeros_like(residual)

    @staticmethod
    def backward(ctx, grad):
        with torch.no_grad():
            return ctx.solve(grad), None


def lla_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ridge: float,
    scale: float,
    causal: bool,
    cg_max_iters: int,
    cg_tol: float,
    block_size: int,
    chunk_size: int,
    key_mask: torch.Tensor | None = None,
    delta_eps: float = 1e-12,
    precondition: bool = False,
) -> torch.Tensor:
    """Streamed LLA of checked inputs (:func:`..naive.check_inputs`, which also resolves ``scale`` and
    ``block_size``, and :func:`check_stream_options`): ``q [B, H, Tq, D]``, ``k [B, Hkv, Tk, D]``, ``v [B,
    Hkv, Tk, Dv]`` -> ``[B, H, Tq, Dv]`` in ``q.dtype`` (math in float32, float64 for float64 inputs).
    Arguments as in :func:`vzoo.kernels.lla.local_linear_attention`."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = h // hkv
    if tk == 0:
        return q.new_zeros(b, h, tq, v.shape[-1])
    qc = q.to(ct).view(b, hkv, g, tq, d)
    kc = k.to(ct).unsqueeze(2)
    vc = v.to(ct).unsqueeze(2)
    km = None
    if key_mask is not None:  # hidden keys get zero weight; zeroed, whatever they hold cannot leak (0 * NaN)
        km = key_mask[:, None, None, None, :]
        hide = ~key_mask[:, None, None, :, None]
        kc, vc = kc.masked_fill(hide, 0), vc.masked_fill(hide, 0)
    pr = _Problem(qc, kc, scale, ridge, tk - tq, causal, km, chunk_size, d // block_size)
    diag = _pass1(pr, precondition)
    mu = pr.mu_t - pr.omega * qc
    grad = torch.is_grad_enabled() and (qc.requires_grad or kc.requires_grad)
    fixed = _Problem(qc.detach(), kc.detach(), scale, ridge, tk - tq, causal, km, chunk_size, pr.nb,
                     pr.m, pr.omega.detach(), pr.mu_t.detach())

    def solve(rhs: torch.Tensor) -> torch.Tensor:
        return _cg(fixed, rhs, diag, cg_max_iters, cg_tol)

    with torch.no_grad():
        rho = solve(mu.detach())
    if grad:
        rho = rho + _ImplicitSolve.apply(mu - pr.matvec(rho), solve)
    delta = pr.omega - (mu * rho).sum(-1, keepdim=True)
    delta = delta + delta_eps * torch.where(delta >= 0, 1.0, -1.0).to(ct)
    rq = (rho * qc).sum(-1, keepdim=True)
    out = torch.zeros(b, hkv, g, tq, v.shape[-1], dtype=ct, device=q.device)
    for i0, a, e in pr.tiles():
        w = pr.weights(i0, a, e)
        coef = w * (1 + rq[..., i0:, :] - rho[..., i0:, :] @ kc[..., a:e, :].transpose(-1, -2))
        out[..., i0:, :] += coef @ vc[..., a:e, :]
    return (out / delta).reshape(b, h, tq, -1).to(q.dtype)
