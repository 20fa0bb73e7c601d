"""Language-model prefill benchmark: a narrow Llama (4 layers, 4 heads of 64) on long random prompts,
each vzoo method against SDPA in the same process. Used by ``vzoo bench`` and ``benchmarks/lm.py``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vzoo.bench import median_ms, step_peak_mb

__all__ = ["LMRow", "bench_configs", "format_lm", "lm_rows", "model_density", "narrow_llama"]


@dataclass
class LMRow:
    method: str
    tokens: int
    ms: float
    speedup: float  # SDPA time / this time
    peak_mb: float  # peak extra resident memory of the prefill
    kv_mb: float  # KV-cache bytes held after the prefill
    density: float  # measured attended share of the causal (query, key) pairs, over all layers
    dense_share: float = 0.0  # share of the method's block-selecting calls that ran dense (break-even rule)


def narrow_llama(max_tokens: int, layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """The benchmark model: hidden 256, 4 heads of 64 (no GQA), MLP 512, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_tokens)
    return LlamaForCausalLM(cfg).eval()


def bench_configs(n: int) -> dict[str, object | None]:
    """Benchmarked configurations at ``n`` tokens: ``"sdpa"`` (``None``) and every registered LM
    method's rows (:attr:`vzoo.lm.registry.LMMethod.bench`) up to its ``bench_tokens``."""
    from vzoo.lm import lm_methods

    rows: dict[str, object | None] = {"sdpa": None}
    for method in lm_methods():
        if method.bench is not None and (method.bench_tokens is None or n <= method.bench_tokens):
            rows.update(method.bench(n))
    return rows


def model_density(handle, layers: int) -> float:
    """Attended share of the causal pairs over all ``layers`` of a model: each patched layer's mean over
    its recorded prompt calls (1.0 when it recorded none), the other layers 1.0."""
    stats = handle.density_stats()
    patched = sum(s.total / s.calls if s.calls else 1.0 for s in stats)
    return (patched + layers - len(stats)) / layers


def _kv_mb(cache) -> float:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) / 2**20


def _prefill(model: torch.nn.Module, ids: torch.Tensor):
    with torch.no_grad():
        return model(ids, use_cache=True, logits_to_keep=1)


def _prompt(n: int) -> torch.Tensor:
    return torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(n))


def _fresh_peak_mb(n: int, name: str, max_tokens: int, dtype: torch.dtype) -> float:
    """Peak extra memory of one prefill, measured in this (fresh) process after a warm-up prefill of
    a shorter prompt (so lazily built state is not counted)."""
    from vzoo.lm import apply_sparse_attention

    model, ids = narrow_llama(max_tokens).to(dtype), _prompt(n)
    config = bench_configs(n)[name]
    if config is not None:
        apply_sparse_attention(model, config)
    _prefill(model, ids[:, :1024])
    return step_peak_mb(lambda: _prefill(model, ids))


def _cuda_peak_mb(prefill) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    prefill()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def lm_rows(
    tokens: list[int], repeats: int = 3, device: str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = True,
    peak: bool = True,
) -> list[LMRow]:
    """Prefill (with a KV cache, last logits only) of :func:`narrow_llama` at each length, per method.
    Latency and KV size are measured here; on the CPU peak memory is measured in a fresh process per
    row, so memory the allocator kept from earlier runs does not hide it (``peak=False``: not measured,
    NaN)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    from vzoo.lm import apply_sparse_attention

    model = narrow_llama(max(tokens)).to(device, dtype)
    dev = torch.device(device)
    rows = []
    spawn = multiprocessing.get_context("spawn")
    bar = tqdm(total=sum(len(bench_configs(n)) for n in tokens), desc="language models", disable=not progress)
    for n in tokens:
        ids = _prompt(n).to(dev)
        base = None
        for name, config in bench_configs(n).items():
            bar.set_postfix_str(f"{n} tokens, {name.split()[0]}")
            handle = apply_sparse_attention(model, config) if config is not None else None
            ms = median_ms(lambda: _prefill(model, ids), dev, repeats)
            out = _prefill(model, ids)
            kv = _kv_mb(getattr(out, "cache", None) or out.past_key_values)
            del out
            if not peak:
                peak_mb = float("nan")
            elif dev.type == "cuda":
                peak_mb = _cuda_peak_mb(lambda: _prefill(model, ids))
            else:
                with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    peak_mb = pool.submit(_fresh_peak_mb, n, name, max(tokens), dtype).result()
            share, density = 0.0, 1.0
            if handle is not None:
                share = handle.dense_calls / handle.sparse_calls if handle.sparse_calls else 0.0
                density = model_density(handle, model.config.num_hidden_layers)
                handle.remove()
            base = base or ms
            rows.append(LMRow(name, n, ms, base / ms, peak_mb, kv, density, share))
            bar.update()
    bar.close()
    return rows


def format_lm(rows: list[LMRow]) -> str:
    """The rows as a table; ``dense`` is the share of calls that ran dense attention because their
    selection was above the device's break-even density (``dense_fallback``)."""
    head = f"{'tokens':>6}  {'method':<42} {'ms':>8} {'x sdpa':>7} {'peak MB':>8} {'KV MB':>7} {'density':>8} {'dense':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.tokens:>6}  {r.method:<42} {r.ms:8.1f} {r.speedup:7.2f} {r.peak_mb:8.1f} {r.kv_mb:7.1f} "
                     f"{r.density:8.3f} {r.dense_share:6.2f}")
    return "\n".join(lines)
