"""Localist attention (vzoo.lm.localist): the group-sparsity penalty, entropy and pointer fidelity against loops
and closed forms, gradient descent under the penalty, the training hook, and a tiny Llama trained with and
without the locality dial."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vzoo.lm.localist import (
    LocalistPenalty, attention_entropy_bits, block_groups, group_sparsity_penalty, pointer_fidelity, target_mask,
)


def rows(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2).softmax(-1)


def loop_penalty(row: list[float], groups: list[int], weights: list[float]) -> float:
    G = max(groups) + 1
    mass = [sum(a for a, g in zip(row, groups) if g == j) for j in range(G)]
    l1 = sum(w * math.sqrt(m) for w, m in zip(weights, mass))
    return l1 - math.sqrt(sum(w * w * m for w, m in zip(weights, mass)))


def test_penalty_zero_when_each_query_in_one_group():
    groups = block_groups(12, 3)  # 4 groups of 3
    attn = torch.zeros(2, 3, 5, 12, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for b in range(2):
        for h in range(3):
            for q in range(5):
                j = int(torch.randint(0, 4, (1,), generator=g))
                attn[b, h, q, 3 * j:3 * j + 3] = torch.rand(3, generator=g, dtype=torch.float64).softmax(0)
    out = group_sparsity_penalty(attn, groups, reduce=False)
    torch.testing.assert_close(out, torch.zeros(2, 3, 5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_penalty_maximal_for_uniform_spread():
    for G, size in ((4, 3), (9, 2)):
        attn = torch.full((1, 1, 2, G * size), 1.0 / (G * size), dtype=torch.float64)
        value = group_sparsity_penalty(attn, block_groups(G * size, size))
        assert value.item() == pytest.approx(math.sqrt(G) - 1, rel=1e-12)
        other = group_sparsity_penalty(rows((2, 3, 50, G * size), seed=G), block_groups(G * size, size), reduce=False)
        assert (other < value).all() and (other > 0).all()


def test_penalty_matches_loop_with_weights_and_ungrouped_keys():
    attn = rows((2, 2, 4, 10), seed=3)
    groups = torch.tensor([0, 0, 1, 1, 1, -1, 2, 2, -1, 2])
    weights = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    out = group_sparsity_penalty(attn, groups, weights, reduce=False)
    for b in range(2):
        for h in range(2):
            for q in range(4):
                row = attn[b, h, q].tolist()
                kept = [(a, g) for a, g in zip(row, groups.tolist()) if g >= 0]
                ref = loop_penalty([a for a, _ in kept], [g for _, g in kept], weights.tolist())
                assert out[b, h, q].item() == pytest.approx(ref, rel=1e-12)
    torch.testing.assert_close(group_sparsity_penalty(attn, groups, weights), out.mean())


def test_penalty_gradient_finite_under_causal_mask():
    logits = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    attn = logits.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    group_sparsity_penalty(attn, block_groups(8, 2)).backward()  # early queries see only group 0: zero masses
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_entropy_bits():
    n = 16
    uniform = torch.full((3, n), 1.0 / n, dtype=torch.float64)
    torch.testing.assert_close(attention_entropy_bits(uniform), torch.full((3,), 4.0, dtype=torch.float64))
    assert attention_entropy_bits(torch.eye(5, dtype=torch.float64)).eq(0).all()
    attn = rows((2, 3, 7))
    out = attention_entropy_bits(attn)
    assert out.shape == (2, 3)
    ref = [[-sum(a * math.log2(a) for a in attn[i, j].tolist()) for j in range(3)] for i in range(2)]
    torch.testing.assert_close(out, torch.tensor(ref, dtype=torch.float64))


def test_pointer_fidelity_matches_loop():
    attn = rows((2, 3, 6, 12), seed=5)
    groups = block_groups(12, 4)
    targets = torch.tensor([0, 2, 1, 1, 0, 2])
    out = pointer_fidelity(attn, target_mask(groups, targets))
    assert out.shape == (2, 3, 6)
    for b in range(2):
        for h in range(3):
            for q in range(6):
                ref = sum(attn[b, h, q, k].item() for k in range(12) if k // 4 == targets[q].item())
                assert out[b, h, q].item() == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError, match="bool"):
        pointer_fidelity(attn, targets)


def test_gradient_descent_on_the_penalty_lowers_entropy():
    logits = torch.randn(1, 2, 6, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_()
    groups = block_groups(16, 4)
    opt = torch.optim.SGD([logits], lr=1.0)
    entropy, top_mass, penalty = [], [], []
    for step in range(61):
        attn = logits.softmax(-1)
        loss = group_sparsity_penalty(attn, groups, reduce=False).sum()
        if step % 10 == 0:
            with torch.no_grad():
                entropy.append(attention_entropy_bits(attn).mean().item())
                top_mass.append(attn.reshape(1, 2, 6, 4, 4).sum(-1).max(-1).values.mean().item())
                penalty.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(a > b for a, b in zip(entropy, entropy[1:])), entropy
    assert all(a < b for a, b in zip(top_mass, top_mass[1:])), top_mass
    assert penalty[-1] < 0.2 * penalty[0]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def test_hook_records_eager_maps_and_adds_the_penalty():
    model = tiny_llama().eval()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref_maps = model(ids, output_attentions=True).attentions
    model.set_attn_implementation(original)
    with LocalistPenalty(model, 8, dial=0.5) as hook:
        model(ids)
        assert len(hook.maps) == 2 and hook.maps[0].shape == (2, 4, 24, 24)
        expected = 0.5 * torch.stack([group_sparsity_penalty(a, block_groups(24, 8)) for a in ref_maps]).mean()
        loss = hook.loss()
        torch.testing.assert_close(loss, expected)
        assert hook.maps == []
        loss.backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    assert model.config._attn_implementation == original
    with LocalistPenalty(model, torch.tensor([0] * 12 + [1] * 12), dial=1.0, layers=[1]) as hook:
        model(ids)
        assert len(hook.maps) == 1
        torch.testing.assert_close(hook.loss(), group_sparsity_penalty(ref_maps[1], torch.tensor([0] * 12 + [1] * 12)))
    with pytest.raises(ValueError, match="layers"):
        LocalistPenalty(model, 8, 0.5, layers=[5])
    with pytest.raises(ValueError, match="dial"):
        LocalistPenalty(model, 8, -1.0)


def train_entropy(dial: float) -> float:
    """30 Adam steps of a tiny Llama on a periodic token stream with the penalty at ``dial``; mean attention
    entropy (bits) on held-out windows afterwards."""
    model = tiny_llama().train()
    stream = torch.tensor([(i * 7 + (i // 11) * 3) % 97 for i in range(2000)])
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    with LocalistPenalty(model, 8, dial) as hook:
        for _ in range(30):
            starts = torch.randint(0, 1500, (4,), generator=g)
            ids = torch.stack([stream[s:s + 32] for s in starts.tolist()])
            loss = model(ids, labels=ids).loss + hook.loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            ids = torch.stack([stream[s:s + 32] for s in (1600, 1700, 1800)])
            model(ids)
            maps = list(hook.maps)
            hook.maps.clear()
    return torch.stack([attention_entropy_bits(a).mean() for a in maps]).mean().item()


def test_training_with_the_dial_lowers_entropy():
    plain, localist = train_entropy(0.0), train_entropy(1.0)
    assert localist < plain - 0.2, (plain, localist)
