"""In-context linear regression with one-layer multi-head softmax attention, after He, Pan, Chen, Yang,
"In-Context Linear Regression Demystified: Training Dynamics and Mechanistic Interpretability of Multi-Head
Softmax Attention" (ICML 2025, arXiv 2503.12734; code XintianPan/ICL_linear, blog y-agent.github.io).

Data (as ``utils/data_utils.py::LinearReg`` of the official code): a task is ``beta ~ N(0, I_d / d)``; covariates
``x_l ~ N(0, I_d)`` (or ``N(0, Sigma)``, ``Sigma_ij = rho^|i-j|``, with ``anisotropic=True``, the covariance of the
official ``generate_covariance_matrix``); responses ``y_l = beta^T x_l + eps``, ``eps ~ N(0, noise^2)``, for the L
context tokens ``z_l = (x_l, y_l)`` and for the query, whose token is ``z_q = (x_q, 0)`` and whose noisy ``y_q`` is the
target.

Model: ``ICLAttention`` holds per head an explicit key-query matrix ``KQ_h`` and output-value matrix ``OV_h``, both
``[d+1, d+1]``; the query output is ``sum_h OV_h sum_l a_hl z_l`` with ``a_h = softmax_l(z_l^T KQ_h z_q)`` and the
prediction is its last coordinate. The official model factors the same bilinear forms as separate ``W_Q, W_K`` (with a
``1/sqrt(d+1)`` scale, absorbed here into ``KQ``) and ``W_V, W_O`` with a 1-dimensional output, so only the last row
of ``OV_h`` is used: the other rows of ``OV_h`` and the last column of ``KQ_h`` (the query's zero y entry) get no
gradient and stay at their initial values. ``softmax=False`` gives the linear-attention baseline,
``a_hl = z_l^T KQ_h z_q / L`` (normalised by the context length it is run at; the normalisation is our choice).

Patterns the paper reports and the metrics measuring them (per head, on the final weights):
- ``kq_diag_ratio``: ||diag(KQ_xx)|| / ||KQ_xx||_F of the x-x block; 1 for a diagonal block.
- ``kq_homogeneity``: std / |mean| of that diagonal; 0 for ``omega * I``.
- ``ov_last_entry_ratio``: |OV[y, y]| / ||OV[y, :]|| of the output row that is read; 1 for last-entry-only.
- ``zero_sum_ratio``: |sum_h mu_h| / sum_h |mu_h| with ``mu_h = OV_h[y, y]``; 0 for heads that cancel.
With ``KQ_h ~ omega_h I`` and ``OV_h[y, :] ~ mu_h e_y`` and small omega, the prediction is
``ybar sum_h mu_h + (sum_h mu_h omega_h / L) sum_l (y_l - ybar) x_l^T x_q``: zero-sum heads remove the mean term and
leave the debiased one-step GD predictor with step ``sum_h mu_h omega_h`` (reported as ``implied_gd_step``).

Baselines: ridge with ``lam = d * noise^2``, the posterior mean of beta under the data's prior (the Bayes-optimal
predictor for isotropic and anisotropic x alike; the official ``RidgeEst`` uses the same lambda); one-step GD from
``beta = 0``, ``(eta / L) sum_l y_l x_l^T x_q``, and its debiased form (the official ``GDEst`` / ``DGDEst``), with
the step ``eta`` fitted by least squares on a separate sample of tasks at each context length (the best step for
that length; how the paper tunes its GD baseline is unverified; for isotropic x the fitted step approaches
``1 / (1 + (d + 1 + d noise^2) / L)``); and the linear-attention model above, trained like the softmax one.

Settings. The official notebook (``icl_linear.ipynb``) trains d=5, L=8d=40, noise variance 0.1, 4 heads, batch 256,
Adam 1e-3 without weight decay for 500k steps from PyTorch's default ``nn.Linear`` init. The defaults here are a
CPU-sized calibration (repo spec, not the paper): d=4, L=32, noise std 0.1, 4 heads, batch 256, Adam 1e-3 for 10k
steps, init ``0.01 * N(0, 1)``. With 2 heads the zero-sum pair does not always form (seed 0 gives both heads one
sign), so the checks use 4 heads. Findings at the defaults (seed 0): KQ becomes diagonal and zero-sum heads form, but
the x entries of the read OV rows do not decay to 0 (Adam leaves directions the loss does not see, such as
x-weights that cancel across heads, where they drift), so ``ov_last_entry_ratio`` stays well below 1; and linear
attention normalised by the run-time L generalises to longer contexts as well as softmax attention does (the paper's
linear-transformer baseline is not in the official code; its normalisation is unverified).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "ICLAttention", "ICLBatch", "ICLConfig", "active_heads", "evaluate", "fit_gd_step", "kq_diag_ratio",
    "kq_homogeneity", "linear_attention", "one_step_gd_predict", "ov_last_entry_ratio", "ridge_predict",
    "run_icl_linear", "sample_tasks", "train_icl", "zero_sum_ratio",
]

SOFTMAX, LINEAR, RIDGE, GD, DEBIASED_GD = (
    "softmax attention", "linear attention", "ridge", "one-step GD", "debiased one-step GD")


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class ICLConfig:
    """One in-context linear regression run: data, model and training settings."""

    d: int = 4  # covariate dimension; tokens have d + 1 entries
    context: int = 32  # L, context tokens per task during training
    heads: int = 4
    noise: float = 0.1  # standard deviation of the response noise
    batch: int = 256  # tasks per training step (fresh tasks every step)
    steps: int = 10000
    lr: float = 1e-3  # Adam, constant
    init: float = 0.01  # KQ and OV start as init * N(0, 1)
    seed: int = 0
    anisotropic: bool = False  # x ~ N(0, Sigma) with Sigma_ij = rho^|i-j| instead of N(0, I)
    rho: float = 0.5

    def __post_init__(self) -> None:
        for name in ("d", "context", "heads", "batch", "steps"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, name, v, "an integer >= 1")
        _check(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _check(_is_real(self.noise) and self.noise >= 0, "noise", self.noise, "a finite number >= 0")
        for name in ("lr", "init"):
            v = getattr(self, name)
            _check(_is_real(v) and v > 0, name, v, "a finite number > 0")
        _check(isinstance(self.anisotropic, bool), "anisotropic", self.anisotropic, "True or False")
        _check(_is_real(self.rho) and -1 < self.rho < 1, "rho", self.rho, "-1 < rho < 1")

    def covariance(self) -> torch.Tensor:
        """Covariance of x, float64 ``[d, d]``: the identity, or ``rho^|i-j|`` when anisotropic."""
        if not self.anisotropic:
            return torch.eye(self.d, dtype=torch.float64)
        idx = torch.arange(self.d, dtype=torch.float64)
        return float(self.rho) ** (idx[:, None] - idx[None, :]).abs()


class ICLBatch(NamedTuple):
    """A batch of B regression tasks with L context examples each."""

    context: torch.Tensor  # [B, L, d+1] tokens (x_l, y_l)
    query: torch.Tensor  # [B, d+1] token (x_q, 0)
    target: torch.Tensor  # [B] y_q = beta^T x_q + noise
    beta: torch.Tensor  # [B, d]


def sample_tasks(config: ICLConfig, batch: int, context: int, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32) -> ICLBatch:
    """``batch`` fresh tasks with ``context`` examples each, drawn from ``generator`` (a CPU ``torch.Generator``)."""
    _check(_is_int(batch) and batch >= 1, "batch", batch, "an integer >= 1")
    _check(_is_int(context) and context >= 1, "context", context, "an integer >= 1")
    _check(isinstance(generator, torch.Generator), "generator", type(generator).__name__, "a torch.Generator")
    _check(dtype in (torch.float32, torch.float64), "dtype", dtype, "torch.float32 or torch.float64")
    d, f64 = config.d, torch.float64
    x = torch.randn(batch, context + 1, d, generator=generator, dtype=f64)
    if config.anisotropic:
        x = x @ torch.linalg.cholesky(config.covariance()).T
    beta = torch.randn(batch, d, generator=generator, dtype=f64) / math.sqrt(d)
    y = torch.einsum("bld,bd->bl", x, beta) + config.noise * torch.randn(batch, context + 1, generator=generator,
                                                                          dtype=f64)
    tokens = torch.cat([x[:, :context], y[:, :context, None]], dim=-1)
    query = torch.cat([x[:, context], torch.zeros(batch, 1, dtype=f64)], dim=-1)
    return ICLBatch(tokens.to(dtype), query.to(dtype), y[:, context].to(dtype), beta.to(dtype))


def _check_tokens(context: torch.Tensor, query: torch.Tensor, width: int | None = None) -> None:
    _check(isinstance(context, torch.Tensor) and context.dim() == 3 and context.shape[1] >= 1
           and context.shape[2] >= 2, "context.shape", getattr(context, "shape", context),
           "a tensor [B, L, d+1] with L >= 1 and d >= 1")
    if width is not None:
        _check(context.shape[2] == width, "context.shape", tuple(context.shape), f"last size d+1 = {width}")
    _check(isinstance(query, torch.Tensor) and tuple(query.shape) == (context.shape[0], context.shape[2]),
           "query.shape", getattr(query, "shape", query), f"[B, d+1] = {(context.shape[0], context.shape[2])}")
    _check(context.is_floating_point() and query.dtype == context.dtype, "dtype", (context.dtype, query.dtype),
           "one floating-point dtype for context and query")


class ICLAttention(nn.Module):
    """One attention layer read at the query token, with explicit per-head ``kq`` and ``ov`` ``[H, d+1, d+1]``.

    ``forward(context [B, L, d+1], query [B, d+1]) -> [B]``: the last coordinate of
    ``sum_h OV_h sum_l a_hl z_l``, ``a_h = softmax_l(z_l^T KQ_h z_q)`` (or ``z_l^T KQ_h z_q / L`` if not softmax).
    """

    def __init__(self, d: int, heads: int, init: float = 0.01, softmax: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check(_is_int(d) and d >= 1, "d", d, "an integer >= 1")
        _check(_is_int(heads) and heads >= 1, "heads", heads, "an integer >= 1")
        _check(_is_real(init) and init >= 0, "init", init, "a finite number >= 0")
        self.d, self.heads, self.softmax = d, heads, bool(softmax)
        shape = (heads, d + 1, d + 1)
        self.kq = nn.Parameter(init * torch.randn(shape, generator=generator))
        self.ov = nn.Parameter(init * torch.randn(shape, generator=generator))

    def extra_repr(self) -> str:
        return f"d={self.d}, heads={self.heads}, softmax={self.softmax}"

    def attention(self, context: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Weights of the query over the context, ``[B, H, L]``."""
        _check_tokens(context, query, self.d + 1)
        _check(context.dtype == self.kq.dtype, "context.dtype", context.dtype, f"the parameters' {self.kq.dtype}")
        scores = torch.einsum("bli,hij,bj->bhl", context, self.kq, query)
        return scores.softmax(dim=-1) if self.softmax else scores / context.shape[1]

    def forward(self, context: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        pooled = torch.einsum("bhl,bli->bhi", self.attention(context, query), context)  # [B, H, d+1]
        return torch.einsum("hi,bhi->b", self.ov[:, -1, :], pooled)


def _mu_omega(model: ICLAttention) -> tuple[list[float], list[float]]:
    """Per head: ``mu_h = OV_h[y, y]`` and ``omega_h`` = mean of the diagonal of the x-x block of ``KQ_h``."""
    kq, ov = model.kq.detach(), model.ov.detach()
    return ov[:, -1, -1].tolist(), kq[:, :-1, :-1].diagonal(dim1=-2, dim2=-1).mean(-1).tolist()


def train_icl(config: ICLConfig, progress: bool = True, softmax: bool = True) -> tuple[ICLAttention, dict]:
    """Train ``ICLAttention`` on fresh tasks every step (Adam, MSE on the query). ``history``: ``step``, ``loss``
    (mean over each logging interval), per-head ``mu`` and ``omega`` at each logged step, and ``seconds``."""
    _check(isinstance(config, ICLConfig), "config", type(config).__name__, "an ICLConfig")
    gen = torch.Generator().manual_seed(config.seed)
    model = ICLAttention(config.d, config.heads, config.init, softmax=softmax, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    log_every, print_every = max(1, config.steps // 200), max(1, config.steps // 10)
    history: dict[str, list] = {"step": [], "loss": [], "mu": [], "omega": []}
    label = SOFTMAX if softmax else LINEAR
    start, running = time.perf_counter(), 0.0
    for step in range(1, config.steps + 1):
        batch = sample_tasks(config, config.batch, config.context, gen)
        loss = (model(batch.context, batch.query) - batch.target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        if step % log_every == 0 or step == config.steps:
            mu, omega = _mu_omega(model)
            history["step"].append(step)
            history["loss"].append(running / (step - (history["step"][-2] if len(history["step"]) > 1 else 0)))
            history["mu"].append(mu)
            history["omega"].append(omega)
            running = 0.0
        if progress and (step % print_every == 0 or step == config.steps):
            print(f"[icl-linear {label}] step {step}/{config.steps} loss {history['loss'][-1]:.4f} "
                  f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    history["seconds"] = time.perf_counter() - start
    return model, history


def linear_attention(config: ICLConfig, progress: bool = True) -> tuple[ICLAttention, dict]:
    """The linear-attention baseline (``ICLAttention(softmax=False)``), trained exactly like :func:`train_icl`."""
    return train_icl(config, progress=progress, softmax=False)


def _check_heads(m: torch.Tensor, name: str) -> torch.Tensor:
    _check(isinstance(m, torch.Tensor) and m.dim() == 3 and m.shape[1] == m.shape[2] >= 2 and m.shape[0] >= 1
           and m.is_floating_point(), f"{name}.shape", getattr(m, "shape", m),
           "a floating-point tensor [H, d+1, d+1] with H >= 1, d >= 1")
    return m.detach()


def kq_diag_ratio(kq: torch.Tensor) -> torch.Tensor:
    """``||diag(KQ_xx)|| / ||KQ_xx||_F`` per head (``KQ_xx`` the leading ``[d, d]`` block), ``[H]``; 1 = diagonal."""
    block = _check_heads(kq, "kq")[:, :-1, :-1]
    return block.diagonal(dim1=-2, dim2=-1).norm(dim=-1) / block.flatten(1).norm(dim=-1).clamp_min(1e-30)


def kq_homogeneity(kq: torch.Tensor) -> torch.Tensor:
    """``std / |mean|`` of the diagonal of ``KQ_xx`` per head, ``[H]``; 0 = a multiple of the identity."""
    diag = _check_heads(kq, "kq")[:, :-1, :-1].diagonal(dim1=-2, dim2=-1)
    return diag.std(dim=-1, unbiased=False) / diag.mean(dim=-1).abs().clamp_min(1e-30)


def ov_last_entry_ratio(ov: torch.Tensor) -> torch.Tensor:
    """``|OV[y, y]| / ||OV[y, :]||`` per head on the output row that is read, ``[H]``; 1 = last-entry-only."""
    row = _check_heads(ov, "ov")[:, -1, :]
    return row[:, -1].abs() / row.norm(dim=-1).clamp_min(1e-30)


def zero_sum_ratio(ov: torch.Tensor) -> float:
    """``|sum_h mu_h| / sum_h |mu_h|`` with ``mu_h = OV_h[y, y]``; 0 = heads that cancel, 1 = all of one sign."""
    mu = _check_heads(ov, "ov")[:, -1, -1]
    return float(mu.sum().abs() / mu.abs().sum().clamp_min(1e-30))


def active_heads(ov: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Heads whose ``|mu_h|`` exceeds ``threshold * max_h |mu_h|``, bool ``[H]``."""
    mu = _check_heads(ov, "ov")[:, -1, -1].abs()
    return mu > threshold * mu.max()


def ridge_predict(context: torch.Tensor, query: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge prediction ``x_q^T (X^T X + lam I)^-1 X^T y`` per task, ``[B]`` (context ``[B, L, d+1]``, query
    ``[B, d+1]``). ``lam = d * noise^2`` is the Bayes posterior mean for ``beta ~ N(0, I/d)``."""
    _check_tokens(context, query)
    _check(_is_real(lam) and lam >= 0, "lam", lam, "a finite number >= 0")
    x, y = context[..., :-1], context[..., -1]
    gram = x.transpose(1, 2) @ x + lam * torch.eye(x.shape[-1], dtype=x.dtype)
    beta = torch.linalg.solve(gram, (x.transpose(1, 2) @ y[..., None]))[..., 0]
    return (beta * query[:, :-1]).sum(-1)


def one_step_gd_predict(context: torch.Tensor, query: torch.Tensor, step: float,
                        debiased: bool = False) -> torch.Tensor:
    """One GD step of size ``step`` from ``beta = 0`` on ``(1/2L) sum_l (y_l - beta^T x_l)^2``, evaluated at the
    query: ``(step / L) sum_l y_l x_l^T x_q``, ``[B]``; ``debiased`` uses ``y_l - mean(y)`` in place of ``y_l``."""
    _check_tokens(context, query)
    _check(_is_real(step), "step", step, "a finite number")
    x, y = context[..., :-1], context[..., -1]
    if debiased:
        y = y - y.mean(dim=1, keepdim=True)
    return step / x.shape[1] * torch.einsum("bl,bld,bd->b", y, x, query[:, :-1])


def fit_gd_step(batch: ICLBatch, debiased: bool = False) -> float:
    """The step minimising the squared error of :func:`one_step_gd_predict` on ``batch`` (least squares)."""
    unit = one_step_gd_predict(batch.context, batch.query, 1.0, debiased).double()
    return float((unit * batch.target.double()).sum() / (unit * unit).sum().clamp_min(1e-30))


@torch.no_grad()
def evaluate(model: ICLAttention, config: ICLConfig, contexts: tuple[int, ...] = (16, 32, 64, 128),
             linear: ICLAttention | None = None, tasks: int = 8192) -> dict:
    """Test MSE of ``model`` (and the trained ``linear`` model, if given) and of the baselines at each context
    length, on ``tasks`` fresh tasks per length (the GD steps fitted on another ``tasks``). Returns ``contexts``,
    ``var_y`` (empirical variance of the test targets), ``mse`` (``{label: [per length]}``), ``gd_step`` and
    ``debiased_gd_step``."""
    _check(isinstance(model, ICLAttention), "model", type(model).__name__, "an ICLAttention")
    _check(len(contexts) >= 1 and all(_is_int(n) and n >= 1 for n in contexts), "contexts", contexts,
           "a non-empty sequence of integers >= 1")
    _check(_is_int(tasks) and tasks >= 2, "tasks", tasks, "an integer >= 2")
    dtype, label = model.kq.dtype, SOFTMAX if model.softmax else LINEAR
    _check(linear is None or label != LINEAR, "linear", "a second linear model", "None when model is linear")
    out: dict = {"contexts": list(contexts), "var_y": [], "gd_step": [], "debiased_gd_step": [], "mse": {label: []}}
    if linear is not None:
        out["mse"][LINEAR] = []
    out["mse"].update({RIDGE: [], GD: [], DEBIASED_GD: []})
    lam = config.d * config.noise ** 2
    for n in contexts:
        gen = torch.Generator().manual_seed(1_000_003 * (config.seed + 1) + n)
        test, fit = (sample_tasks(config, tasks, n, gen, dtype=dtype) for _ in range(2))
        eta, eta_db = fit_gd_step(fit), fit_gd_step(fit, debiased=True)
        preds = {label: model(test.context, test.query),
                 RIDGE: ridge_predict(test.context, test.query, lam),
                 GD: one_step_gd_predict(test.context, test.query, eta),
                 DEBIASED_GD: one_step_gd_predict(test.context, test.query, eta_db, debiased=True)}
        if linear is not None:
            preds[LINEAR] = linear(test.context, test.query)
        for name, pred in preds.items():
            out["mse"][name].append(float((pred - test.target).double().square().mean()))
        out["var_y"].append(float(test.target.double().var()))
        out["gd_step"].append(eta)
        out["debiased_gd_step"].append(eta_db)
    return out


def _plot_training(path: Path, hist: dict, lin_hist: dict, ridge_mse: float, var_y: float) -> None:
    import matplotlib.pyplot as plt

    from vzoo.atomic import save_figure

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    ax.plot(hist["step"], hist["loss"], label=SOFTMAX)
    ax.plot(lin_hist["step"], lin_hist["loss"], label=LINEAR)
    ax.axhline(var_y, color="grey", linestyle=":", label="Var(y)")
    ax.axhline(ridge_mse, color="black", linestyle="--", label="ridge, Bayes")
    ax.set(xlabel="step", ylabel="training MSE", yscale="log", title="training loss")
    ax.legend(fontsize=8)
    mu, omega = torch.tensor(hist["mu"]), torch.tensor(hist["omega"])
    for h in range(mu.shape[1]):
        line, = bx.plot(hist["step"], mu[:, h].tolist(), label=f"mu head {h}")
        bx.plot(hist["step"], omega[:, h].tolist(), color=line.get_color(), linestyle="--", label=f"omega head {h}")
    bx.axhline(0, color="grey", linewidth=0.5)
    bx.set(xlabel="step", title="mu = OV[y, y] (solid), omega = mean diag KQ_xx (dashed)")
    bx.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _plot_heads(path: Path, model: ICLAttention) -> None:
    import matplotlib.pyplot as plt

    from vzoo.atomic import save_figure

    kq, ov, h = model.kq.detach(), model.ov.detach(), model.heads
    names = [f"x{i + 1}" for i in range(model.d)] + ["y"]
    fig, axes = plt.subplots(2, h, figsize=(2.6 * h + 1, 5.2), squeeze=False)
    for row, (mats, label) in enumerate(((kq, "KQ"), (ov, "OV"))):
        lim = float(mats.abs().max())
        for j in range(h):
            im = axes[row, j].imshow(mats[j].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[row, j].set(title=f"{label} head {j}", xticks=range(model.d + 1), yticks=range(model.d + 1))
            axes[row, j].set_xticklabels(names, fontsize=7)
            axes[row, j].set_yticklabels(names, fontsize=7)
        fig.colorbar(im, ax=list(axes[row]), shrink=0.8)
    save_figure(fig, path, dpi=110)


def _plot_lengths(path: Path, ev: dict, train_context: int) -> None:
    import matplotlib.pyplot as plt

    from vzoo.atomic import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, mse in ev["mse"].items():
        ax.plot(ev["contexts"], mse, marker="o", label=label)
    ax.axvline(train_context, color="grey", linestyle=":", label="training length")
    ax.set(xscale="log", yscale="log", xlabel="context length L", ylabel="test MSE", title="MSE against context length")
    ax.minorticks_off()
    ax.set_xticks(ev["contexts"])
    ax.set_xticklabels([str(n) for n in ev["contexts"]])
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _bar(ev: dict, heads: dict, zero_sum: float, context: int) -> list[str]:
    """PASS/FAIL lines of the issue's bar (stated for 4 heads, seed 0)."""
    i, j = ev["contexts"].index(context), ev["contexts"].index(2 * context)
    mse = ev["mse"][SOFTMAX]
    rel = mse[i] / ev["var_y"][i]
    diag = min(r for r, a in zip(heads["kq_diag_ratio"], heads["active"]) if a)
    growth = mse[j] / mse[i]
    checks = [(rel < 0.3, f"test MSE / Var(y) at L={context}: {rel:.3f} < 0.3"),
              (zero_sum < 0.1, f"zero-sum ratio: {zero_sum:.4f} < 0.1"),
              (diag > 0.9, f"min diagonal KQ ratio over active heads: {diag:.3f} > 0.9"),
              (growth <= 1.2, f"MSE(L={2 * context}) / MSE(L={context}): {growth:.3f} <= 1.2")]
    return [("PASS " if ok else "FAIL ") + text for ok, text in checks]


def run_icl_linear(out_dir: str | Path, config: ICLConfig | None = None, progress: bool = True) -> dict:
    """Train the softmax model and the linear-attention baseline, evaluate at L/2, L, 2L, 4L, measure the head
    patterns, and write ``metrics.json``, ``training.png``, ``heads.png`` (KQ/OV heat maps) and ``lengths.png`` to
    ``out_dir`` (each atomically). Returns the metrics; ``bar`` holds the PASS/FAIL lines, ``passed`` their AND."""
    import matplotlib

    matplotlib.use("Agg")

    from vzoo.atomic import write_json_atomic

    config = ICLConfig() if config is None else config
    _check(isinstance(config, ICLConfig), "config", type(config).__name__, "an ICLConfig")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, hist = train_icl(config, progress=progress)
    lin, lin_hist = linear_attention(config, progress=progress)
    contexts = tuple(sorted({max(1, config.context // 2), config.context, 2 * config.context, 4 * config.context}))
    ev = evaluate(model, config, contexts, linear=lin)
    kq, ov = model.kq.detach(), model.ov.detach()
    mu, omega = _mu_omega(model)
    heads = {"mu": mu, "omega": omega, "active": active_heads(ov).tolist(), "kq_diag_ratio": kq_diag_ratio(kq).tolist(),
             "kq_homogeneity": kq_homogeneity(kq).tolist(), "ov_last_entry_ratio": ov_last_entry_ratio(ov).tolist()}
    zero_sum = zero_sum_ratio(ov)
    bar = _bar(ev, heads, zero_sum, config.context)
    metrics = {
        "config": asdict(config), "heads": heads, "zero_sum_ratio": zero_sum,
        "implied_gd_step": sum(m * w for m, w in zip(mu, omega)), "evaluation": ev,
        "train_seconds": {SOFTMAX: hist["seconds"], LINEAR: lin_hist["seconds"]},
        "final_train_loss": {SOFTMAX: hist["loss"][-1], LINEAR: lin_hist["loss"][-1]},
        "weights": {"kq": kq.tolist(), "ov": ov.tolist()}, "history": {SOFTMAX: hist, LINEAR: lin_hist},
        "bar": bar, "passed": all(b.startswith("PASS") for b in bar),
    }
    i = contexts.index(config.context)
    _plot_training(out / "training.png", hist, lin_hist, ev["mse"][RIDGE][i], ev["var_y"][i])
    _plot_heads(out / "heads.png", model)
    _plot_lengths(out / "lengths.png", ev, config.context)
    metrics["wall_seconds"] = time.perf_counter() - start
    write_json_atomic(metrics, out / "metrics.json")
    if progress:
        print("\n".join(bar), file=sys.stderr, flush=True)
    return metrics
