"""PBS-Attn in transformers: permutation and block selection against loop oracles, attention against dense
softmax masked by the selection on original positions (padding and GQA included), equality with eager
attention when every block is selected, SDPA for short prompts, cached decoding, density, bad configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vzoo.kernels.break_even import DensityStats
from vzoo.lm import PBSConfig, apply_sparse_attention
from vzoo.lm.pbs import pbs_attention, pbs_block_selection, pbs_permutation

BS, SEG, T, SCALE = 8, 16, 70, 0.25  # 4 complete segments and a 6-token tail; the last query block is short


def _inputs(hq: int = 4, hkv: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return torch.randn(2, hq, T, 16), torch.randn(2, hkv, T, 16), torch.randn(2, hkv, T, 16)


def _padding(pad: int) -> torch.Tensor:
    """Unpadded tokens: row 1 left-padded by ``pad`` tokens (right-padded by ``-pad`` when negative)."""
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, slice(None, pad) if pad >= 0 else slice(pad, None)] = False
    return valid


def _oracle_perm(q, k, valid):
    """Loops: per kv head, each key's summed softmax weight from the unpadded last-block queries of the group
    (over the unpadded keys of complete segments); each complete segment sorted by it (stable, descending)."""
    b, hq, t, _ = q.shape
    hkv = k.shape[1]
    n = t // SEG * SEG
    perm = torch.empty(b, hkv, t, dtype=torch.long)
    for bi in range(b):
        keys = [j for j in range(n) if valid[bi, j]]
        for kh in range(hkv):
            importance = [0.0] * n
            for qh in range(kh * hq // hkv, (kh + 1) * hq // hkv):
                for i in range(t - BS, t):
                    if not valid[bi, i]:
                        continue
                    logits = torch.stack([q[bi, qh, i].double() @ k[bi, kh, j].double() for j in keys]) * SCALE
                    for j, w in zip(keys, torch.softmax(logits, 0).tolist()):
                        importance[j] += w
            order = [j for s in range(0, n, SEG) for j in sorted(range(s, s + SEG), key=lambda j: -importance[j])]
            perm[bi, kh] = torch.tensor(order + list(range(n, t)))
    return perm


def _oracle_selection(q, k, perm, threshold, valid):
    """Loops: per query head and query block, softmax of the block-mean query against the means of the
    unpadded keys of each permuted key block of an earlier segment; keep blocks, best first, while the kept
    mass is short of ``threshold``; add the block holding the first unpadded token if it is in an earlier segment."""
    b, hq, t, _ = q.shape
    hkv = k.shape[1]
    nb = -(-t // BS)
    chosen = torch.zeros(b, hq, nb, nb, dtype=torch.bool)
    for bi in range(b):
        first = min(j for j in range(t) if valid[bi, j])
        for h in range(hq):
            kh = h // (hq // hkv)
            order = perm[bi, kh].tolist()
            means = {}
            for j in range(nb):
                toks = [order[p] for p in range(j * BS, min(t, (j + 1) * BS)) if valid[bi, order[p]]]
                if toks:
                    means[j] = k[bi, kh, toks].double().mean(0)
            sink = order.index(first) // BS
            for i in range(nb):
                q_mean = q[bi, h, i * BS : (i + 1) * BS].double().sum(0) / BS  # a short block is zero-padded
                cands = [j for j in means if j * BS // SEG < i * BS // SEG]
                if not cands:
                    continue
                probs = torch.softmax(torch.stack([q_mean @ means[j] for j in cands]) * SCALE, 0).tolist()
                mass = 0.0
                for p, j in sorted(zip(probs, cands), key=lambda pj: -pj[0]):
                    if mass >= threshold:
                        break
                    chosen[bi, h, i, j], mass = True, mass + p
                if sink * BS // SEG < i * BS // SEG:
                    chosen[bi, h, i, sink] = True
    return chosen


def _selection_mask(chosen, perm, valid):
    """bool [B, Hq, T, T] on original positions: own segment causally, plus the original positions of the
    keys in the chosen permuted blocks; padded keys hidden."""
    b, hq, nb, _ = chosen.shape
    hkv = perm.shape[1]
    mask = torch.zeros(b, hq, T, T, dtype=torch.bool)
    for t in range(T):
        mask[:, :, t, t // SEG * SEG : t + 1] = True
    for bi, h, i, j in chosen.nonzero().tolist():
        mask[bi, h, i * BS : (i + 1) * BS, perm[bi, h // (hq // hkv), j * BS : (j + 1) * BS]] = True
    return mask & valid[:, None, None, :]


def _masked_softmax_attention(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, 1).double() for x in (k, v))
    scores = (q.double() @ k.transpose(-1, -2) * SCALE).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])  # GQA and one query head per kv head
@pytest.mark.parametrize("pad", [0, 21, -5])  # none; row 1 left-padded past a whole segment; right-padded
def test_permutation_and_selection_match_loop_oracles(heads, pad):
    q, k, _ = _inputs(*heads)
    valid = _padding(pad)
    mask = valid if pad else None
    perm = pbs_permutation(q, k, BS, SEG, SCALE, mask)
    assert torch.equal(perm, _oracle_perm(q, k, valid))
    assert not torch.equal(perm, torch.arange(T).expand_as(perm))  # really permuted
    key_perm = k.gather(2, perm[..., None].expand_as(k))
    for threshold in (0.3, 0.8):
        config = PBSConfig(block_size=BS, segment_size=SEG, threshold=threshold)
        chosen = pbs_block_selection(q, key_perm, perm, config, SCALE, mask)
        assert torch.equal(chosen, _oracle_selection(q, k, perm, threshold, valid))
    every = pbs_block_selection(q, key_perm, perm, PBSConfig(block_size=BS, segment_size=SEG, threshold=1.0), SCALE,
                                mask)
    assert torch.equal(every, _oracle_selection(q, k, perm, 2.0, valid))  # every unpadded block of earlier segments


@pytest.mark.parametrize("pad", [0, 21])
def test_attention_equals_dense_softmax_masked_by_the_selection(pad):
    q, k, v = _inputs(seed=3)
    valid = _padding(pad)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    attention_mask = (causal & valid[:, None, :])[:, None] if pad else None
    config = PBSConfig(block_size=BS, segment_size=SEG, threshold=0.6, dense_fallback=False)
    out = pbs_attention(config, q, k, v, attention_mask, SCALE)
    keys = valid if pad else None
    perm = pbs_permutation(q, k, BS, SEG, SCALE, keys)
    chosen = pbs_block_selection(q, k.gather(2, perm[..., None].expand_as(k)), perm, config, SCALE, keys)
    mask = _selection_mask(chosen, perm, valid)
    assert (mask & ~causal).sum() == 0  # the selection never reaches a later key
    assert mask.sum() < (causal & valid[:, None, None, :]).expand_as(mask).sum()  # really sparse
    want = _masked_softmax_attention(q, k, v, mask).float()
    rows = valid[:, None, :, None].expand_as(out)  # left-padded query rows are not compared
    torch.testing.assert_close(out[rows], want[rows], atol=1e-5, rtol=1e-5)


def test_density_is_recorded_and_dense_fallback_runs_sdpa():
    q, k, v = _inputs(seed=4)
    module = torch.nn.Module()
    module.vzoo_density = DensityStats()
    config = PBSConfig(block_size=BS, segment_size=SEG, threshold=0.6, dense_fallback=False)
    pbs_attention(config, q, k, v, None, SCALE, module)
    perm = pbs_permutation(q, k, BS, SEG, SCALE)
    chosen = pbs_block_selection(q, k.gather(2, perm[..., None].expand_as(k)), perm, config, SCALE)
    pairs = _selection_mask(chosen, perm, torch.ones(2, T, dtype=torch.bool)).sum().item()
    assert module.vzoo_density.calls == 1 and module.vzoo_density.dense_calls == 0
    assert module.vzoo_density.total == pytest.approx(pairs / (2 * 4 * T * (T + 1) / 2))
    every = PBSConfig(block_size=BS, segment_size=SEG, threshold=1.0)  # density 1: above any break-even
    out = pbs_attention(every, q, k, v, None, SCALE, module)
    assert module.vzoo_density.dense_calls == 1
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_every_block_selected_equals_eager_with_left_padding_and_generate(lm, kind):
    lm.assert_equals_eager(lm.make(kind), PBSConfig(block_size=8, segment_size=16, threshold=1.0, dense_fallback=False))


def test_prompts_within_one_segment_run_sdpa(lm):
    q, k, v = (x[:, :, :SEG] for x in _inputs(seed=5))
    config = PBSConfig(block_size=BS, segment_size=SEG, threshold=0.1, dense_fallback=False)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)
    torch.testing.assert_close(pbs_attention(config, q, k, v, None, SCALE), want, atol=0, rtol=0)
    model = lm.make()
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        stock = model(ids).logits
        with apply_sparse_attention(model, PBSConfig(block_size=8, segment_size=40, threshold=0.1)) as handle:
            torch.testing.assert_close(model(ids).logits, stock, atol=1e-6, rtol=1e-6)
        assert handle.sparse_calls == 0


def test_cached_decoding_equals_one_chunk_over_the_sparse_prefill_cache(lm):
    """Prefill is sparse, every later query attends densely over the cache (the method is prefill-only):
    greedy generation with a cache gives the logits of one chunked call over the prompt's cache."""
    model = lm.make()
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(2))
    config = PBSConfig(block_size=8, segment_size=16, threshold=0.5, dense_fallback=False)
    with torch.no_grad():
        stock = model(ids).logits
        with apply_sparse_attention(model, config) as handle:
            gen = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, output_logits=True,
                                 return_dict_in_generate=True)
            prefill = model(ids, use_cache=True)
            kwarg = "cache" if getattr(prefill, "cache", None) is not None else "past_key_values"
            chunk = model(gen.sequences[:, 60:-1], **{kwarg: lm.cache_of(prefill)}).logits
    assert not torch.allclose(prefill.logits, stock, atol=1e-3)  # the prefill really is sparse
    assert handle.sparse_calls == 2 * 3 and 0 < handle.density < 1  # two sparse prefills of 3 layers
    want = torch.cat([prefill.logits[:, -1:], chunk], 1)
    torch.testing.assert_close(torch.stack(gen.logits, 1), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen.sequences[:, 60:], want.argmax(-1))


def test_bad_configs_raise_naming_the_field(lm):
    for kwargs, field in (
        (dict(block_size=0), "block_size"), (dict(segment_size=-1), "segment_size"),
        (dict(block_size=64, segment_size=96), "segment_size"), (dict(threshold=0.0), "threshold"),
        (dict(threshold=1.5), "threshold"), (dict(layers=(-1,)), "layers"), (dict(sink=1), "sink"),
        (dict(dense_fallback="yes"), "dense_fallback"),
    ):
        with pytest.raises(ValueError, match=f"PBSConfig.{field}"):
            PBSConfig(**kwargs)
    with pytest.raises(ValueError, match="PBSConfig.layers"):
        apply_sparse_attention(lm.make(), PBSConfig(layers=(3,)))
