"""Linear and recurrent attention ops against causal SDPA, same process: prefill (forward, forward+backward)
from 2k to 64k tokens and decode cost per token at short and long context. Used by ``vzoo bench`` and
``benchmarks/linear.py``.

Shapes follow the issue's bar: B=1, H=4, D=64, fp32 on the CPU (prefill rows also on CUDA, any dtype). Each op runs its fast path (``backend=None``) with the
settings its layer uses by default: Lightning with the ALiBi-style decay slopes, RAT with chunks of 16 and
2 key groups, LLA with ridge 10, Titans with a depth-2 memory in mini-batches of 16.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vzoo.atomic import save_figure
from vzoo.bench import median_ms, mode_ms

__all__ = ["BAR", "DecodeRow", "HybridRow", "SpeedRow", "check_linear_bar", "decode_rows", "format_decode",
           "format_hybrid", "format_speed", "hybrid_finetune", "layer_decode_rows", "plot_speed", "speed_rows"]

B, H, D = 1, 4, 64


@dataclass
class SpeedRow:
    op: str
    tokens: int
    mode: str  # "fwd" | "fwd+bwd"
    ms: float
    sdpa_ms: float

    @property
    def speedup(self) -> float:
        return self.sdpa_ms / self.ms


@dataclass
class DecodeRow:
    op: str
    context: int
    us: float  # per generated token


def _rand(*shape: int, grad: bool, like: dict, uniform: bool = False) -> torch.Tensor:
    x = torch.rand(*shape, **like).mul(0.9).add(0.05) if uniform else torch.randn(*shape, **like)
    return x.requires_grad_(grad)


def _lightning(t: int, grad: bool, like: dict) -> Callable[[], torch.Tensor]:
    from vzoo.kernels.lightning import lightning_attention, lightning_slopes

    q, k, v = (_rand(B, H, t, D, grad=grad, like=like) for _ in range(3))
    slopes = lightning_slopes(H).to(like["device"])
    return lambda: lightning_attention(q, k, v, decay=slopes, scale=D**-0.5)


def _rat(t: int, grad: bool, like: dict) -> Callable[[], torch.Tensor]:
    from vzoo.kernels.rat import rat_attention

    q, v = _rand(B, H, t, D, grad=grad, like=like), _rand(B, H, t, D, grad=grad, like=like)
    k = _rand(B, 2, t, D, grad=grad, like=like)
    gate = _rand(B, H, t, D, grad=grad, like=like, uniform=True)
    return lambda: rat_attention(q, k, v, gate, chunk_size=16, rope=10000.0)


def _lla(t: int, grad: bool, like: dict) -> Callable[[], torch.Tensor]:
    from vzoo.kernels.lla import local_linear_attention

    q, k, v = (_rand(B, H, t, D, grad=grad, like=like) for _ in range(3))
    return lambda: local_linear_attention(q, k, v, ridge=10.0)


def _titans(t: int, grad: bool, like: dict) -> Callable[[], torch.Tensor]:
    from vzoo.kernels.titans import neural_memory

    q, k = (F.normalize(torch.randn(B * H, t, D, **like), dim=-1).requires_grad_(grad) for _ in range(2))
    v = _rand(B * H, t, D, grad=grad, like=like)
    lr, eta, alpha = (torch.rand(B * H, t, **like).mul(s) for s in (0.1, 0.9, 0.05))
    weights = (torch.randn(B * H, 2 * D, D, device=like["device"]) * D**-0.5,
               torch.randn(B * H, D, 2 * D, device=like["device"]) * (2 * D) ** -0.5)
    return lambda: neural_memory(q, k, v, lr, eta, alpha, weights, batch_size=16)[0]


# op -> (make(tokens, grad, {device, dtype}) -> callable, the longest prompt it is timed at)
PREFILL: dict[str, tuple[Callable[[int, bool, dict], Callable[[], torch.Tensor]], int]] = {
    "lightning": (_lightning, 1 << 16),
    "rat (chunk 16)": (_rat, 1 << 16),
    "titans (mag memory)": (_titans, 1 << 14),
    "lla": (_lla, 1 << 12),
}


def _sdpa(t: int, grad: bool, like: dict) -> Callable[[], torch.Tensor]:
    q, k, v = (_rand(B, H, t, D, grad=grad, like=like) for _ in range(3))
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _timed(make: Callable[[int, bool, dict], Callable[[], torch.Tensor]], t: int, mode: str, repeats: int,
           like: dict) -> float:
    return mode_ms(make(t, mode == "fwd+bwd", like), mode, like["device"], repeats)


def speed_rows(tokens: Sequence[int], modes: Sequence[str] = ("fwd", "fwd+bwd"), ops: Sequence[str] | None = None,
               repeats: int = 3, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               progress: bool = True) -> list[SpeedRow]:
    """Each op (``PREFILL``, up to its longest prompt) and causal SDPA at each prompt length and mode."""
    from tqdm.auto import tqdm

    like = {"device": torch.device(device), "dtype": dtype}
    cases = [(mode, t) for mode in modes for t in tokens]
    rows = []
    for mode, t in tqdm(cases, desc="linear attention", disable=not progress, file=sys.stderr):
        sdpa = _timed(_sdpa, t, mode, repeats, like)
        for op in ops or PREFILL:
            make, longest = PREFILL[op]
            if t <= longest:
                rows.append(SpeedRow(op, t, mode, _timed(make, t, mode, repeats, like), sdpa))
    return rows


def _decode_lightning(context: int) -> Callable[[], object]:
    from vzoo.kernels.lightning import lightning_attention, lightning_attention_step, lightning_slopes

    slopes = lightning_slopes(H)
    q, k, v = (torch.randn(B, H, context, D) for _ in range(3))
    _, state = lightning_attention(q, k, v, decay=slopes, output_final_state=True)
    x = torch.randn(B, H, D)
    return lambda: lightning_attention_step(x, x, x, state, decay=slopes)


def _decode_rat(context: int) -> Callable[[], object]:
    from vzoo.kernels.rat import rat_attention, rat_step

    q, v, gate = torch.randn(B, H, context, D), torch.randn(B, H, context, D), torch.rand(B, H, context, D)
    _, state = rat_attention(q, torch.randn(B, 2, context, D), v, gate, chunk_size=16, rope=10000.0, return_state=True)
    one, k1, g1 = torch.randn(B, H, 1, D), torch.randn(B, 2, 1, D), torch.rand(B, H, 1, D)
    return lambda: rat_step(one, k1, one, g1, state, chunk_size=16, rope=10000.0)


def _decode_sdpa(context: int) -> Callable[[], object]:
    k, v = torch.randn(B, H, context, D), torch.randn(B, H, context, D)
    q = torch.randn(B, H, 1, D)
    return lambda: F.scaled_dot_product_attention(q, k, v)


DECODE: dict[str, Callable[[int], Callable[[], object]]] = {
    "sdpa (KV cache)": _decode_sdpa,
    "lightning": _decode_lightning,
    "rat (chunk 16)": _decode_rat,
}


def _interleaved_us(steps: dict[int, Callable[[], object]], calls: int, rounds: int = 5) -> dict[int, float]:
    """Microseconds per call of each context's ``step``: the median over ``rounds`` rounds that time every
    context in turn (``calls // rounds`` calls each, median), so a slow spell of a shared CPU hits all alike."""
    per_round: dict[int, list[float]] = {c: [] for c in steps}
    with torch.no_grad():
        for _ in range(rounds):
            for c, step in steps.items():
                per_round[c].append(median_ms(step, torch.device("cpu"), max(1, calls // rounds), warmup=2) * 1e3)
    return {c: statistics.median(v) for c, v in per_round.items()}


def decode_rows(contexts: Sequence[int] = (1024, 32768), steps: int = 200) -> list[DecodeRow]:
    """Microseconds per decoded token after ``context`` tokens (:func:`_interleaved_us` over ``steps``
    single-token calls). RAT's step is timed on the same state each call (a step at a chunk end appends its
    summary)."""
    rows = []
    for op, make in DECODE.items():
        us = _interleaved_us({c: make(c) for c in contexts}, steps)
        rows += [DecodeRow(op, c, us[c]) for c in contexts]
    return rows


def layer_decode_rows(configs: dict[str, object | None], contexts: Sequence[int] = (1024, 32768),
                      steps: int = 100) -> list[DecodeRow]:
    """Microseconds per decoded token of one whole attention layer (projections, op, cache) of the narrow
    Llama (hidden 256, 4 heads of 64): the SDPA attention with its KV cache (``None``) or the layer
    ``vzoo.lm.convert`` puts there, after a prefill of ``context`` tokens."""
    from transformers import DynamicCache

    import vzoo.lm
    from vzoo.bench_lm import narrow_llama

    def layer_step(config, c: int) -> Callable[[], object]:
        model = narrow_llama(c + steps + 32, layers=1)
        if config is not None:
            vzoo.lm.convert(model, config)
        attn, cache = model.model.layers[0].self_attn, DynamicCache(config=model.config)
        with torch.no_grad():
            x = torch.randn(1, c + 1, model.config.hidden_size)
            cos, sin = model.model.rotary_emb(x, torch.arange(c + 1)[None])
            attn(x[:, :c], position_embeddings=(cos[:, :c], sin[:, :c]), attention_mask=None, cache=cache)
        one, pe = x[:, c:], (cos[:, c:], sin[:, c:])
        return lambda: attn(one, position_embeddings=pe, attention_mask=None, cache=cache)

    rows = []
    for name, config in configs.items():
        us = _interleaved_us({c: layer_step(config, c) for c in contexts}, steps)
        rows += [DecodeRow(f"{name} layer", c, us[c]) for c in contexts]
    return rows


# The bar of issue 15 (CPU fp32, B1 H4 D64).
BAR = {
    "lightning fwd vs sdpa @32k": 10.0,
    "lightning fwd time 32k / 8k (at most)": 4.6,
    "lightning fwd+bwd vs sdpa @32k": 5.0,
    "rat (chunk 16) fwd vs sdpa @16k": 3.0,
    "lightning decode 32k / 1k (at most)": 1.5,
    "rat (chunk 16) decode 32k / 1k (at most)": 1.5,
    "lightning layer decode 32k / 1k (at most)": 1.5,
    "rat (chunk 16) layer decode 32k / 1k (at most)": 1.5,
}


def check_linear_bar(speed: Sequence[SpeedRow], decode: Sequence[DecodeRow]) -> list[str]:
    """``PASS|FAIL name: measured (bar)`` for each bar item whose rows were measured."""
    get = {(r.op, r.tokens, r.mode): r for r in speed}
    dec = {(r.op, r.context): r.us for r in decode}
    measured: dict[str, float] = {}
    if (r := get.get(("lightning", 32768, "fwd"))) is not None:
        measured["lightning fwd vs sdpa @32k"] = r.speedup
        if (r8 := get.get(("lightning", 8192, "fwd"))) is not None:
            measured["lightning fwd time 32k / 8k (at most)"] = r.ms / r8.ms
    if (r := get.get(("lightning", 32768, "fwd+bwd"))) is not None:
        measured["lightning fwd+bwd vs sdpa @32k"] = r.speedup
    if (r := get.get(("rat (chunk 16)", 16384, "fwd"))) is not None:
        measured["rat (chunk 16) fwd vs sdpa @16k"] = r.speedup
    for op in ("lightning", "rat (chunk 16)", "lightning layer", "rat (chunk 16) layer"):
        if (op, 1024) in dec and (op, 32768) in dec:
            measured[f"{op} decode 32k / 1k (at most)"] = dec[op, 32768] / dec[op, 1024]
    lines = []
    for name, got in measured.items():
        ok = got <= BAR[name] if "(at most)" in name else got >= BAR[name]
        unit = "" if "/" in name else "x"
        lines.append(f"{'PASS' if ok else 'FAIL'} {name}: {got:.2f}{unit} (bar {BAR[name]}{unit})")
    return lines


def format_speed(rows: Sequence[SpeedRow]) -> str:
    head = f"{'op':<20} {'mode':>8} {'tokens':>7} {'ms':>10} {'sdpa ms':>10} {'x sdpa':>7}"
    lines = [head, "-" * len(head)]
    lines += [f"{r.op:<20} {r.mode:>8} {r.tokens:>7} {r.ms:>10.1f} {r.sdpa_ms:>10.1f} {r.speedup:>7.2f}" for r in rows]
    return "\n".join(lines)


def format_decode(rows: Sequence[DecodeRow]) -> str:
    head = f"{'op':<20} {'context':>8} {'us/token':>9}"
    return "\n".join([head, "-" * len(head), *(f"{r.op:<20} {r.context:>8} {r.us:>9.1f}" for r in rows)])


def plot_speed(rows: Sequence[SpeedRow], path: str) -> None:
    """Log-log latency against prompt length, one panel per mode, with causal SDPA: the slopes show linear
    against quadratic cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("fwd", "fwd+bwd") if any(r.mode == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sel = [r for r in rows if r.mode == mode]
        sdpa = sorted({(r.tokens, r.sdpa_ms) for r in sel})
        ax.plot(*zip(*sdpa), marker="o", color="black", label="causal SDPA")
        for op in dict.fromkeys(r.op for r in sel):
            pts = sorted((r.tokens, r.ms) for r in sel if r.op == op)
            ax.plot(*zip(*pts), marker="o", label=op)
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms (median)", title=f"{mode}, B1 H4 D64 fp32 CPU")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


@dataclass
class HybridRow:
    name: str
    layers: int  # converted decoder layers
    ppl_original: float
    ppl_converted: float  # right after conversion, before any training
    ppl_finetuned: float
    steps: int
    seconds: float
    losses: list[float]


def hybrid_finetune(name: str, config, local_window: int | None = None, steps: int = 200, seq_len: int = 512,
                    lr: float = 1e-3, eval_tokens: int = 2048, seed: int = 0, progress: bool = True) -> HybridRow:
    """SmolLM2-135M (:func:`vzoo.lm_quality.load_smollm2`) turned into a hybrid by ``vzoo.lm.convert(model,
    config, local_window)`` and fine-tuned for ``steps`` AdamW steps (cosine ``lr``, batch 1, ``seq_len``
    tokens) on ``pydoc_data.topics``; only the new layers train. Perplexity on the text's last
    ``eval_tokens`` tokens (held out from training): the original model, the hybrid before and after."""
    import time

    from tqdm.auto import tqdm

    import vzoo.lm
    from vzoo.lm_quality import load_smollm2, perplexity, reference_text

    torch.manual_seed(seed)
    model, tokenizer = load_smollm2()
    ids = torch.tensor(tokenizer.encode(reference_text(), add_special_tokens=False))
    held_out, train = ids[-eval_tokens:].unsqueeze(0), ids[:-eval_tokens]
    ppl_original = perplexity(model, held_out)
    vzoo.lm.convert(model, config, local_window=local_window)
    ppl_converted = perplexity(model, held_out)
    new = [layer.self_attn for layer in model.model.layers if hasattr(layer.self_attn, "vzoo_layer")]
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in new for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + torch.cos(torch.tensor(i / steps * torch.pi)).item()))
    starts = torch.randint(0, train.numel() - seq_len - 1, (steps,))
    losses = []
    model.train()
    begin = time.perf_counter()
    for s in tqdm(starts.tolist(), desc=f"fine-tune {name}", disable=not progress):
        x = train[s : s + seq_len].unsqueeze(0)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - begin
    model.eval()
    return HybridRow(name, len(new), ppl_original, ppl_converted, perplexity(model, held_out), steps, seconds, losses)


def format_hybrid(rows: Sequence[HybridRow]) -> str:
    head = f"{'hybrid':<34} {'layers':>6} {'ppl orig':>9} {'converted':>10} {'fine-tuned':>10} {'steps':>6} {'s':>7}"
    return "\n".join([head, "-" * len(head), *(
        f"{r.name:<34} {r.layers:>6} {r.ppl_original:>9.2f} {r.ppl_converted:>10.2f} {r.ppl_finetuned:>10.2f} "
        f"{r.steps:>6} {r.seconds:>7.0f}" for r in rows)])
