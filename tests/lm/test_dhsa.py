"""DHSA: boundaries, representatives and selection against loop oracles, attention exact to the selection
(GQA, padding, per-head selections), equality with eager attention at full budget, dense decoding, the
boundary predictor (trains, saves, loads, refuses corrupt files) and config checks."""

from __future__ import annotations

import math

import pytest
import torch

from vzoo.lm import DHSAConfig, apply_sparse_attention
from vzoo.lm.dhsa import (
    BoundaryPredictor, chunk_starts, dhsa_attention, dhsa_selection, layout_chunks, load_boundary_predictors,
    pick_boundaries, representatives, save_boundary_predictors, similarity_scores,
)
from vzoo.lm.train_boundaries import boundary_labels, train_boundaries


def _topic_keys(b: int, h: int, s: int, d: int, seed: int) -> torch.Tensor:
    """Keys drawn around piecewise-constant topics of random lengths (clear similarity shifts)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.empty(b, h, s, d)
    for bi in range(b):
        t = 0
        while t < s:
            n = int(torch.randint(3, 15, (1,), generator=g))
            keys[bi, :, t : t + n] = torch.randn(h, 1, d, generator=g)
            t += n
    return keys + 0.3 * torch.randn(b, h, s, d, generator=g)


def _oracle_starts(k, window, max_similarity, min_chunk, max_chunk):
    """Loops: gap scores, candidates (threshold, ends, windowed maximum), even splits of long chunks."""
    b, h, s, d = k.shape
    x = k.permute(0, 2, 1, 3).reshape(b, s, h * d).double()
    out = torch.zeros(b, s, dtype=torch.bool)
    for bi in range(b):
        sim = [1.0] * s
        for t in range(1, s):
            left = x[bi, max(0, t - window) : t].mean(0)
            right = x[bi, t : min(s, t + window)].mean(0)
            sim[t] = torch.nn.functional.cosine_similarity(left, right, dim=0, eps=1e-6).item()
        score = [-v for v in sim]
        starts = [0]
        for t in range(min_chunk, s - min_chunk + 1):
            before = [score[j] for j in range(t - min_chunk + 1, t) if j >= 0]
            after = [score[j] for j in range(t + 1, t + min_chunk) if j < s]
            if score[t] > -max_similarity and all(score[t] > v for v in before) and all(score[t] >= v for v in after):
                starts.append(t)
        ends = starts[1:] + [s]
        for begin, end in zip(starts, ends):
            n = end - begin
            pieces = math.ceil(n / max_chunk)
            for j in range(pieces):
                out[bi, begin + (j * n) // pieces] = True
    return out


@pytest.mark.parametrize("window,max_similarity,min_chunk,max_chunk", [(3, 1.0, 4, 9), (1, 0.2, 2, 5), (2, 0.5, 1, 3)])
def test_boundary_rule_matches_loop_oracle(window, max_similarity, min_chunk, max_chunk):
    k = _topic_keys(2, 2, 70, 8, seed=window)
    got = chunk_starts(pick_boundaries(-similarity_scores(k, window), -max_similarity, min_chunk), max_chunk)
    want = _oracle_starts(k, window, max_similarity, min_chunk, max_chunk)
    assert torch.equal(got, want)
    assert 3 < int(want[0].sum()) < 60 and not torch.equal(want[0], want[1])
    gaps = [torch.diff(torch.cat([torch.nonzero(r)[:, 0], torch.tensor([70])])) for r in got]
    assert all(int(g.max()) <= max_chunk for g in gaps)


def test_representatives_are_mean_times_sqrt_length_over_valid_tokens():
    torch.manual_seed(3)
    starts = torch.zeros(2, 20, dtype=torch.bool)
    starts[:, [0, 3, 10, 11]] = True
    starts[1, 15] = True
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :5] = False  # left padding: the first chunk of row 1 has no valid token
    x = torch.randn(2, 3, 20, 4)
    got = representatives(x, layout_chunks(starts, valid, 4), valid)
    for bi in range(2):
        bounds = torch.nonzero(starts[bi])[:, 0].tolist() + [20]
        for c, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            toks = [t for t in range(lo, hi) if valid[bi, t]]
            want = x[bi, :, toks].mean(1) * math.sqrt(len(toks)) if toks else torch.zeros(3, 4)
            torch.testing.assert_close(got[bi, :, c], want)


def _oracle_keep(config, q, k, starts, valid):
    """Token-level loops: bool ``[B, Hs, S, S]`` keys each query keeps, and the selected density."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    hs = {"shared": 1, "kv": hkv, "query": hq}[config.heads]
    keep = torch.zeros(b, hs, s, s, dtype=torch.bool)
    for bi in range(b):
        bounds = torch.nonzero(starts[bi])[:, 0].tolist() + [s]
        chunk_of = {t: c for c, (lo, hi) in enumerate(zip(bounds, bounds[1:])) for t in range(lo, hi)}
        tokens = [[t for t in range(lo, hi) if valid[bi, t]] for lo, hi in zip(bounds, bounds[1:])]
        sink = next(c for c, toks in enumerate(tokens) if toks)
        for hi_ in range(hs):
            if config.heads == "shared":
                qh, kh = q[bi].double().mean(0), k[bi].double().mean(0)
            elif config.heads == "kv":
                g = hq // hkv
                qh, kh = q[bi, hi_ * g : (hi_ + 1) * g].double().mean(0), k[bi, hi_].double()
            else:
                qh, kh = q[bi, hi_].double(), k[bi, hi_ // (hq // hkv)].double()

            def rep(x, toks):
                return x[toks].sum(0) / math.sqrt(len(toks)) if toks else torch.zeros(d, dtype=torch.float64)

            for i in range(s):
                ci = chunk_of[i]
                cands = [c for c in range(ci + 1) if tokens[c]]
                tail = bounds[ci] >= s - config.dense_tail  # the chunk starts in the dense tail: every key
                forced = [c for c in cands if tail or c >= ci - config.local_chunks or (config.sink and c == sink)]
                score = {c: (rep(qh, tokens[ci]) @ rep(kh, tokens[c])).item() for c in cands}
                rest = sorted((c for c in cands if c not in forced), key=lambda c: (-score[c], c))
                kept, total = [], 0
                for c in forced:
                    kept.append(c)
                    total += len(tokens[c])
                for c in rest:
                    if total >= config.budget:
                        break
                    kept.append(c)
                    total += len(tokens[c])
                for j in range(i + 1):
                    keep[bi, hi_, i, j] = valid[bi, j] and chunk_of[j] in kept
    rows = valid[:, None, :, None]
    n = valid.sum(1).double()
    density = (keep & rows).sum().item() / (hs * (n * (n + 1) / 2).sum().item())
    return keep, density


def _inputs(seed, b=2, s=48, pad=7):
    torch.manual_seed(seed)
    q, v = torch.randn(b, 4, s, 16), torch.randn(b, 2, s, 16)
    k = _topic_keys(b, 2, s, 16, seed)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1, :pad] = False
    return q, k, v, valid


@pytest.mark.parametrize("heads", ["shared", "kv", "query"])
def test_selection_matches_token_level_loop_oracle(heads):
    q, k, v, valid = _inputs(4)
    for budget, local, sink, tail in ((12, 1, True, 0), (20, 0, False, 10), (5, 2, True, 0)):
        config = DHSAConfig(budget=budget, min_chunk=3, max_chunk=7, block_size=4, local_chunks=local, sink=sink, heads=heads,
                            dense_tail=tail)
        starts = chunk_starts(pick_boundaries(-similarity_scores(k, 2), -1.0, 3), 7)
        chunks, chosen, density = dhsa_selection(config, q, k, starts, valid)
        want, want_density = _oracle_keep(config, q, k, starts, valid)
        cid = chunks.cid
        got = torch.stack([chosen[bi][:, cid[bi]][:, :, cid[bi]] for bi in range(2)])
        got = got & torch.ones(48, 48, dtype=torch.bool).tril() & valid[:, None, None, :]
        assert torch.equal(got, want)
        assert density == pytest.approx(want_density, rel=1e-9)
        assert 0.1 < want_density < 0.9  # really sparse, really selecting


def _masked_softmax_attention(q, k, v, keep, scale):
    """Dense attention of ``q [B, H, S, D]`` over the keys ``keep [B, Hs, S, S]`` allows (GQA)."""
    hq = q.shape[1]
    k, v = (x.repeat_interleave(hq // x.shape[1], 1).double() for x in (k, v))
    keep = keep.repeat_interleave(hq // keep.shape[1], 1)
    scores = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return (probs @ v).float()


@pytest.mark.parametrize("heads", ["shared", "kv", "query"])
def test_attention_is_exact_to_the_selection_with_gqa_and_padding(heads):
    q, k, v, valid = _inputs(5)
    config = DHSAConfig(budget=12, min_chunk=3, max_chunk=7, block_size=4, boundary_window=2, heads=heads, local_chunks=1,
                        dense_tail=5, dense_fallback=False)
    mask = torch.ones(48, 48, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    out = dhsa_attention(config, q, k, v, mask, 0.25)
    candidates = pick_boundaries(-similarity_scores(k, 2), -1.0, 3)
    candidates[:, 48 - 5] = True  # the dense tail starts its own chunk
    starts = chunk_starts(candidates, 7)
    keep, _ = _oracle_keep(config, q, k, starts, valid)
    want = _masked_softmax_attention(q, k, v, keep, 0.25)
    rows = valid[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[rows], want[rows], atol=1e-5, rtol=1e-5)
    full = _masked_softmax_attention(q, k, v, mask.expand(2, 1, 48, 48), 0.25)
    assert not torch.allclose(out[rows], full[rows], atol=1e-3)  # really sparse


def test_decode_steps_run_dense_attention():
    q, k, v, _ = _inputs(6)
    config = DHSAConfig(budget=4, min_chunk=3, max_chunk=7, dense_tail=0, dense_fallback=False)
    out = dhsa_attention(config, q[:, :, -1:], k, v, None, 0.25)
    want = torch.nn.functional.scaled_dot_product_attention(q[:, :, -1:], k, v, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_full_budget_equals_eager_with_left_padding_and_generate(lm, kind):
    lm.assert_equals_eager(lm.make(kind), DHSAConfig(budget=10**6, min_chunk=3, max_chunk=6, block_size=4, dense_fallback=False))


def test_sparse_in_a_model_records_density_and_is_removed(lm):
    model = lm.make()
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = model(ids).logits
        config = DHSAConfig(budget=8, min_chunk=3, max_chunk=6, block_size=4, local_chunks=1, dense_tail=4, layers=(0, 2),
                            dense_fallback=False)
        with apply_sparse_attention(model, config) as handle:
            sparse = model(ids).logits
            assert handle.sparse_calls == 2 and 0.05 < handle.density < 0.6
            model.generate(ids, max_new_tokens=3, do_sample=False)  # decode steps are dense: no new records
            assert handle.sparse_calls == 4
        assert not torch.allclose(sparse, stock, atol=1e-3)
        assert torch.equal(model(ids).logits, stock)


def test_predictor_sees_only_its_window():
    torch.manual_seed(7)
    pred = BoundaryPredictor(channels=8, window=3, hidden=16, heads=2).eval()
    x = torch.randn(1, 30, 8)
    y = x.clone()
    y[0, 20] += 5.0  # token 20 lies in the windows of gaps 18 .. 23 only
    with torch.no_grad():
        a, b = pred(x), pred(y)
    changed = torch.nonzero((a - b).abs()[0] > 1e-6)[:, 0].tolist()
    assert changed == list(range(18, 24))


def _structured_ids(n: int, s: int) -> torch.Tensor:
    """Token ids in runs of one repeated 4-token phrase (sharp key shifts between runs)."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for _ in range(n):
        parts = []
        while sum(len(p) for p in parts) < s:
            phrase = torch.randint(0, 97, (4,), generator=g)
            parts.append(phrase.repeat(int(torch.randint(2, 5, (1,), generator=g))))
        rows.append(torch.cat(parts)[:s])
    return torch.stack(rows)


def test_predictor_trains_saves_loads_and_refuses_bad_files(lm, tmp_path):
    model = lm.make(layers=2)
    config = DHSAConfig(boundaries="predictor", min_chunk=3, max_chunk=6, boundary_window=2, predictor_hidden=32)
    sequences = _structured_ids(4, 48)
    preds, losses = train_boundaries(model, sequences, 40, config=config, lr=3e-3, batch_size=2, progress=False)
    assert sorted(preds) == [0, 1]
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    path = save_boundary_predictors(preds, tmp_path / "b.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors"]  # atomic: no partial file left
    loaded = load_boundary_predictors(path)
    x = torch.randn(1, 20, 32)
    for i in (0, 1):
        torch.testing.assert_close(loaded[i](x), preds[i](x))
    ids = sequences[:1]
    config = DHSAConfig(boundaries="predictor", predictor=str(path), budget=8, min_chunk=3, max_chunk=6, boundary_window=2,
                        block_size=4, local_chunks=1, dense_tail=4, dense_fallback=False)
    with torch.no_grad(), apply_sparse_attention(model, config) as handle:
        attn = model.model.layers[1].self_attn
        for name, p in attn.vzoo_boundary_predictor.state_dict().items():
            assert torch.equal(p, preds[1].state_dict()[name])
        model(ids)
        assert handle.sparse_calls == 2
    assert not hasattr(attn, "vzoo_boundary_predictor") and not hasattr(attn, "vzoo_pending_keys")
    labels = boundary_labels(torch.randn(1, 40, 32), config)
    assert labels.sum() > 0
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(ValueError, match="cannot read"):
        load_boundary_predictors(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a DHSA boundary predictor file"):
        load_boundary_predictors(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"no boundary predictor for layers \[5\]"):
        load_boundary_predictors(path, layers=(5,))
    with pytest.raises(FileNotFoundError):
        load_boundary_predictors(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("kwargs,field", [
    (dict(budget=0), "budget"), (dict(min_chunk=0), "min_chunk"), (dict(min_chunk=40, max_chunk=64), "max_chunk"),
    (dict(boundary_window=0), "boundary_window"), (dict(max_similarity=1.5), "max_similarity"),
    (dict(block_size=0), "block_size"), (dict(local_chunks=-1), "local_chunks"), (dict(sink=1), "sink"),
    (dict(dense_tail=-1), "dense_tail"),
    (dict(heads="group"), "heads"), (dict(boundaries="learned"), "boundaries"), (dict(predictor="p.safetensors"), "predictor"),
    (dict(predictor_threshold=1.0), "predictor_threshold"), (dict(predictor_hidden=0), "predictor_hidden"),
    (dict(layers=(-1,)), "layers"), (dict(dense_fallback="no"), "dense_fallback"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"DHSAConfig.{field}="):
        DHSAConfig(**kwargs)


def test_lm_boundaries_command_trains_saves_and_the_model_uses_the_file(lm, tmp_path, capsys):
    from vzoo.cli import main

    words = lm.checkpoint(tmp_path / "model")
    text = tmp_path / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[1 + int(i)] for i in torch.randint(0, 90, (400,), generator=g)))
    out = tmp_path / "bounds.safetensors"
    assert main(["train", "lm-boundaries", "--model", str(tmp_path / "model"), "--data", str(text), "--out", str(out),
                 "--steps", "2", "--seq-len", "64"]) == 0
    assert capsys.readouterr().out.strip().endswith("bounds.safetensors") and out.is_file()
    model = lm.make()
    ids = torch.randint(0, 97, (1, 64), generator=g)
    with torch.no_grad(), apply_sparse_attention(model, DHSAConfig(boundaries="predictor", predictor=str(out))) as handle:
        model(ids)
        assert handle.sparse_calls > 0
    with pytest.raises(FileNotFoundError, match="no config.json"):
        main(["train", "lm-boundaries", "--model", str(tmp_path), "--data", str(text)])
