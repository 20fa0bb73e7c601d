"""Independent ground truth for kernel tests: token masks built with plain loops, softmax in float64.

Nothing here imports vzoo's own mask builders or reference backend, so the backends (the reference one
included) are checked against code that shares none of their logic.
"""

from __future__ import annotations

import pytest
import torch


def loop_mask(kv_num_blocks, kv_indices, block_m, block_n, q_len, kv_len, causal, token_mask=None):
    """bool [B, Hl, Sq, Skv] (on the CPU) from row lists, one query block and one slot at a time."""
    kv_num_blocks, kv_indices = kv_num_blocks.cpu(), kv_indices.cpu()
    token_mask = None if token_mask is None else token_mask.cpu()
    b, h, nqb = kv_num_blocks.shape
    allowed = torch.zeros(b, h, q_len, kv_len, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for r in range(nqb):
                q0, q1 = r * block_m, min((r + 1) * block_m, q_len)
                for s in range(int(kv_num_blocks[bi, hi, r])):
                    j = int(kv_indices[bi, hi, r, s])
                    k0, k1 = j * block_n, min((j + 1) * block_n, kv_len)
                    if token_mask is None:
                        allowed[bi, hi, q0:q1, k0:k1] = True
                    else:
                        for i in range(q0, q1):
                            if token_mask[bi, hi, i, s]:
                                allowed[bi, hi, i, k0:k1] = True
    if causal:
        for i in range(q_len):
            allowed[..., i, max(0, i + kv_len - q_len + 1) :] = False
    return allowed


def window_rule(q_len, kv_len, causal, window, sink):
    """bool [Sq, Skv] by loops: query i at position p = i + kv_len - q_len keeps key j when j > p - window
    or j < sink (and j <= p when causal)."""
    keep = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for i in range(q_len):
        p = i + kv_len - q_len
        for j in range(kv_len):
            keep[i, j] = (j > p - window or j < sink) and (j <= p or not causal)
    return keep


def naive_attention(q, k, v, allowed, scale=None):
    """float64 masked softmax attention on the CPU (differentiable back to inputs on any device);
    empty rows give 0 and -inf. Returns (out, lse)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, allowed = q.cpu(), k.cpu(), v.cpu(), allowed.cpu()
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, 1)
    v = v.double().repeat_interleave(g, 1)
    if allowed.shape[1] not in (1, q.shape[1]):
        allowed = allowed.repeat_interleave(q.shape[1] // allowed.shape[1], 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    z = e.sum(-1, keepdim=True)
    empty = z == 0
    z = torch.where(empty, torch.ones_like(z), z)
    lse = torch.where(empty, float("-inf"), m + torch.log(z)).squeeze(-1)
    p = e / z
    return p @ v, lse


def rel_rms(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.detach().cpu().double(), got.detach().cpu().double()
    return float((ref - got).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12))


def close_or_fail(ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """fla's rule: ``out`` has ``ref``'s shape, no NaN, and max |diff| <= 1e-6 or relative RMS error < ``ratio``."""
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    assert not torch.isnan(out.detach()).any(), "NaN in the result"
    diff = float((ref.detach().cpu().double() - out.detach().cpu().double()).abs().max()) if ref.numel() else 0.0
    rel = rel_rms(ref, out) if ref.numel() else 0.0
    assert diff <= 1e-6 or rel < ratio, f"max |diff| {diff:.3g} > 1e-6 and relative RMS error {rel:.3g} >= {ratio}"


@pytest.fixture(scope="session")
def assert_close():
    """``assert_close(ref, out, ratio)``: fla's closeness rule (:func:`close_or_fail`)."""
    return close_or_fail


@pytest.fixture
def spy(monkeypatch):
    """``calls = spy(module, "f", "g")`` wraps those functions of ``module`` for this test: each call
    appends its name to ``calls`` (in call order), then runs the function."""
    calls: list[str] = []

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return recorded

    def install(module, *names: str) -> list[str]:
        for name in names:
            monkeypatch.setattr(module, name, wrap(name, getattr(module, name)))
        return calls

    return install


# Where the Triton backend runs: the GPU when there is one, else the CPU under TRITON_INTERPRET=1.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def triton_device() -> str:
    return TRITON_DEVICE


@pytest.fixture(scope="session")
def oracle():
    """The independent ground-truth helpers, as a namespace."""

    class Oracle:
        mask = staticmethod(loop_mask)
        window = staticmethod(window_rule)

        @staticmethod
        def layout_mask(layout, token_mask=None, causal=False):
            return loop_mask(layout.kv_num_blocks, layout.kv_indices, layout.block_m, layout.block_n,
                             layout.q_len, layout.kv_len, causal, token_mask)
        attention = staticmethod(naive_attention)
        rel_rms = staticmethod(rel_rms)

    return Oracle
