"""ACT (vzoo.lm.act) against loops written here: sink detection (mean received attention over the queries
that can see a key, threshold tau, first sink kept), calibration (sinks times beta, removed mass spread in
proportion), the attention function (GQA, the caller's mask, scale, query chunks, decode calls), the model
patch, the offline head search and the sink map."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import vzoo.lm.act as act
from vzoo.lm import ACTConfig, apply_sparse_attention
from vzoo.lm.act import act_attention, calibrate_attention, detect_sinks, search_heads, sink_map


def ref_calibrate(a: torch.Tensor, vis: torch.Tensor, beta: float, tau: float, keep_first: bool = True):
    """One head's map ``a [q, kv]`` with allowed pairs ``vis [q, kv]``: (calibrated map, sink positions)."""
    q, kv = a.shape
    r = []
    for j in range(kv):
        seen = [i for i in range(q) if vis[i, j]]
        r.append(sum(float(a[i, j]) for i in seen) / len(seen) if seen else 0.0)
    sinks = [j for j in range(kv) if r[j] > tau]
    cal = sinks[1:] if keep_first else sinks
    out = a.clone()
    for i in range(q):
        s = sum(float(a[i, j]) for j in cal)
        n = sum(float(a[i, j]) for j in range(kv) if j not in cal)
        if n == 0:
            continue
        for j in range(kv):
            out[i, j] = beta * a[i, j] if j in cal else a[i, j] + (1 - beta) * s * a[i, j] / n
    return out, sinks


def causal(q: int, kv: int) -> torch.Tensor:
    return torch.tensor([[j <= i + kv - q for j in range(kv)] for i in range(q)])


def softmax_rows(logits: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.masked_fill(~vis, float("-inf")), -1)
    return torch.where(vis.any(-1, keepdim=True), p, 0.0)


def sinky_probs(b: int, h: int, q: int, kv: int, vis: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Maps with a first-token sink and, per head, a mid-sequence sink (so several sinks are found)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, h, q, kv, generator=g, dtype=torch.float64)
    for bi in range(b):  # the first key each batch row sees
        logits[bi, ..., int(vis[bi, 0, -1].nonzero()[0])] += 3.0
    for hh in range(h):
        logits[:, hh, :, 3 + hh] += 2.5
    return softmax_rows(logits, vis)


@pytest.mark.parametrize("keep_first", [True, False])
def test_calibration_equals_loops_and_keeps_rows_normalised(keep_first):
    b, h, q, kv = 2, 3, 9, 12  # queries are the last 9 of 12 positions
    vis = causal(q, kv).expand(b, 1, q, kv).clone()
    vis[1, :, :, :2] = False  # row 1 left-padded by two keys
    probs = sinky_probs(b, h, q, kv, vis)
    beta, tau = 0.4, 0.1
    out = calibrate_attention(probs, beta, tau, keep_first, visible=vis)
    found = detect_sinks(probs, tau, visible=vis)
    for bi in range(b):
        for hi in range(h):
            want, sinks = ref_calibrate(probs[bi, hi], vis[bi, 0], beta, tau, keep_first)
            assert found[bi, hi].nonzero().flatten().tolist() == sinks
            assert len(sinks) >= 2
            torch.testing.assert_close(out[bi, hi], want, rtol=1e-12, atol=1e-12)
            cal = sinks[1:] if keep_first else sinks
            other = [j for j in range(kv) if j not in cal]
            a, o = probs[bi, hi], out[bi, hi]
            torch.testing.assert_close(o.sum(-1), a.sum(-1), rtol=1e-12, atol=1e-12)  # ones (every row sees a key)
            moved = [i for i in range(q) if a[i, other].sum() > 0]  # rows seeing only sinks stay as they are
            assert len(moved) >= q - 1
            torch.testing.assert_close(o[moved][:, cal], beta * a[moved][:, cal], rtol=1e-12, atol=0)
            grown = 0
            for i in moved:  # ratios between uncalibrated entries unchanged: o = c_i * a on them
                c = o[i, other].sum() / a[i, other].sum()
                grown += bool(c > 1 + 1e-6)
                torch.testing.assert_close(o[i, other], c * a[i, other], rtol=1e-12, atol=1e-15)
            assert grown >= len(moved) // 2
    torch.testing.assert_close(out.sum(-1), torch.ones(b, h, q, dtype=torch.float64))
    torch.testing.assert_close(calibrate_attention(probs, 1.0, tau, visible=vis), probs, rtol=0, atol=0)


def test_planted_mid_sequence_sink_is_found_and_the_first_token_is_not_damped():
    t = 16
    vis = causal(t, t)
    logits = torch.randn(1, 1, t, t, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    logits[..., 0] += 4.0  # BOS sink
    logits[..., 7:, 7] += 4.0  # a sink at position 7 for every query that sees it
    probs = softmax_rows(logits, vis)
    assert detect_sinks(probs, 0.1)[0, 0].nonzero().flatten().tolist() == [0, 7]  # default visibility: causal
    out = calibrate_attention(probs, beta=0.4, tau=0.1)
    a, o = probs[0, 0], out[0, 0]
    torch.testing.assert_close(o[:, 7], 0.4 * a[:, 7], rtol=1e-12, atol=0)
    for i in range(7, t):  # BOS gets its proportional share, not the damping
        grow = 1 + 0.6 * a[i, 7] / (1 - a[i, 7])
        torch.testing.assert_close(o[i, 0], grow * a[i, 0], rtol=1e-12, atol=0)
    torch.testing.assert_close(o[:7], a[:7], rtol=0, atol=0)  # rows before the sink: nothing to move
    both = calibrate_attention(probs, beta=0.4, tau=0.1, keep_first=False)[0, 0]
    torch.testing.assert_close(both[1:, 0], 0.4 * a[1:, 0], rtol=1e-12, atol=0)
    torch.testing.assert_close(both[0], a[0], rtol=0, atol=0)  # row 0 sees only the sinks: left as it is


def test_bad_inputs_are_refused():
    p = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="probs must be"):
        calibrate_attention(p[0])
    with pytest.raises(ValueError, match="q=5 > kv=4"):
        calibrate_attention(torch.rand(1, 1, 5, 4))
    with pytest.raises(ValueError, match="visible must be bool"):
        calibrate_attention(p, visible=torch.ones(4, 4))
    with pytest.raises(ValueError, match="does not broadcast"):
        calibrate_attention(p, visible=torch.ones(3, 4, dtype=torch.bool))
    for bad, field in ((dict(beta=1.5), "beta"), (dict(tau=-0.1), "tau"), (dict(heads={0: [-1]}), "heads"),
                       (dict(heads={"0": [1]}), "heads"), (dict(decode=1), "decode")):
        with pytest.raises(ValueError, match=f"ACTConfig.{field}"):
            ACTConfig(**bad)
    c = ACTConfig(heads=[(2, 1), (0, 3), (2, 0)])
    assert c.heads == ((0, (3,)), (2, (0, 1))) and c == ACTConfig(heads={2: [1, 0], 0: (3,), 5: []})
    assert c.layer_ids(3) == (0, 2) and c.heads_of(1, 4) == ()
    with pytest.raises(ValueError, match="head 3 >= num_attention_heads=3"):
        c.heads_of(0, 3)


def ref_attention(config, query, key, value, vis, scale, layer):
    """Per head: explicit softmax over ``vis``; ACT (loops) on the configured heads; GQA by index."""
    b, nh, q, _ = query.shape
    groups = nh // key.shape[1]
    heads = range(nh) if config.heads is None else dict(config.heads).get(layer, ())
    out = torch.zeros_like(query)
    for bi in range(b):
        for hi in range(nh):
            k, v = key[bi, hi // groups], value[bi, hi // groups]
            p = softmax_rows(query[bi, hi] @ k.T * scale, vis[bi, 0])
            if hi in heads and (q == key.shape[2] or config.decode):
                p = ref_calibrate(p, vis[bi, 0], config.beta, config.tau, config.keep_first)[0]
            out[bi, hi] = p @ v
    return out


@pytest.mark.parametrize("chunked", [False, True])
def test_attention_function_equals_loops(monkeypatch, chunked):
    if chunked:  # 2 x 2 heads x 3 rows x 20 keys per chunk: several query chunks, two passes
        monkeypatch.setattr(act, "_CHUNK_ELEMENTS", 2 * 2 * 3 * 20)
    g = torch.Generator().manual_seed(5)
    b, nh, nkv, t, d = 2, 4, 2, 20, 8
    q, k, v = (torch.randn(b, n, t, d, generator=g, dtype=torch.float64) for n in (nh, nkv, nkv))
    k[:, :, 0] += 2.0 * q.mean((1, 2))  # a first-token sink for most queries
    module = SimpleNamespace(layer_idx=1)
    config = ACTConfig(heads={1: (1, 2), 0: (0,)}, beta=0.3, tau=0.08)
    vis = causal(t, t).expand(b, 1, t, t).clone()
    vis[1, :, :, :3] = False  # left padding in row 1
    for mask in (vis, torch.zeros(b, 1, t, t, dtype=torch.float64).masked_fill(~vis, torch.finfo(torch.float64).min)):
        got = act_attention(config, q, k, v, mask, 0.4, module)
        torch.testing.assert_close(got, ref_attention(config, q, k, v, vis, 0.4, 1), rtol=1e-10, atol=1e-10)
    full = causal(t, t).expand(b, 1, t, t)
    for cfg in (config, ACTConfig(beta=0.5, tau=0.06, keep_first=False)):  # no mask: causal; every head
        got = act_attention(cfg, q, k, v, None, 0.4, module)
        torch.testing.assert_close(got, ref_attention(cfg, q, k, v, full, 0.4, 1), rtol=1e-10, atol=1e-10)
    window = causal(t, t) & torch.tensor([[j > i - 6 for j in range(t)] for i in range(t)])
    got = act_attention(config, q, k, v, None, 0.4, module, sliding_window=6)
    torch.testing.assert_close(got, ref_attention(config, q, k, v, window.expand(b, 1, t, t), 0.4, 1), rtol=1e-10, atol=1e-10)
    # calls with a cache prefix (one decode step without a mask, 3 queries with one): statistic over the
    # call's own queries, or the model's attention with decode=False
    for n, mask in ((1, None), (3, vis[:, :, -3:])):
        step, want_vis = q[:, :, -n:], vis[:, :, -n:] if mask is not None else causal(n, t).expand(b, 1, n, t)
        for cfg in (config, ACTConfig(heads={1: (1, 2)}, beta=0.3, tau=0.08, decode=False)):
            got = act_attention(cfg, step, k, v, mask, 0.4, module)
            torch.testing.assert_close(got, ref_attention(cfg, step, k, v, want_vis, 0.4, 1), rtol=1e-10, atol=1e-10)
        assert not torch.allclose(act_attention(config, step, k, v, mask, 0.4, module),
                                  act_attention(ACTConfig(heads={}), step, k, v, mask, 0.4, module))


def tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_model_patch_empty_map_is_identity_and_heads_are_checked():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stock = model(ids).logits
        with apply_sparse_attention(model, ACTConfig(heads={})):
            assert torch.equal(model(ids).logits, stock)
        with apply_sparse_attention(model, ACTConfig(heads={1: [0, 3]}, beta=0.0, tau=0.05)):
            changed = model(ids).logits
        assert torch.equal(model(ids).logits, stock)  # removed
    assert not torch.allclose(changed, stock, atol=1e-4)
    with pytest.raises(ValueError, match="layer 1 has head 4 >= num_attention_heads=4"):
        apply_sparse_attention(model, ACTConfig(heads={1: [4]}))
    with pytest.raises(ValueError, match="indices >= num_layers=2"):
        apply_sparse_attention(model, ACTConfig(heads={2: [0]}))
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "vzoo_config") for m in model.modules())


def test_search_keeps_exactly_the_heads_that_beat_the_baseline():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(4))
    gains = {(0, 1): 1.0, (1, 3): 0.5, (0, 2): -1.0}  # (1, 0) ties the baseline: not kept
    seen = []

    def eval_fn(m):
        with torch.no_grad():
            m(ids)
        on = [(a.layer_idx, h) for a in m.modules() if hasattr(a, "vzoo_config")
              for h in a.vzoo_config.heads_of(a.layer_idx, 4)]
        seen.append(on)
        return 2.0 + sum(gains.get(p, 0.0) for p in on)

    assert search_heads(model, eval_fn, progress=False) == [(0, 1), (1, 3)]
    assert seen == [[]] + [[(i, h)] for i in range(2) for h in range(4)]  # baseline, then each head alone
    assert search_heads(model, eval_fn, candidates=[(1, 3), (0, 2)], progress=False) == [(1, 3)]
    assert not any(hasattr(m, "vzoo_config") for m in model.modules())
    with pytest.raises(ValueError, match="candidates must be"):
        search_heads(model, eval_fn, candidates=[(0, -1)], progress=False)


def test_sink_map_equals_loops_over_eager_maps():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(6))
    received, sinks = sink_map(model, ids[0], tau=0.1)
    assert model.config._attn_implementation == "sdpa"  # restored
    model.set_attn_implementation("eager")
    with torch.no_grad():
        maps = model(ids, output_attentions=True).attentions
    t = ids.shape[1]
    want = torch.tensor([[[sum(float(a[0, h, i, j]) for i in range(j, t)) / (t - j) for j in range(t)]
                          for h in range(4)] for a in maps])
    assert received.shape == (2, 4, t)
    torch.testing.assert_close(received, want)
    assert torch.equal(sinks, want > 0.1) and sinks[:, :, 0].any()
    with pytest.raises(ValueError, match="input_ids: expected shape"):
        sink_map(model, ids.expand(2, t))
