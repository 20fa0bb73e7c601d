"""The break-even rule (kernels/break_even.py) and the dense call methods fall back to."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from vzoo.kernels import break_even, dense_is_faster
from vzoo.kernels.break_even import BREAK_EVEN, dense_attention_lse
from vzoo.kernels.reference import dense_attention


def test_rule_reads_the_table_per_device_type_and_op():
    with mock.patch.dict(BREAK_EVEN, {("cuda", "psa"): 0.9}):  # the index of "cuda:1" is dropped
        assert break_even("cuda:1", "psa") == break_even(torch.device("cuda", 1), "psa") == 0.9
    at = break_even("cpu", "vmoba")
    assert not dense_is_faster(at, torch.device("cpu"), "vmoba") and dense_is_faster(at + 1e-6, "cpu", "vmoba")
    assert break_even("cpu", "no-such-op") == 0.5  # unmeasured ops get the default


@pytest.mark.parametrize("grad", [False, True])
def test_dense_attention_lse_matches_the_reference_with_gqa(grad):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 70, 8, requires_grad=grad)
    k, v = torch.randn(2, 2, 70, 8), torch.randn(2, 2, 70, 8)
    out, lse = dense_attention_lse(q, k, v, 0.3, chunk=32)
    want, want_lse = dense_attention(q, k, v, torch.ones((), dtype=torch.bool), 0.3)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    if grad:  # the log-sum-exp is differentiable too (merging with text attention needs it)
        g, = torch.autograd.grad(lse.sum() + out.square().sum(), q)
        w, = torch.autograd.grad(want_lse.sum() + want.square().sum(), q)
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert dense_attention_lse(q, k, v, 0.3, need_lse=False)[1] is None
