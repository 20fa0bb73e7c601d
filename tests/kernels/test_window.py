"""sink_window_attention: every backend against loop-built masks (forward and gradients), bad input."""

from __future__ import annotations

import pytest
import torch

import vzoo.kernels as vk


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("sq,skv,window,sink", [(70, 70, 9, 3), (33, 90, 20, 8), (1, 40, 12, 4), (50, 50, 64, 0)])
def test_matches_oracle_with_gradients(oracle, triton_device, backend, sq, skv, window, sink):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, sq, 16, generator=g), torch.randn(2, 2, skv, 16, generator=g), torch.randn(2, 2, skv, 16, generator=g)
    dev = triton_device if backend == "triton" else "cpu"
    w = torch.randn(2, 4, sq, 16, generator=g)

    def grads(fn, *inputs):
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*inputs)
        return [out.detach().cpu().double(), *(t.cpu().double() for t in torch.autograd.grad((out * w.to(out)).sum(), inputs))]

    got = grads(lambda q, k, v: vk.sink_window_attention(q, k, v, window, sink, backend=backend, chunk=16, block=8),
                q.to(dev), k.to(dev), v.to(dev))
    keep = oracle.window(sq, skv, True, window, sink)
    want = grads(lambda q, k, v: oracle.attention(q, k, v, keep[None, None])[0], q.double(), k.double(), v.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert (a - b).abs().max() < 1e-4, name


def test_bad_inputs():
    q = torch.randn(1, 2, 8, 16)
    for kwargs, word in ((dict(window=0), "window=0"), (dict(window=4, sink=-1), "sink=-1"), (dict(window=4, chunk=0), "chunk=0")):
        with pytest.raises(ValueError, match=word):
            vk.sink_window_attention(q, q, q, **kwargs)
    with pytest.raises(ValueError, match="only 4 keys"):
        vk.sink_window_attention(q, q[:, :, :4], q[:, :, :4], 4)
    with pytest.raises(ValueError, match="4-D"):
        vk.sink_window_attention(q[0], q, q, 4)
