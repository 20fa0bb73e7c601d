"""Language-model prefill benchmark: a narrow Llama (4 layers, 4 heads of 64) on long random prompts,
each vzoo method against SDPA in the same process. Used by ``vzoo bench`` and ``benchmarks/lm.py``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vzoo.bench import median_ms, step_peak_mb

__all__ = ["LMRow", "format_lm", "lm_methods", "lm_rows", "longgen_density", "moba_density", "narrow_llama", "topk_block_density",
           "blockrank_density"]


@dataclass
class LMRow:
    method: str
    tokens: int
    ms: float
    speedup: float  # SDPA time / this time
    peak_mb: float  # peak extra resident memory of the prefill
    kv_mb: float  # KV-cache bytes held after the prefill
    density: float  # attended share of the causal (query, key) pairs, over all layers
    dense_share: float = 0.0  # share of the method's block-selecting calls that ran dense (break-even rule)


def narrow_llama(max_tokens: int, layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """The benchmark model: hidden 256, 4 heads of 64 (no GQA), MLP 512, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_tokens)
    return LlamaForCausalLM(cfg).eval()


def moba_density(n: int, block: int, topk: int) -> float:
    """Attended share of the causal pairs: query ``i`` sees its own block up to itself plus
    ``min(topk - 1, complete past blocks)`` whole blocks (MoBA always finds that many candidates)."""
    seen = sum(i % block + 1 + block * min(topk - 1, i // block) for i in range(n))
    return seen / (n * (n + 1) / 2)


def longgen_density(n: int, sink: int, window: int) -> float:
    """Attended share of the causal pairs on a sink+window layer."""
    seen = sum(min(i + 1, window) + min(sink, max(0, i + 1 - window)) for i in range(n))
    return seen / (n * (n + 1) / 2)


def topk_block_density(blocks: int, topk: int) -> float:
    """Share of the causal (query block, key block) pairs that ``topk`` blocks per row keep."""
    return sum(min(topk, i + 1) for i in range(blocks)) / (blocks * (blocks + 1) / 2)


def blockrank_density(segments: int, length: int) -> float:
    """Attended share of the causal pairs under BlockRank's segment pattern (no padding)."""
    own = length * (length + 1) / 2
    seen = segments * own + (segments - 2) * length * length + (segments - 1) * length * length
    n = segments * length
    return seen / (n * (n + 1) / 2)


def lm_methods(n: int, layers: int = 4) -> dict[str, tuple[object | None, float]]:
    """Benchmarked configurations: name -> (vzoo config or ``None`` for SDPA, density over the layers)."""
    from vzoo.lm import BlockRankConfig, LongGenConfig, MoBAConfig, SeerAttentionConfig

    longgen = LongGenConfig(sink=64, window=2048)
    sparse = len(longgen.layer_ids(layers))
    return {
        "sdpa": (None, 1.0),
        "moba (512, top-3)": (MoBAConfig(block_size=512, topk=3), moba_density(n, 512, 3)),
        "flashmoba-style (128, top-8, key conv 3)": (
            MoBAConfig(block_size=128, topk=8, key_conv=3), moba_density(n, 128, 8)),
        "seerattention (top-32 of 64-token blocks)": (
            SeerAttentionConfig(block_size=64, topk=32), topk_block_density(-(-n // 64), 32)),
        f"blockrank ({n // 128 - 2} docs x 128 tokens)": (BlockRankConfig(block_length=128), blockrank_density(n // 128, 128)),
        f"longgen ({sparse}/{layers} layers sink 64 + window 2048)": (
            longgen, (layers - sparse + sparse * longgen_density(n, 64, 2048)) / layers),
    }


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
    config = lm_methods(n)[name][0]
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
    bar = tqdm(total=len(tokens) * len(lm_methods(max(tokens))), desc="language models", disable=not progress)
    for n in tokens:
        ids = _prompt(n).to(dev)
        base = None
        for name, (config, density) in lm_methods(n).items():
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
            share = 0.0
            if handle is not None:
                share = handle.dense_calls / handle.sparse_calls if handle.sparse_calls else 0.0
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
