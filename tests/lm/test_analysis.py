"""Preplan-and-anchor rhythm (vzoo.lm.analysis): WAAD, FAI and head distances against token loops and closed forms,
the head split, preplan/anchor flags, the credit scale on advantages, a tiny random Llama end to end and the
``analyze_rhythm`` files."""

from __future__ import annotations

import json

import pytest
import torch

from vzoo.lm.analysis import (
    analyze_rhythm, apply_credit, attention_maps, classify_heads, credit_scale, fai, head_average, head_distance,
    middle_layers, preplan_anchor, waad,
)


def random_causal(T: int, lead: tuple[int, ...] = (), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*lead, T, T, generator=g, dtype=torch.float64) * 2
    return logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


def loop_waad(A: torch.Tensor, W: int) -> list[float]:
    T = A.shape[0]
    return [sum(A[t, s].item() * min(t - s, W) for s in range(t + 1)) for t in range(T)]


def loop_fai(A: torch.Tensor, h_lo: int, h_hi: int, response: list[bool]) -> list[float]:
    T = A.shape[0]
    out = []
    for s in range(T):
        ts = [t for t in range(s + h_lo, min(T - 1, s + h_hi) + 1) if response[t]]
        out.append(sum(A[t, s].item() for t in ts) / len(ts) if ts else 0.0)
    return out


# ------------------------------------------------------------------------------------------------ WAAD


def test_waad_closed_forms():
    T, W = 30, 10
    eye = torch.eye(T, dtype=torch.float64)
    assert torch.equal(waad(eye, W), torch.zeros(T, dtype=torch.float64))
    prev = torch.zeros(T, T, dtype=torch.float64)
    prev[0, 0] = 1
    prev[torch.arange(1, T), torch.arange(T - 1)] = 1
    assert waad(prev, W).tolist() == [0.0] + [1.0] * (T - 1)
    first = torch.zeros(T, T, dtype=torch.float64)
    first[:, 0] = 1
    assert waad(first, W).tolist() == [float(min(t, W)) for t in range(T)]


def test_waad_matches_loop_and_batches():
    A = random_causal(24, (2, 3))
    out = waad(A, 5)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out[1, 2], torch.tensor(loop_waad(A[1, 2], 5), dtype=torch.float64))
    assert (out >= 0).all() and (out <= 5 + 1e-12).all()


# ------------------------------------------------------------------------------------------------- FAI


def test_fai_closed_form_column_from_future_window():
    T, s0 = 80, 7
    A = torch.eye(T, dtype=torch.float64)
    for t in range(s0 + 10, s0 + 51):
        A[t] = 0
        A[t, s0] = 1
    out = fai(A, 10, 50)
    expected = torch.zeros(T, dtype=torch.float64)
    expected[s0] = 1
    assert torch.equal(out, expected)


def test_fai_matches_loop_with_prompt():
    T = 70
    A = random_causal(T, seed=1)
    for response in (None, 15):
        resp = [True] * T if response is None else [t >= response for t in range(T)]
        ref = torch.tensor(loop_fai(A, 10, 50, resp), dtype=torch.float64)
        torch.testing.assert_close(fai(A, 10, 50, response), ref)
    mask = torch.rand(T, generator=torch.Generator().manual_seed(2)) > 0.3
    torch.testing.assert_close(fai(A, 3, 9, mask), torch.tensor(loop_fai(A, 3, 9, mask.tolist()), dtype=torch.float64))
    assert fai(A)[-10:].eq(0).all()  # no token of the future window exists


def test_bad_inputs():
    with pytest.raises(ValueError, match="T, T"):
        waad(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="h_lo"):
        fai(torch.eye(5), 6, 2)
    with pytest.raises(ValueError, match="response"):
        fai(torch.eye(5), 1, 2, 9)
    with pytest.raises(ValueError, match="q="):
        classify_heads(torch.rand(2, 4), 0.7)


# ------------------------------------------------------------------------------------------------ heads


def test_head_distance_matches_loop():
    A = random_causal(20, (2, 3), seed=3)
    d = head_distance(A, 5)
    assert d.shape == (2, 3)
    for l in range(2):
        for h in range(3):
            per = [sum(A[l, h, t, s].item() * (t - s) for s in range(t + 1)) for t in range(5, 20)]
            assert d[l, h].item() == pytest.approx(sum(per) / len(per), rel=1e-12)


def test_classify_heads_split_sizes():
    d = torch.tensor([[5.0, 1.0, 9.0, 3.0], [7.0, 2.0, 8.0, 4.0], [6.0, 0.5, 10.0, 2.5]])  # 12 heads: 3 each
    local, glob = classify_heads(d, 0.3)
    assert local.sum() == 3 and glob.sum() == 3 and not (local & glob).any()
    assert sorted(d[local].tolist()) == [0.5, 1.0, 2.0]
    assert sorted(d[glob].tolist()) == [8.0, 9.0, 10.0]
    local, glob = classify_heads(torch.rand(2, 4), 0.3)  # 8 heads: floor(2.4) = 2
    assert local.sum() == 2 and glob.sum() == 2


def test_middle_layers():
    assert middle_layers(30) == [10, 12, 14, 17, 19]
    assert middle_layers(2) == [0, 1]
    assert middle_layers(9) == [3, 4, 5]
    assert middle_layers(30, count=1) == [14]  # the middle of layers 10..19


# ------------------------------------------------------------------------------------- preplan, anchors


def test_preplan_anchor_and_coupled_credit():
    #       t: 0    1    2    3    4    5    6    7    8    9
    w = torch.tensor([1.0, 1.0, 6.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    f = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.8, 0.0])
    fl = preplan_anchor(w, f, q=0.2, k=3)  # 2 preplan tokens, 2 anchors
    delta = [abs(w[t].item() - w[t + 1].item()) for t in range(9)] + [0.0]
    assert fl["delta"].tolist() == delta
    assert torch.nonzero(fl["preplan"]).flatten().tolist() == [1, 2]
    assert torch.nonzero(fl["anchor"]).flatten().tolist() == [4, 8]
    # anchor 4: WAAD 1 <= median and preplan token 2 within 3 tokens before it; anchor 8: no preplan in 5..7
    assert fl["source"].tolist() == [-1, -1, -1, -1, 2, -1, -1, -1, -1, -1]
    assert torch.nonzero(fl["dominated"]).flatten().tolist() == [4]
    gamma = credit_scale(fl, "coupled")
    assert gamma.tolist() == [1, 1, 1.25, 1, 1.25, 1, 1, 1, 1.5, 1]
    assert credit_scale(fl, "anchor").tolist() == [1, 1, 1, 1, 1.5, 1, 1, 1, 1.5, 1]
    assert credit_scale(fl, "preplan").tolist() == [1, 1.5, 1.5, 1, 1, 1, 1, 1, 1, 1]
    prompt = preplan_anchor(w, f, q=0.2, k=3, response=5)  # flags only on response tokens 5..9
    assert not prompt["preplan"][:5].any() and not prompt["anchor"][:5].any()
    assert torch.nonzero(prompt["anchor"]).flatten().tolist() == [8]


def test_credit_leaves_negative_advantages_untouched():
    adv = torch.tensor([[0.5, -0.5, 0.0, 2.0], [-1.0, 1.0, -3.0, 0.25]], requires_grad=True)
    gamma = torch.tensor([1.5, 1.5, 1.25, 1.0])
    out = apply_credit(adv, gamma)
    expected = [[0.75, -0.5, 0.0, 2.0], [-1.0, 1.5, -3.0, 0.25]]
    assert out.tolist() == expected
    out.sum().backward()
    assert adv.grad.tolist() == [[1.5, 1.0, 1.25, 1.0], [1.0, 1.5, 1.0, 1.0]]
    with pytest.raises(ValueError, match="broadcast"):
        apply_credit(adv, torch.ones(3))


# -------------------------------------------------------------------------------------- tiny model, files


def test_tiny_llama_end_to_end(lm):
    model = lm.make(layers=2)
    ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(0))
    A = attention_maps(model, ids)
    assert A.shape == (2, 4, 64, 64) and model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 4, 64))
    assert A.triu(1).abs().max() == 0
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(ids, output_attentions=True).attentions[1][0]
    torch.testing.assert_close(A[1], ref)
    local, glob = classify_heads(head_distance(A), 0.3)
    assert local.sum() == 2 and glob.sum() == 2
    w, f = waad(head_average(A, local)), fai(head_average(A, glob))
    assert w.shape == f.shape == (64,)
    assert (w >= 0).all() and (w <= 10).all() and (f >= 0).all() and (f <= 1).all()
    with pytest.raises(ValueError, match="batch 1"):
        attention_maps(model, ids.repeat(2, 1))


def test_analyze_rhythm_writes_files(lm, tmp_path):
    words = lm.checkpoint(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(words[1 + (i * 7) % 90] for i in range(90)))
    out = tmp_path / "out"
    result = analyze_rhythm(tmp_path / "model", text, out, prompt_tokens=10, max_tokens=80)
    assert sorted(p.name for p in out.iterdir()) == ["rhythm.json", "rhythm.png"]
    assert (out / "rhythm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "rhythm.json").read_text())
    assert saved == json.loads(json.dumps(result))
    tokens = saved["tokens"]
    assert len(tokens) == 80 and tokens[3]["text"] == words[1 + 21 % 90]
    assert all(0 <= t["waad"] <= 10 and 0 <= t["fai"] <= 1 and t["gamma"] in (1, 1.25, 1.5) for t in tokens)
    assert not any(t["preplan"] or t["anchor"] for t in tokens[:10])
    assert sum(t["anchor"] for t in tokens) == 28  # floor(0.4 * 70) response tokens
    assert saved["heads"]["layers"] == [1]  # the middle third of 3 layers
    assert len(saved["heads"]["local"]) == len(saved["heads"]["global"]) == 1  # floor(0.3 * 4) heads
    with pytest.raises(ValueError, match="prompt_tokens"):
        analyze_rhythm(tmp_path / "model", text, out, prompt_tokens=80, max_tokens=80)
