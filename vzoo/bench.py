"""Benchmarks of vzoo ops against what a user would pick instead, measured in one process.

Block-sparse attention is timed against dense ``scaled_dot_product_attention`` and compiled
FlexAttention driven by the same layout (compile time excluded, reported separately). Every figure
is a median over repeats; speed-ups are ratios of medians.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from vzoo.atomic import save_figure
from vzoo.kernels import BlockSparseLayout, block_sparse_attention

__all__ = [
    "Row", "median_ms", "mode_ms", "random_layout", "kernel_rows", "format_table", "check_bar", "save_plot",
    "ModelRow", "backbone_rows", "step_peak_mb", "peak_memory_mb", "format_models",
]


@dataclass
class Row:
    seq_len: int
    blocks: int  # selected key blocks per query block
    density: float
    mode: str  # "fwd" | "fwd+bwd"
    provider: str  # "sdpa" | "flex" | "vzoo"
    ms: float
    speedup: float  # sdpa time / this time, same mode
    tflops: float  # useful (selected-block) FLOPs per second
    max_abs_err: float | None = None  # vs the reference backend (only where affordable)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def mode_ms(run: Callable[[], torch.Tensor], mode: str, device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``run()`` under ``torch.no_grad()`` (``mode="fwd"``) or of
    ``run().sum().backward()`` (``"fwd+bwd"``)."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                run()
    else:
        def step():
            run().sum().backward()
    return median_ms(step, device, repeats)


def random_layout(
    batch: int, heads: int, seq_len: int, block: int, blocks: int, device: torch.device, seed: int = 0
) -> BlockSparseLayout:
    """``blocks`` key blocks chosen uniformly at random for every (batch, head, query block)."""
    nb = -(-seq_len // block)
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(batch, heads, nb, nb, generator=g).argsort(-1)[..., :blocks]
    return BlockSparseLayout.from_topk(idx.to(device), block, block, seq_len, seq_len)


def _flex_fn(layout: BlockSparseLayout) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    block_mask = layout.to_flex_block_mask()
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def kernel_rows(
    seq_lens: Sequence[int],
    blocks: Sequence[int],
    *,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    block: int = 128,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    backward: bool = True,
    flex: bool = True,
    repeats: int = 5,
    check_error: bool = True,
    progress: bool = True,
) -> list[Row]:
    """Time dense SDPA, compiled FlexAttention and vzoo's default backend on random layouts."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    rows: list[Row] = []
    cases = [(s, b) for s in seq_lens for b in blocks]
    for seq_len, nsel in tqdm(cases, desc="block-sparse attention", disable=not progress, file=sys.stderr):
        g = torch.Generator(device=device).manual_seed(seq_len)
        q, k, v = (torch.randn(batch, heads, seq_len, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3))
        layout = random_layout(batch, heads, seq_len, block, nsel, device)
        density = layout.density()
        useful = 4.0 * head_dim * float(layout.kv_num_blocks.sum()) * block * block  # the sum runs over batch and heads
        providers: dict[str, Callable] = {
            "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
            "vzoo": lambda q, k, v: block_sparse_attention(q, k, v, layout),
        }
        if flex:
            start = time.perf_counter()
            providers["flex"] = _flex_fn(layout)
            with torch.no_grad():
                providers["flex"](q, k, v)
            _sync(device)
            print(f"  flex compile S={seq_len}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        modes = ["fwd", "fwd+bwd"] if backward else ["fwd"]
        for mode in modes:
            times: dict[str, float] = {}
            for name, fn in providers.items():
                if mode == "fwd":
                    with torch.no_grad():
                        times[name] = median_ms(lambda: fn(q, k, v), device, repeats)
                elif name != "flex" or device.type == "cuda":  # FlexAttention has no CPU backward
                    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                    do = torch.randn_like(q)
                    times[name] = median_ms(lambda: fn(qg, kg, vg).backward(do), device, max(1, repeats // 2))
            flops = useful * (3.5 if mode == "fwd+bwd" else 1.0)
            for name, ms in times.items():
                rows.append(Row(seq_len, nsel, density, mode, name, ms, times["sdpa"] / ms, flops / ms / 1e9))
        if check_error and seq_len <= 8192:  # the dense reference needs O(S^2) memory
            with torch.no_grad():
                got = block_sparse_attention(q, k, v, layout).float()
                ref = block_sparse_attention(q, k, v, layout, backend="reference").float()
            err = float((got - ref).abs().max())
            for row in rows:
                if (row.seq_len, row.blocks, row.provider) == (seq_len, nsel, "vzoo"):
                    row.max_abs_err = err
    return rows


def format_table(rows: Sequence[Row]) -> str:
    head = f"{'S':>7} {'blocks':>6} {'density':>7} {'mode':>8} {'provider':>8} {'ms':>10} {'x sdpa':>7} {'TFLOP/s':>8} {'max err':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        err = f"{r.max_abs_err:9.1e}" if r.max_abs_err is not None else f"{'':>9}"
        lines.append(
            f"{r.seq_len:>7} {r.blocks:>6} {r.density:>7.3f} {r.mode:>8} {r.provider:>8} {r.ms:>10.2f} "
            f"{r.speedup:>7.2f} {r.tflops:>8.3f} {err}"
        )
    return "\n".join(lines)


# The kernel-layer bar (issue 2): B=1, H=4, D=64, block 128, 6 of 64 key blocks, fp32, CPU.
BAR_CASE = (8192, 6)
BAR = {"fwd vs sdpa": 6.0, "fwd vs compiled flex": 0.9, "fwd+bwd vs sdpa": 4.0}


def check_bar(rows: Sequence[Row]) -> list[str]:
    """The bar on its case ``BAR_CASE``, if measured: lines ``PASS|FAIL name: measured (bar)``."""
    get = {(r.mode, r.provider): r for r in rows if (r.seq_len, r.blocks) == BAR_CASE}
    measured = {}
    if ("fwd", "vzoo") in get:
        measured["fwd vs sdpa"] = get["fwd", "vzoo"].speedup
    if ("fwd", "flex") in get and ("fwd", "vzoo") in get:
        measured["fwd vs compiled flex"] = get["fwd", "flex"].ms / get["fwd", "vzoo"].ms
    if ("fwd+bwd", "vzoo") in get:
        measured["fwd+bwd vs sdpa"] = get["fwd+bwd", "vzoo"].speedup
    return [
        f"{'PASS' if got >= BAR[name] else 'FAIL'} S={BAR_CASE[0]} blocks={BAR_CASE[1]} {name}: {got:.2f}x (bar {BAR[name]}x)"
        for name, got in measured.items()
    ]


def save_plot(rows: Sequence[Row], path: str) -> None:
    """Latency against sequence length, one panel per mode, one line per provider and density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r.mode for r in rows}, key=len)
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for prov in ("sdpa", "flex", "vzoo"):
            for nsel in sorted({r.blocks for r in rows}):
                pts = sorted((r.seq_len, r.ms) for r in rows if (r.mode, r.provider, r.blocks) == (mode, prov, nsel))
                if not pts or (prov == "sdpa" and nsel != min(r.blocks for r in rows)):
                    continue  # dense attention does not depend on the layout: draw it once
                label = prov if prov == "sdpa" else f"{prov}, {nsel} key blocks per query block"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="ms (median)", title=mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def rows_as_dicts(rows: Sequence[Row | ModelRow]) -> list[dict]:
    return [asdict(r) for r in rows]


# -- neighborhood aggregation (ContMix) ----------------------------------------------------------
NEIGHBORHOOD_BAR_CASE = (2, 256, 50, 68, 13, 8)  # (B, channels, H, W, kernel, groups): a detection /16 map


@dataclass
class OpRow:
    name: str
    ms: float


def neighborhood_step(case: Sequence[int], backend: str, device: str | torch.device = "cpu") -> Callable[[], None]:
    """One forward+backward of ``neighborhood_aggregate`` on random softmaxed taps for ``case``."""
    from vzoo.kernels import neighborhood_aggregate

    b, ch, h, w, k, g = case
    gen = torch.Generator().manual_seed(0)
    attn = torch.randn(b, g, h, w, k * k, generator=gen).softmax(-1).to(device).requires_grad_()
    value = torch.randn(b, g, h, w, ch // g, generator=gen).to(device).requires_grad_()
    upstream = torch.randn(b, g, h, w, ch // g, generator=gen).to(device)
    return lambda: neighborhood_aggregate(attn, value, k, backend=backend).backward(upstream)


def neighborhood_rows(
    case: Sequence[int] = NEIGHBORHOOD_BAR_CASE, device: str | torch.device = "cpu", repeats: int = 5
) -> tuple[OpRow, OpRow]:
    """``(fast backend, reference)`` forward+backward medians: triton on CUDA, torch on CPU."""
    device = torch.device(device)
    fast = "triton" if device.type == "cuda" else "torch"
    return tuple(OpRow(name, median_ms(neighborhood_step(case, name, device), device, repeats)) for name in (fast, "reference"))


# -- backbones -----------------------------------------------------------------------------------
@dataclass
class ModelRow:
    name: str
    params_m: float
    train_ms: float  # forward + cross-entropy + backward, train mode
    eval_ms: float  # forward, eval mode, inference_mode
    train_mb: float | None = None  # peak extra resident memory of one training step
    eval_mb: float | None = None


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None = None) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        loss = F.cross_entropy(model(x), y)
    loss.backward()


def _eval_step(model: torch.nn.Module, x: torch.Tensor, amp: torch.dtype | None = None) -> None:
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        model(x)


def backbone_rows(
    models: dict[str, Callable[[], torch.nn.Module]],
    *,
    batch: int = 8,
    size: int = 224,
    repeats: int = 5,
    device: str | torch.device = "cpu",
    amp: torch.dtype | None = None,
    progress: bool = True,
) -> list[ModelRow]:
    """Median train-step and eval-forward times of each model: all training steps first, then all
    inference forwards, each phase in rounds that interleave the models (so a slow spell of a shared
    machine hits all of them alike). On CUDA the peak allocated memory of each step is recorded too."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    built = {name: make().to(device) for name, make in models.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in built}
    peaks: dict[str, list[float]] = {name: [0.0, 0.0] for name in built}
    # Training steps first, then inference: each phase as a user runs it, models interleaved per round.
    for i, mode in enumerate(("train", "eval")):
        for round_ in tqdm(range(repeats + 1), desc=f"backbones ({mode})", disable=not progress, file=sys.stderr):
            for name, model in built.items():
                model.train(mode == "train")
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                _sync(device)
                start = time.perf_counter()
                _train_step(model, x, y, amp) if mode == "train" else _eval_step(model, x, amp)
                _sync(device)
                if round_:  # the first round warms up
                    times[name][i].append((time.perf_counter() - start) * 1e3)
                if device.type == "cuda":
                    peaks[name][i] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    rows = [
        ModelRow(name, sum(p.numel() for p in m.parameters()) / 1e6, statistics.median(times[name][0]), statistics.median(times[name][1]))
        for name, m in built.items()
    ]
    if device.type == "cuda":
        for row in rows:
            row.train_mb, row.eval_mb = peaks[row.name]
    return rows


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def step_peak_mb(step: Callable[[], object]) -> float:
    """Peak extra resident memory (MiB) while ``step()`` runs (Linux).

    Resets the kernel's resident high-water mark (``/proc/self/clear_refs``), runs the step and reads
    ``VmHWM - VmRSS(before)``. Memory the allocator kept from earlier work would hide part of the
    peak, so call it in a fresh process (the benchmark scripts start one per measurement)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    step()
    return max(0.0, (_status_kb("VmHWM") - before) / 1024)  # RSS can dip between the reset and the read


def peak_memory_mb(make: Callable[[], torch.nn.Module], mode: str, batch: int = 8, size: int = 224) -> float:
    """Peak extra resident memory (MiB) of one train step or eval forward of a fresh model."""
    model = make().train(mode == "train")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    return step_peak_mb(lambda: _train_step(model, x, y) if mode == "train" else _eval_step(model, x))


def format_models(rows: Sequence[ModelRow], base: str) -> str:
    """Table with time ratios relative to the row named ``base`` (and peak memory when measured)."""
    ref = {r.name: r for r in rows}[base]
    memory = any(r.train_mb is not None for r in rows)
    head = f"{'model':<34} {'params':>7} {'train ms':>9} {'x':>6} {'eval ms':>8} {'x':>6}"
    head += f" {'train MB':>9} {'eval MB':>8}" if memory else ""
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r.name:<34} {r.params_m:>6.1f}M {r.train_ms:>9.0f} {r.train_ms / ref.train_ms:>6.2f} "
            f"{r.eval_ms:>8.0f} {r.eval_ms / ref.eval_ms:>6.2f}"
        )
        if memory:
            line += f" {r.train_mb or 0:>9.0f} {r.eval_mb or 0:>8.0f}"
        lines.append(line)
    note = f"(x = time relative to {base}"
    lines.append(note + ("; MB = peak extra memory of one step)" if memory else ")"))
    return "\n".join(lines)
