"""Block-diffusion objectives against token loops: complementary pairs (disjoint, covering exactly the response),
per-block masking statistics, the position-dependent schedule against a bisection solve, empirical masking
frequencies, the [x_t ; x_0] input, the loss with and without token shift, and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from vzoo.lm.diffusion_objectives import (
    IGNORE_INDEX, bd3_inputs, complementary_masking, diffusion_loss, pad_to_block, position_dependent_mask_probs,
    position_dependent_masking, shift_labels,
)

MASK = 99


def batch(b=3, t=16, prompts=(3, 0, 9), seed=0):
    """ids in [0, 50) and a response mask that is False on each row's first ``prompts[r]`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (b, t), generator=g)
    resp = torch.ones(b, t, dtype=torch.bool)
    for r, n in enumerate(prompts):
        resp[r, :n] = False
    return ids, resp


def loop_probs(t: float, b: int, lam: float) -> list[float]:
    """p_i = min(1, c w_i), w_i = exp(ln2 / (lam b) (1 - t) i), with c found by bisection so that sum p = t b."""
    beta = math.log(2.0) / (lam * b)
    w = [math.exp(beta * (1.0 - t) * i) for i in range(b)]
    lo, hi = 0.0, 1.0 / min(w)
    for _ in range(200):
        c = (lo + hi) / 2
        if sum(min(1.0, c * x) for x in w) < t * b:
            lo = c
        else:
            hi = c
    return [min(1.0, hi * x) for x in w]


def z_ok(count: float, n: int, p: float, z: float = 5.0) -> bool:
    """``count`` successes of ``n`` Bernoulli(p) trials within ``z`` standard deviations (exact at p in {0, 1})."""
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1e-9


# ----------------------------------------------------------------------------------------- complementary masking

def test_complementary_pair_partitions_the_response():
    ids, resp = batch()
    noisy, labels = complementary_masking(ids, resp, 4, MASK, generator=torch.Generator().manual_seed(1))
    b, t = ids.shape
    assert noisy.shape == labels.shape == (2 * b, t)
    for r in range(b):
        for j in range(t):
            m1, m2 = noisy[r, j] == MASK, noisy[b + r, j] == MASK
            if not resp[r, j]:
                assert not m1 and not m2, "prompt token masked"
                assert noisy[r, j] == noisy[b + r, j] == ids[r, j]
            else:
                assert m1 != m2, "a response token must be masked in exactly one copy"
            for row, m in ((r, m1), (b + r, m2)):
                assert labels[row, j] == (ids[r, j] if m else IGNORE_INDEX)
                if not m:
                    assert noisy[row, j] == ids[r, j]
    supervised = (labels != IGNORE_INDEX).sum()
    assert supervised == resp.sum()  # each response token supervised exactly once per pair


def test_complementary_fixed_rates_per_block():
    """With t given, copy 1 masks Binomial(b, (1 - eps) t + eps) tokens per block; copy 2 the rest (a large eps so
    that the floor shows)."""
    n, block, eps = 3000, 4, 0.25
    levels = torch.tensor([[0.0, 0.1, 0.5, 0.9, 1.0]], dtype=torch.float64)
    ids = torch.zeros(n, 5 * block, dtype=torch.long)
    resp = torch.ones_like(ids, dtype=torch.bool)
    noisy, _ = complementary_masking(ids, resp, block, MASK, torch.Generator().manual_seed(2), eps, t=levels)
    m1, m2 = (noisy[:n] == MASK), (noisy[n:] == MASK)
    for k, lvl in enumerate(levels[0].tolist()):
        p = (1 - eps) * lvl + eps
        c1 = int(m1[:, k * block:(k + 1) * block].sum())
        c2 = int(m2[:, k * block:(k + 1) * block].sum())
        assert c1 + c2 == n * block
        assert z_ok(c1, n * block, p), (k, c1 / (n * block), p)


def test_complementary_drawn_levels_are_per_block():
    """t ~ U(0, 1) per block: two tokens of one block are masked together with E[p^2] (~1/3), tokens of different
    blocks independently with E[p]^2 (~1/4)."""
    n, block, eps = 20000, 4, 1e-3
    ids = torch.zeros(n, 2 * block, dtype=torch.long)
    resp = torch.ones_like(ids, dtype=torch.bool)
    noisy, _ = complementary_masking(ids, resp, block, MASK, torch.Generator().manual_seed(3), eps)
    m = (noisy[:n] == MASK).double()
    mean_p = eps + (1 - eps) / 2
    mean_p2 = eps ** 2 + eps * (1 - eps) + (1 - eps) ** 2 / 3
    tol = 5 * math.sqrt(0.25 / n)
    assert abs(m.mean() - mean_p) < tol
    assert abs((m[:, 0] * m[:, 1]).mean() - mean_p2) < tol
    assert abs((m[:, 2] * m[:, 5]).mean() - mean_p ** 2) < tol
    assert abs((m[:, 3] * m[:, 4]).mean() - mean_p ** 2) < tol


def test_complementary_generator_reproducible():
    ids, resp = batch()
    a = complementary_masking(ids, resp, 4, MASK, torch.Generator().manual_seed(5))
    b = complementary_masking(ids, resp, 4, MASK, torch.Generator().manual_seed(5))
    c = complementary_masking(ids, resp, 4, MASK, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_pad_to_block():
    ids, resp = batch(t=10)
    pid, presp = pad_to_block(ids, resp, 4, pad_id=7)
    assert pid.shape == presp.shape == (3, 12)
    for r in range(3):
        for j in range(12):
            if j < 10:
                assert pid[r, j] == ids[r, j] and presp[r, j] == resp[r, j]
            else:
                assert pid[r, j] == 7 and not presp[r, j]
    same = pad_to_block(pid, presp, 4, pad_id=7)
    assert same[0] is pid and same[1] is presp
    noisy, labels = complementary_masking(pid, presp, 4, MASK)
    assert not (noisy[:, 10:] == MASK).any() and (labels[:, 10:] == IGNORE_INDEX).all()


# ------------------------------------------------------------------------------------- position-dependent schedule

@pytest.mark.parametrize("lam", [0.05, 0.1, 0.25, 1.0])
@pytest.mark.parametrize("block", [1, 4, 8, 32])
def test_mask_probs_match_bisection(block, lam):
    ts = [0.0, 1e-3, 0.05, 0.2, 0.37, 0.5, 0.8, 0.99, 1.0]
    probs = position_dependent_mask_probs(torch.tensor(ts, dtype=torch.float64), block, half_life=lam)
    assert probs.shape == (len(ts), block) and probs.dtype == torch.float64
    for row, t in zip(probs.tolist(), ts):
        want = loop_probs(t, block, lam)
        assert max(abs(a - b) for a, b in zip(row, want)) < 1e-9, (t, row, want)
        assert all(0.0 <= p <= 1.0 for p in row)
        assert all(row[i] <= row[i + 1] for i in range(block - 1)), "not monotone in position"
        assert abs(sum(row) / block - t) < 1e-12, "block mean is not t"


def test_mask_probs_shape_dtype_and_weight_ratio():
    t = torch.rand(2, 3, generator=torch.Generator().manual_seed(0))
    probs = position_dependent_mask_probs(t, 8)
    assert probs.shape == (2, 3, 8) and probs.dtype == torch.float32
    assert torch.allclose(probs.mean(-1), t, atol=1e-6)
    # small t: nothing clipped, so the weight doubles every half_life * block positions at rate (1 - t)
    t0, block, lam = 0.05, 16, 0.25
    p = position_dependent_mask_probs(t0, block, half_life=lam).double()
    assert p.max() < 1
    step = round(lam * block)
    assert torch.allclose(p[step:] / p[:-step], torch.full((block - step,), 2.0 ** (1 - t0), dtype=torch.float64))
    assert torch.equal(position_dependent_mask_probs(0.3, 5, "uniform"), torch.full((5,), 0.3))
    flat = position_dependent_mask_probs(torch.tensor(1.0), 6)
    assert torch.equal(flat, torch.ones(6))
    # later positions are masked more at every t < 1
    many = position_dependent_mask_probs(torch.linspace(0.01, 0.99, 50, dtype=torch.float64), 32)
    assert (many[:, -1] > many[:, 0]).all()


def test_mask_probs_callable_schedule():
    linear = lambda t, b: (t[..., None] * 2 * (torch.arange(b) + 0.5) / b).clamp(max=1.0)  # noqa: E731
    t = torch.tensor([0.1, 0.4])
    assert torch.equal(position_dependent_mask_probs(t, 4, linear), linear(t, 4))
    with pytest.raises(ValueError, match="schedule returned"):
        position_dependent_mask_probs(t, 4, lambda t, b: torch.zeros(b))
    with pytest.raises(ValueError, match="outside"):
        position_dependent_mask_probs(t, 4, lambda t, b: t[..., None] * 3 + torch.zeros(b))


def test_position_masking_frequencies_fixed_levels():
    n, block, eps, lam = 4000, 8, 0.1, 0.1
    levels = [0.2, 0.6, 0.0]
    ids = torch.zeros(n, 3 * block, dtype=torch.long)
    resp = torch.ones_like(ids, dtype=torch.bool)
    noisy, labels = position_dependent_masking(ids, resp, block, MASK, torch.Generator().manual_seed(4),
                                               half_life=lam, eps=eps, t=torch.tensor([levels]))
    assert noisy.shape == labels.shape == ids.shape
    counts = (noisy == MASK).sum(0).tolist()
    for k, lvl in enumerate(levels):
        want = loop_probs((1 - eps) * lvl + eps, block, lam)
        for i in range(block):
            assert z_ok(counts[k * block + i], n, want[i]), (k, i, counts[k * block + i] / n, want[i])


def test_position_masking_frequencies_drawn_levels():
    """Drawn t: the frequency at in-block position i is E_u[p_i((1 - eps) u + eps)], u ~ U(0, 1)."""
    n, block, eps, lam = 20000, 8, 1e-3, 0.1
    ids = torch.zeros(n, 2 * block, dtype=torch.long)
    resp = torch.ones_like(ids, dtype=torch.bool)
    noisy, _ = position_dependent_masking(ids, resp, block, MASK, torch.Generator().manual_seed(8), half_life=lam)
    freq = (noisy == MASK).double().view(n, 2, block).mean(0)
    grid = 400
    expect = [0.0] * block
    for g in range(grid):
        p = loop_probs((1 - eps) * (g + 0.5) / grid + eps, block, lam)
        expect = [e + x / grid for e, x in zip(expect, p)]
    for half in range(2):
        for i in range(block):
            assert abs(freq[half, i] - expect[i]) < 5 * math.sqrt(0.25 / n) + 2e-3, (half, i, freq[half, i], expect[i])
    assert expect[0] < expect[-1] / 3


def test_position_masking_respects_prompt():
    ids, resp = batch(t=16, prompts=(5, 0, 12))
    noisy, labels = position_dependent_masking(ids, resp, 8, MASK, torch.Generator().manual_seed(9), t=0.9)
    for r in range(3):
        for j in range(16):
            masked = noisy[r, j] == MASK
            if not resp[r, j]:
                assert not masked
            assert labels[r, j] == (ids[r, j] if masked else IGNORE_INDEX)
            if not masked:
                assert noisy[r, j] == ids[r, j]
    assert (noisy == MASK).any()
    uniform, _ = position_dependent_masking(ids, resp, 8, MASK, t=1.0, schedule="uniform")
    assert torch.equal(uniform == MASK, resp)


# ---------------------------------------------------------------------------------------------- inputs and loss

def test_bd3_inputs_positions():
    ids, resp = batch(t=8)
    noisy, _ = complementary_masking(ids, resp, 4, MASK)
    clean = ids.repeat(2, 1)
    inp, pos = bd3_inputs(noisy, clean)
    n, t = noisy.shape
    assert inp.shape == pos.shape == (n, 2 * t)
    for r in range(n):
        for j in range(2 * t):
            assert inp[r, j] == (noisy[r, j] if j < t else clean[r, j - t])
            assert pos[r, j] == j % t


def loop_loss(logits, labels, token_shift):
    total, count = 0.0, 0
    n, t, _ = logits.shape
    for r in range(n):
        for i in range(t):
            src = i - 1 if token_shift else i
            if labels[r, i] == IGNORE_INDEX or src < 0:
                continue
            row = logits[r, src].double()
            total += float(row.logsumexp(0) - row[labels[r, i]])
            count += 1
    return total / count


@pytest.mark.parametrize("token_shift", [True, False])
def test_loss_equals_loop(token_shift):
    ids, resp = batch(t=12, prompts=(0, 4, 7))
    noisy, labels = complementary_masking(ids, resp, 4, MASK, torch.Generator().manual_seed(10))
    logits = torch.randn(*labels.shape, 60, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    loss = diffusion_loss(logits, labels, token_shift)
    assert loss.dtype == torch.float32
    assert abs(float(loss) - loop_loss(logits, labels, token_shift)) < 1e-5
    shifted = shift_labels(labels, token_shift)
    for r in range(labels.shape[0]):
        for i in range(labels.shape[1]):
            want = (labels[r, i + 1] if i + 1 < labels.shape[1] else IGNORE_INDEX) if token_shift else labels[r, i]
            assert shifted[r, i] == want


def test_loss_token_shift_matches_transformers():
    from transformers.loss.loss_utils import ForCausalLMLoss
    ids, resp = batch(t=8)
    _, labels = complementary_masking(ids, resp, 4, MASK, torch.Generator().manual_seed(12))
    logits = torch.randn(*labels.shape, 60, generator=torch.Generator().manual_seed(13))
    want = ForCausalLMLoss(logits, labels, vocab_size=60)
    assert torch.allclose(diffusion_loss(logits, labels, token_shift=True), want, atol=1e-6)


def test_loss_uses_the_right_row_and_backprops():
    labels = torch.full((1, 4), IGNORE_INDEX)
    labels[0, 2] = 5
    logits = torch.zeros(1, 4, 8, requires_grad=True)
    with torch.no_grad():
        logits[0, 1, 5] = 20.0  # row 1 predicts token 5: right under the shift, wrong without
    assert diffusion_loss(logits, labels, True) < 1e-6
    assert diffusion_loss(logits, labels, False) > 1.0
    diffusion_loss(logits, labels, True).backward()
    assert logits.grad[0, 1].abs().sum() > 0 and logits.grad[0, [0, 2, 3]].abs().sum() == 0
    empty = torch.zeros(1, 4, 8, requires_grad=True)
    zero = diffusion_loss(empty, torch.full((1, 4), IGNORE_INDEX), False)
    assert float(zero.detach()) == 0.0
    zero.backward()
    assert empty.grad is not None


# --------------------------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise():
    ids, resp = batch(t=8)
    with pytest.raises(ValueError, match="multiple of block"):
        complementary_masking(ids[:, :7], resp[:, :7], 4, MASK)
    with pytest.raises(ValueError, match="response_mask"):
        complementary_masking(ids, resp.long(), 4, MASK)
    with pytest.raises(ValueError, match="response_mask"):
        position_dependent_masking(ids, resp[:, :4], 4, MASK)
    with pytest.raises(ValueError, match="input_ids"):
        complementary_masking(ids.float(), resp, 4, MASK)
    with pytest.raises(ValueError, match="block"):
        complementary_masking(ids, resp, 0, MASK)
    with pytest.raises(ValueError, match="mask_id"):
        position_dependent_masking(ids, resp, 4, 3.0)
    with pytest.raises(ValueError, match="eps"):
        complementary_masking(ids, resp, 4, MASK, eps=1.5)
    with pytest.raises(ValueError, match="t must lie"):
        complementary_masking(ids, resp, 4, MASK, t=1.2)
    with pytest.raises(ValueError, match="broadcast"):
        position_dependent_masking(ids, resp, 4, MASK, t=torch.full((3, 3), 0.5))
    with pytest.raises(ValueError, match="schedule"):
        position_dependent_masking(ids, resp, 4, MASK, schedule="cosine")
    with pytest.raises(ValueError, match="half_life"):
        position_dependent_mask_probs(0.5, 4, half_life=0.0)
    with pytest.raises(ValueError, match="t must lie"):
        position_dependent_mask_probs(torch.tensor([-0.1]), 4)
    with pytest.raises(ValueError, match="block"):
        position_dependent_mask_probs(0.5, 2.0)
    with pytest.raises(ValueError, match="pad_id"):
        pad_to_block(ids, resp, 3, pad_id=None)
    with pytest.raises(ValueError, match="response_mask"):
        pad_to_block(ids, resp[:1], 3, pad_id=0)
    with pytest.raises(ValueError, match="clean"):
        bd3_inputs(ids, ids[:2])
    with pytest.raises(ValueError, match="noisy"):
        bd3_inputs(ids[0], ids[0])
    with pytest.raises(ValueError, match="labels"):
        shift_labels(ids.float(), True)
    with pytest.raises(ValueError, match="token_shift"):
        shift_labels(ids, 1)
    with pytest.raises(ValueError, match="logits"):
        diffusion_loss(torch.zeros(3, 16, 5), ids, False)  # the full [x_t ; x_0] logits, not the noisy half
    with pytest.raises(ValueError, match="logits"):
        diffusion_loss(torch.zeros(3, 8, 5, dtype=torch.long), ids, False)
