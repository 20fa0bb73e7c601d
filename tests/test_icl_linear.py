"""In-context linear regression experiment (vzoo.experiments.icl_linear): data, model, metrics, baselines,
a short training run and the output files, each against hand computations written here."""

import json
import math

import pytest
import torch

from vzoo.experiments.icl_linear import (
    ICLAttention, ICLConfig, active_heads, evaluate, fit_gd_step, kq_diag_ratio, kq_homogeneity,
    one_step_gd_predict, ov_last_entry_ratio, ridge_predict, run_icl_linear, sample_tasks, train_icl,
    zero_sum_ratio,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("anisotropic", [False, True])
def test_sample_tasks_statistics(anisotropic):
    cfg = ICLConfig(d=3, noise=0.2, anisotropic=anisotropic, rho=0.6)
    b = sample_tasks(cfg, 20000, 4, _gen(), dtype=torch.float64)
    assert b.context.shape == (20000, 4, 4) and b.query.shape == (20000, 4) and b.target.shape == (20000,)
    assert b.beta.shape == (20000, 3) and b.context.dtype == torch.float64
    assert torch.all(b.query[:, -1] == 0)
    x = torch.cat([b.context[..., :3].reshape(-1, 3), b.query[:, :3]])
    want = torch.tensor([[0.6 ** abs(i - j) if anisotropic else float(i == j) for j in range(3)] for i in range(3)],
                        dtype=torch.float64)
    assert torch.allclose(x.mean(0), torch.zeros(3, dtype=torch.float64), atol=0.02)
    assert torch.allclose(x.T @ x / len(x), want, atol=0.03)
    assert torch.allclose(b.beta.T @ b.beta / len(b.beta), torch.eye(3, dtype=torch.float64) / 3, atol=0.01)
    resid = b.context[..., 3] - (b.context[..., :3] * b.beta[:, None]).sum(-1)
    assert abs(float(resid.std()) - 0.2) < 0.005 and abs(float(resid.mean())) < 0.005
    resid_q = b.target - (b.query[:, :3] * b.beta).sum(-1)
    assert abs(float(resid_q.std()) - 0.2) < 0.005
    again = sample_tasks(cfg, 20000, 4, _gen(), dtype=torch.float64)
    assert torch.equal(again.context, b.context) and torch.equal(again.target, b.target)


def _loop_model(model, context, query):
    """The model written out as loops: y_hat = sum_h OV_h[y, :] . sum_l a_hl z_l."""
    kq, ov = model.kq.detach().tolist(), model.ov.detach().tolist()
    n_b, n_l, w = context.shape
    out = []
    for b in range(n_b):
        z, q = context[b].tolist(), query[b].tolist()
        total = 0.0
        for h in range(model.heads):
            s = [sum(z[l][i] * kq[h][i][j] * q[j] for i in range(w) for j in range(w)) for l in range(n_l)]
            if model.softmax:
                m = max(s)
                e = [math.exp(v - m) for v in s]
                a = [v / sum(e) for v in e]
            else:
                a = [v / n_l for v in s]
            pooled = [sum(a[l] * z[l][i] for l in range(n_l)) for i in range(w)]
            total += sum(ov[h][w - 1][i] * pooled[i] for i in range(w))
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("softmax", [True, False])
def test_model_matches_loops(softmax):
    model = ICLAttention(2, 3, init=0.7, softmax=softmax, generator=_gen(1)).double()
    b = sample_tasks(ICLConfig(d=2), 3, 5, _gen(2), dtype=torch.float64)
    context, query = b.context, b.query + torch.tensor([0.0, 0.0, 0.3], dtype=torch.float64)  # a nonzero y slot too
    got = model(context, query)
    assert got.shape == (3,)
    torch.testing.assert_close(got, _loop_model(model, context, query), rtol=1e-10, atol=1e-12)
    if softmax:
        a = model.attention(context, query)
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 3, dtype=torch.float64))


def test_metrics_on_hand_built_matrices():
    kq = torch.zeros(3, 4, 4)
    kq[0, :3, :3] = 2 * torch.eye(3)
    kq[0, 3, :] = 5.0  # the y row and column are outside the x-x block the ratio looks at
    kq[0, :, 3] = -5.0
    kq[1, :3, :3] = torch.ones(3, 3) - torch.eye(3)  # off-diagonal only
    kq[2, :3, :3] = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(kq_diag_ratio(kq), torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(kq_homogeneity(kq)[[0, 2]], torch.tensor([0.0, math.sqrt(2 / 3) / 2]))

    ov = torch.randn(3, 4, 4, generator=_gen())  # rows other than the last are never read
    ov[0, 3] = torch.tensor([0.0, 0.0, 0.0, 1.5])
    ov[1, 3] = torch.tensor([3.0, 0.0, 0.0, -4.0])
    ov[2, 3] = torch.tensor([0.0, 0.0, 0.0, 0.1])
    torch.testing.assert_close(ov_last_entry_ratio(ov), torch.tensor([1.0, 0.8, 1.0]))
    assert abs(zero_sum_ratio(ov) - (4.0 - 1.6) / 5.6) < 1e-6
    assert active_heads(ov).tolist() == [True, True, False]
    opposite = torch.zeros(2, 3, 3)
    opposite[0, 2, 2], opposite[1, 2, 2] = 1.2, -1.2
    assert zero_sum_ratio(opposite) == 0.0
    opposite[1, 2, 2] = 0.7
    assert zero_sum_ratio(opposite) == 1.0


def test_ridge():
    clean = sample_tasks(ICLConfig(d=4, noise=0.0), 16, 10, _gen(), dtype=torch.float64)
    exact = (clean.beta * clean.query[:, :4]).sum(-1)
    torch.testing.assert_close(ridge_predict(clean.context, clean.query, 1e-10), exact, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(clean.target, exact)
    noisy = sample_tasks(ICLConfig(d=3), 4, 6, _gen(1), dtype=torch.float64)
    lam, got = 0.5, ridge_predict(noisy.context, noisy.query, 0.5)
    for b in range(4):  # ridge as least squares on the data stacked over sqrt(lam) I
        x = torch.cat([noisy.context[b, :, :3], math.sqrt(lam) * torch.eye(3, dtype=torch.float64)])
        y = torch.cat([noisy.context[b, :, 3], torch.zeros(3, dtype=torch.float64)])
        beta = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
        assert abs(float(beta @ noisy.query[b, :3]) - float(got[b])) < 1e-10


def test_one_step_gd():
    b = sample_tasks(ICLConfig(d=3), 5, 7, _gen(3), dtype=torch.float64)
    for debiased in (False, True):
        got = one_step_gd_predict(b.context, b.query, 0.8, debiased=debiased)
        for i in range(5):
            ys = b.context[i, :, 3].tolist()
            ybar = sum(ys) / 7 if debiased else 0.0
            want = 0.8 / 7 * sum((ys[l] - ybar) * sum(float(b.context[i, l, k] * b.query[i, k]) for k in range(3))
                                 for l in range(7))
            assert abs(float(got[i]) - want) < 1e-12
    cfg = ICLConfig(d=4, noise=0.1)
    fit = sample_tasks(cfg, 40000, 32, _gen(4), dtype=torch.float64)
    eta = fit_gd_step(fit)
    err = [float((one_step_gd_predict(fit.context, fit.query, e) - fit.target).square().mean())
           for e in (eta - 0.05, eta, eta + 0.05)]
    assert err[1] < err[0] and err[1] < err[2]
    # population-optimal step for isotropic x, beta ~ N(0, I/d): 1 / (1 + (d + 1 + d sigma^2) / L)
    assert abs(eta - 1 / (1 + (4 + 1 + 4 * 0.01) / 32)) < 0.03


def test_short_training_shows_the_patterns():
    cfg = ICLConfig(heads=4, steps=1000, batch=64, seed=0)
    model, hist = train_icl(cfg, progress=False)
    assert len(hist["step"]) == len(hist["loss"]) == len(hist["mu"]) > 100 and hist["step"][-1] == cfg.steps
    ev = evaluate(model, cfg, contexts=(32,), tasks=2048)
    assert ev["mse"]["softmax attention"][0] < 0.5 * ev["var_y"][0]
    assert ev["mse"]["ridge"][0] < ev["mse"]["softmax attention"][0]
    act = active_heads(model.ov)
    assert act.any() and bool((kq_diag_ratio(model.kq)[act] > 0.9).all())
    assert hist["loss"][-1] < 0.6 * hist["loss"][0]


def test_run_writes_outputs(tmp_path):
    m = run_icl_linear(tmp_path / "out", ICLConfig(steps=20, batch=16, context=8), progress=False)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["heads.png", "lengths.png", "metrics.json", "training.png"]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["bar"] == m["bar"] and len(m["bar"]) == 4
    assert all(line.split()[0] in ("PASS", "FAIL") for line in m["bar"])
    assert saved["evaluation"]["contexts"] == [4, 8, 16, 32]
    assert set(saved["evaluation"]["mse"]) == {"softmax attention", "linear attention", "ridge", "one-step GD",
                                              "debiased one-step GD"}


def test_bad_input_raises():
    for kw in ({"heads": 0}, {"d": 2.0}, {"lr": -1e-3}, {"noise": float("nan")}, {"rho": 1.0}, {"seed": -1},
               {"anisotropic": 1}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            ICLConfig(**kw)
    cfg = ICLConfig(d=2)
    with pytest.raises(ValueError, match="context"):
        sample_tasks(cfg, 4, 0, _gen())
    with pytest.raises(ValueError, match="generator"):
        sample_tasks(cfg, 4, 3, None)
    model = ICLAttention(2, 2)
    b = sample_tasks(cfg, 4, 3, _gen())
    with pytest.raises(ValueError, match="context.shape"):
        model(b.context[..., :2], b.query[:, :2])
    with pytest.raises(ValueError, match="query.shape"):
        model(b.context, b.query[:3])
    with pytest.raises(ValueError, match="dtype"):
        model(b.context.double(), b.query.double())
    with pytest.raises(ValueError, match="lam"):
        ridge_predict(b.context, b.query, -1.0)
    with pytest.raises(ValueError, match="kq.shape"):
        kq_diag_ratio(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="ov.shape"):
        zero_sum_ratio(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="contexts"):
        evaluate(model, cfg, contexts=())
