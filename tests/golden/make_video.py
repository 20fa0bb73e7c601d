"""Golden outputs of the official VMoBA and Pyramid Sparse Attention code, for test_golden_video.py.

    git clone https://github.com/KwaiVGI/VMoBA /tmp/VMoBA
    git clone https://github.com/ziplab/Pyramid-Sparse-Attention /tmp/PSA
    python tests/golden/make_video.py --vmoba /tmp/VMoBA --psa /tmp/PSA

Runs the official routing and selection code unchanged on CPU, fp32, tiny sizes, fixed seeds, and
writes ``tests/golden/vmoba.pt`` and ``tests/golden/psa.pt`` (inputs, settings, outputs, the official
selection, the repository URL and commit). Only the GPU kernels are replaced by plain torch stand-ins
that compute what their documentation and the papers say they compute:

VMoBA (``src/vmoba.py`` imports flash-attn at module level; a stub module ``flash_attn`` is installed):
  - ``flash_attn_varlen_func(q, k, v, cu_q, cu_k, ...)``: non-causal softmax attention per segment;
  - ``_flash_attn_varlen_forward``: the same, returning the 8-tuple of flash-attn 2.x with the output at
    index 4 and the log-sum-exp ``[H, total_q]`` at index 5 (all that ``MixedAttention`` reads);
  - ``_flash_attn_varlen_backward``: the softmax-attention gradients per segment from the given output
    and log-sum-exp (what ``MixedAttention.backward`` asks of it), so the fixtures hold gradients too.
PSA (``src/psa_triton``; ``attn_impl`` selects the legacy or the new mask-list Triton kernel):
  - ``attn_with_pooling_optimized`` (Triton importance kernel): per sampled query the max scaled logit
    per block of sampled keys, ``exp`` against the row max, max over the query block's samples, rows
    divided by their sum (over every block of the padded sample, as the kernel does);
  - ``psa_sparse_attention`` / ``psa_sparse_attention_legacy`` (Triton attention kernels): softmax over
    the keys of the selected (block, level) pairs; a level-``p`` block uses the keys mean-pooled by ``p``
    (after replicate padding to the key block) with ``+ln p`` on their logits; full blocks use the real
    keys only. The mask they receive is recorded as levels 1..4 (0 skipped).
  - ``--check-kernels`` runs the official Triton kernels under the Triton interpreter on CPU against
    these stand-ins: the importance kernel agrees to 2e-8, the legacy kernel and the new one (block_k
    128, or 32 with 1x/2x levels) to 4e-5 (tf32-like dot products), but where a pooled block is smaller
    than half a 32-key tile (block_k = 32 at 4x and 8x: the Wan 2.2 presets) the new kernel's tile
    merging fills only two pooled blocks per tile and reads the other slots at absolute positions of
    the pooled keys (max |diff| 0.26 there): the fixtures follow the documented semantics, not that.
  - the key similarity of the sim mask runs the official PyTorch fallback (``calc_k_similarity_pytorch``,
    chosen by the official code on CPU); the sampled token offsets are the official ``torch.rand`` draws,
    recorded (as top-k indices, the way ``random_sample_tokens`` uses them) so vzoo can be fed them.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if "--check-kernels" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

from vzoo.atomic import write_atomic  # noqa: E402  (imports triton: after TRITON_INTERPRET is set)


def _commit(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def _checkout(path: str, marker: str) -> Path:
    repo = Path(path).resolve()
    if not (repo / marker).is_file():
        sys.exit(f"make_video: {repo} is not a checkout of the official repository (no {marker})")
    return repo


# ----------------------------------------------------------------------------------------- VMoBA
def _segments(q, k, v, cu_q, cu_k, scale):
    """Softmax attention of each segment ``cu_q[i]:cu_q[i+1]`` over ``cu_k[i]:cu_k[i+1]``; ``q [n, H, D]``.
    Returns ``out [n, H, D]`` and ``lse [H, n]`` (fp32)."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"))
    for i in range(len(cu_q) - 1):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        logits = torch.einsum("qhd,khd->hqk", q[qs].double(), k[ks].double()) * scale
        lse[:, qs] = torch.logsumexp(logits, -1).float()
        out[qs] = torch.einsum("hqk,khd->qhd", torch.softmax(logits, -1), v[ks].double()).float()
    return out, lse


def _flash_attn_stub() -> types.ModuleType:
    def varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, softmax_scale=None, **_):
        assert not causal
        return _segments(q, k, v, cu_q, cu_k, softmax_scale or q.shape[-1] ** -0.5)[0].to(q.dtype)

    def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, dropout_p, **_):
        assert not causal and dropout_p == 0.0
        out, lse = _segments(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)
        return None, None, None, None, out.to(q.dtype), lse, None, None

    def varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        softmax_scale, causal, dropout_p, **_):
        """Gradients of softmax attention per segment given the (merged) output and log-sum-exp:
        P = exp(s * q k^T - lse), dV = P^T dO, dS = P (dO v^T - rowsum(dO o)), dQ = s dS k, dK = s dS^T q."""
        assert not causal and dropout_p == 0.0
        grads = [torch.zeros(x.shape, dtype=torch.float64) for x in (q, k, v)]
        for i in range(len(cu_seqlens_q) - 1):
            qs, ks = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])), slice(int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1]))
            qd, kd, vd, do, o = (x.double() for x in (q[qs], k[ks], v[ks], dout[qs], out[qs]))
            p = (torch.einsum("qhd,khd->hqk", qd, kd) * softmax_scale - softmax_lse[:, qs, None].double()).exp()
            grads[2][ks] = torch.einsum("hqk,qhd->khd", p, do)
            ds = p * (torch.einsum("qhd,khd->hqk", do, vd) - (do * o).sum(-1).t()[..., None])
            grads[0][qs] = torch.einsum("hqk,khd->qhd", ds, kd) * softmax_scale
            grads[1][ks] = torch.einsum("hqk,qhd->khd", ds, qd) * softmax_scale
        return (*(g.to(q.dtype) for g in grads), None)

    root = types.ModuleType("flash_attn")
    root.flash_attn_varlen_func = varlen_func
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    iface._flash_attn_varlen_forward = varlen_forward
    iface._flash_attn_varlen_backward = varlen_backward
    root.flash_attn_interface = iface
    return root


def make_vmoba(repo: Path) -> dict:
    stub = _flash_attn_stub()
    sys.modules["flash_attn"], sys.modules["flash_attn.flash_attn_interface"] = stub, stub.flash_attn_interface
    sys.path.insert(0, str(repo / "src"))
    import vmoba as official  # noqa: E402  (KwaiVGI/VMoBA src/vmoba.py)

    # (name, grid, layer, chunk, select mode, top-k, tau, threshold_type, batch)
    cases = [
        ("1d_topk", (4, 4, 6), 0, 2, "topk", 2, 0.25, "query_head", 2),
        ("1d_ragged_threshold", (5, 4, 6), 0, 2, "threshold", 3, 0.3, "query_head", 2),
        ("2d_threshold", (4, 4, 6), 1, (2, 3), "threshold", 3, 0.3, "query_head", 2),
        ("2d_topk", (4, 4, 6), 1, (2, 3), "topk", 3, 0.25, "query_head", 1),
        ("3d_head_global", (4, 4, 6), 2, (2, 2, 3), "threshold", 3, 0.25, "head_global", 1),
        ("3d_query_head", (4, 6, 6), 2, (2, 3, 3), "threshold", 3, 0.4, "query_head", 2),
    ]
    out = {"repo": "https://github.com/KwaiVGI/VMoBA", "commit": _commit(repo), "cases": []}
    for i, (name, grid, layer, chunk, mode, topk, tau, ttype, b) in enumerate(cases):
        torch.manual_seed(100 + i)
        s, h, d = math.prod(grid), 2, 8
        q, k, v = (torch.randn(b, s, h, d, requires_grad=True) for _ in range(3))  # the official layout [B, S, H, D]
        qp, kp, vp = (official.process_moba_input(x, grid, chunk)[0] for x in (q, k, v))
        _, chunk_tokens = official.process_moba_input(q, grid, chunk)
        cu = torch.arange(0, b * s + 1, s, dtype=torch.int32)
        flat = [x.reshape(b * s, h, d) for x in (qp, kp, vp)]
        o = official.moba_attn_varlen(*flat, cu, s, moba_chunk_size=chunk_tokens, moba_topk=topk, select_mode=mode,
                                      simsum_threshold=tau, threshold_type=ttype)
        o = official.process_moba_output(o.reshape(b, s, h, d), grid, chunk)
        up = torch.randn(o.shape)
        grads = torch.autograd.grad(o, (q, k, v), up)
        block = (chunk, 0, 0) if isinstance(chunk, int) else (0, *chunk) if len(chunk) == 2 else chunk
        heads_first = lambda x: x.detach().transpose(1, 2).contiguous()  # noqa: E731  [B, H, S, D] for vzoo
        out["cases"].append(dict(name=name, grid=grid, layer=layer, block=block, mode=mode, topk=topk, tau=tau, pool=ttype,
                                 q=heads_first(q), k=heads_first(k), v=heads_first(v), out=heads_first(o), grad_out=heads_first(up),
                                 grad_q=heads_first(grads[0]), grad_k=heads_first(grads[1]), grad_v=heads_first(grads[2])))
    return out


# ------------------------------------------------------------------------------------------- PSA
def _pooling_standin(q, k, v, causal, sm_scale, block_m, block_n, tile_m=64, tile_n=64):
    """Importance of ``attn_with_pooling_optimized`` (q, k: padded samples ``[B, H, n, D]``)."""
    assert not causal
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    logits = q.float() @ k.float().transpose(-1, -2)
    r = logits.unflatten(-1, (-1, block_n)).amax(-1) * sm_scale  # [B, H, n_q, n_d]
    po = (r - r.amax(-1, keepdim=True)).exp().unflatten(2, (-1, block_m)).amax(3)
    return None, (po / po.sum(-1, keepdim=True)).to(q.dtype)


_LEVEL_OF_POOL = torch.tensor([0, 1, 2, 0, 3, 0, 0, 0, 4])  # pool factor 0, 1, 2, 4, 8 -> level 0..4


def _levels_from_mask(mask: torch.Tensor, nkb: int, new_type: bool) -> torch.Tensor:
    """Levels 1..4 (0 skipped) ``[B, H, NQB, NKB]`` from the legacy pool-factor mask or the new id lists
    (per row: the ids of each level in turn, each group closed by -1; the 5th group is skipped)."""
    if not new_type:
        return _LEVEL_OF_POOL[mask.long()]
    sep = (mask == -1).long()
    group = sep.cumsum(-1) - sep  # separators before each entry
    levels = torch.zeros(*mask.shape[:3], nkb, dtype=torch.long)
    for b, h, i, j in ((mask != -1) & (group < 4)).nonzero().tolist():
        levels[b, h, i, mask[b, h, i, j]] = group[b, h, i, j] + 1
    return levels


def _attention_standin(q, k, v, levels, block_m, block_n):
    """Softmax over the selected (block, level) keys; level p: keys mean-pooled by p, +ln p."""
    b, h, s, d = q.shape
    padded = -(-s // block_n) * block_n
    kp = torch.cat([k, k[:, :, -1:].expand(-1, -1, padded - s, -1)], 2).double()
    vp = torch.cat([v, v[:, :, -1:].expand(-1, -1, padded - s, -1)], 2).double()
    keys, vals, bias, allowed = [], [], [], []
    qblock = torch.arange(s) // block_m
    for level, p in enumerate((1, 2, 4, 8), 1):
        n = s if p == 1 else padded // p
        keys.append(kp[:, :, : n * p].unflatten(2, (n, p)).mean(3))
        vals.append(vp[:, :, : n * p].unflatten(2, (n, p)).mean(3))
        bias.append(torch.full((n,), math.log(p), dtype=torch.float64))
        owner = torch.arange(n) * p // block_n
        allowed.append(levels[:, :, qblock][..., owner] == level)
    logits = (q.double() @ torch.cat(keys, 2).transpose(-1, -2)) * d**-0.5 + torch.cat(bias)
    probs = torch.softmax(logits.masked_fill(~torch.cat(allowed, -1), float("-inf")), -1)
    return (probs @ torch.cat(vals, 2)).to(q.dtype)


def make_psa(repo: Path) -> dict:
    sys.path.insert(0, str(repo / "src"))
    import psa_triton.pyramid_sparse_attention as official  # noqa: E402

    seen = {}

    def factory(new_type):
        def make(block_m, tile_n, block_n, **_):
            def run(q, k, v, mask, sm_scale=None):
                nkb = -(-k.shape[2] // block_n)
                seen["levels"] = _levels_from_mask(mask.cpu(), nkb, new_type)
                return _attention_standin(q, k, v, seen["levels"], block_m, block_n)
            return run
        return make

    official.attn_with_pooling_optimized = _pooling_standin
    official.psa_sparse_attention = factory(True)
    official.psa_sparse_attention_legacy = factory(False)
    draws = []
    real_rand = torch.rand

    def recording_rand(*args, **kw):
        x = real_rand(*args, **kw)
        draws.append(x)
        return x

    balanced = {1: (0.0, 0.5), 2: (0.5, 0.6), 4: (0.6, 0.7), 8: (0.7, 0.8), 0: (0.8, 1.0)}
    a14b = {1: (0.0, 0.5), 2: (0.5, 0.6), 4: (0.6, 0.6), 8: (0.6, 0.8), 0: (0.8, 1.0)}
    w14b = {1: (0.0, 0.4), 2: (0.4, 0.5), 4: (0.5, 0.6), 8: (0.6, 0.8), 0: (0.8, 1.0)}
    cog = {1: (0.0, 0.1), 2: (0.1, 0.15), 4: (0.15, 0.15), 8: (0.15, 0.35), 0: (0.35, 1.0)}
    # (name, grid, batch, block_m, block_n, ratios, mask_mode, attn_impl, sim thresholds or None, reorder)
    cases = [
        ("balanced_legacy_sim", (4, 8, 12), 1, 32, 32, balanced, "thresholdbound", "old_mask_type", (0.5, 0.4, 0.3), True),
        ("a14b_ragged", (5, 9, 11), 1, 32, 64, a14b, "thresholdbound", "new_mask_type", None, True),
        ("wan14b_batch", (4, 8, 8), 2, 32, 32, w14b, "thresholdbound", "new_mask_type", None, True),
        ("cogvideox_topk", (4, 8, 16), 1, 32, 32, cog, "topk", "new_mask_type", None, False),
        ("legacy_topk_128", (4, 8, 16), 1, 64, 128, cog, "topk", "old_mask_type", None, True),
    ]
    out = {"repo": "https://github.com/ziplab/Pyramid-Sparse-Attention", "commit": _commit(repo), "cases": []}
    for i, (name, grid, b, bm, bn, ratios, mode, impl, sim, reorder) in enumerate(cases):
        t, hh, ww = grid
        config = official.AttentionConfig(
            width=ww, height=hh, depth=t, text_length=0, use_rearrange=reorder, block_m=bm, block_n=bn, tile_n=32,
            use_sim_mask=sim is not None, mask_ratios=dict(ratios), mask_mode=mode, warmup_steps=0,
            rearrange_method="Gilbert", attn_impl=impl, verbose=False, enable_logging=False,
            **(dict(zip(("sim_2x_threshold", "sim_4x_threshold", "sim_8x_threshold"), sim)) if sim else {}),
        )
        module = official.PyramidSparseAttention(config, inference_num=50, layer_num=1, model_type="wan")
        torch.manual_seed(200 + i)
        s, h, d = math.prod(grid), 2, 8
        base = torch.randn(b, h, s, d).cumsum(2) / 4  # smooth keys: pooled levels and the sim mask occur
        q, k = base + 0.3 * torch.randn(b, h, s, d), base + 0.1 * torch.randn(b, h, s, d)
        v = torch.randn(b, h, s, d)
        draws.clear()
        torch.rand = recording_rand
        try:
            o = module(q, k, v, layer_idx=0)
        finally:
            torch.rand = real_rand
        off_q, off_k = (x.topk(n, dim=3).indices[:, :, 0] for x, n in zip(draws, (bm // 4, bn // 4)))
        out["cases"].append(dict(name=name, grid=grid, block_q=bm, block_k=bn, ratios=ratios, mode=mode, sim=sim, reorder=reorder,
                                 q=q, k=k, v=v, offsets_q=off_q, offsets_k=off_k, levels=seen["levels"], out=o))
    return out


def check_kernels(repo: Path) -> None:
    """The PSA stand-ins against the official Triton kernels run by the Triton interpreter on CPU
    (``TRITON_INTERPRET=1``; their GPU-only ``is_hip`` probe and ``torch.cuda.device`` are stubbed)."""
    import contextlib

    sys.path.insert(0, str(repo / "src"))
    from psa_triton.kernels import attn_pooling_kernel, psa_kernel, psa_kernel_legacy

    for module in (attn_pooling_kernel, psa_kernel, psa_kernel_legacy):
        module.is_hip = lambda: False
    torch.cuda.device = lambda *_: contextlib.nullcontext()
    torch.manual_seed(0)
    s, d = 256, 64
    base = torch.randn(1, 1, s, d).cumsum(2) / 4
    q, k, v = base + 0.3 * torch.randn_like(base), base + 0.1 * torch.randn_like(base), torch.randn(1, 1, s, d)
    sq, sk = torch.randn(1, 1, 64, d), torch.randn(1, 1, 64, d)
    diff = (attn_pooling_kernel.attn_with_pooling_optimized(sq, sk, v, False, d**-0.5, 8, 8)[1] - _pooling_standin(sq, sk, v, False, d**-0.5, 8, 8)[1]).abs().max()
    print(f"importance kernel vs stand-in: max |diff| {diff:.2e}")
    levels = torch.tensor([[1, 3], [2, 1]])[None, None]
    got = psa_kernel_legacy.sparse_attention_factory(128, 32, 128)(q, k, v, torch.tensor([0, 1, 2, 4, 8])[levels].int(), None)
    print(f"legacy kernel, block 128/128, levels {levels.tolist()}: max |diff| {(got - _attention_standin(q, k, v, levels, 128, 128)).abs().max():.2e}")
    for bn, row in ((128, [1, 2]), (32, [1, 1, 2, 2, 0, 0, 1, 0]), (32, [1, 3, 3, 3, 3, 0, 0, 1])):
        levels = torch.tensor(row)[None, None, None].expand(1, 1, 2, -1)
        ids = [j for level in (1, 2, 3, 4, 0) for j in [*(i for i, x in enumerate(row) if x == level), -1]]
        lists = torch.tensor(ids, dtype=torch.int32)[None, None, None].expand(1, 1, 2, -1).contiguous()
        got = psa_kernel.sparse_attention_factory(128, 32, bn)(q, k, v, lists, None)
        print(f"new kernel, block 128/{bn}, levels {row}: max |diff| {(got - _attention_standin(q, k, v, levels, 128, bn)).abs().max():.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vmoba", required=True, help="checkout of github.com/KwaiVGI/VMoBA")
    p.add_argument("--psa", required=True, help="checkout of github.com/ziplab/Pyramid-Sparse-Attention")
    p.add_argument("--check-kernels", action="store_true", help="only compare the PSA stand-ins with the official Triton kernels (interpreter)")
    a = p.parse_args()
    vmoba_repo = _checkout(a.vmoba, "src/vmoba.py")
    psa_repo = _checkout(a.psa, "src/psa_triton/pyramid_sparse_attention.py")
    torch.set_num_threads(1)
    if a.check_kernels:
        return check_kernels(psa_repo)
    for name, data in (("vmoba", make_vmoba(vmoba_repo)), ("psa", make_psa(psa_repo))):
        write_atomic(HERE / f"{name}.pt", lambda tmp: torch.save(data, tmp))
        print(f"wrote {HERE / name}.pt ({(HERE / f'{name}.pt').stat().st_size} bytes) from {data['repo']}@{data['commit']}")


if __name__ == "__main__":
    main()
