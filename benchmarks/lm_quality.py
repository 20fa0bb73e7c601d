"""Quality and speed of every registered vzoo LM method on SmolLM2-135M-Instruct against dense SDPA:
perplexity on the last half of 4k / 8k-token windows of ``pydoc_data.topics``, passkey retrieval
(Landmark / LongHeads prompt, KV-cache greedy decoding), the selected density (unpatched layers count
1.0) and the prefill time (dense and method timed in alternation in this process).

    python benchmarks/lm_quality.py                          # every method, 4096 and 8192 tokens, 20 probes
    python benchmarks/lm_quality.py --quick --methods moba   # smoke run: 2048 tokens, 3 probes
    python benchmarks/lm_quality.py --trained-gates gates.safetensors   # SeerAttention rows also with trained gates

Rows: each method's default config and its ``bench(tokens)`` rows (``--methods``: substrings of the
row or method label). Writes the markdown table to ``--out`` and a PNG next to it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

from vzoo.atomic import write_atomic
from vzoo.bench_lm import model_density
from vzoo.lm import apply_sparse_attention, load_gates
from vzoo.lm_quality import (
    MethodRow, QualityRow, format_table, greedy_answer, load_smollm2, method_rows, paired_prefill,
    passkey_correct, passkey_probes, perplexity, plot_rows, prefill_seconds, text_tokens,
)


def _apply(model, row: MethodRow):
    """Switch ``row``'s method on (gates loaded if it has a gate file); returns the handle."""
    handle = apply_sparse_attention(model, row.config)
    if row.gates is not None:
        try:
            load_gates(model, row.gates)
        except Exception:
            handle.remove()
            raise
    return handle


def _passkey(model, tokenizer, prompts, new_tokens: int, bar) -> tuple[int, int]:
    correct = 0
    for p in prompts:
        correct += passkey_correct(tokenizer.decode(greedy_answer(model, p.ids, new_tokens)), p.key)
        bar.update()
    return correct, len(prompts)


def _measure(model, tokenizer, row: MethodRow, ids, prompts, dense: QualityRow, a, bar) -> QualityRow:
    """Perplexity and density (one forward), passkey, and prefill time of ``row`` at ``ids``' length."""
    tokens = ids.shape[1]
    with _apply(model, row) as handle:
        ppl = perplexity(model, ids)
        bar.update()
        layers = model.config.num_hidden_layers
        density = model_density(handle, layers)
        passkey = _passkey(model, tokenizer, prompts, a.new_tokens, bar)
    dense_s, sparse_s = paired_prefill(model, ids, lambda: _apply(model, row), a.repeats, bar.update)
    return QualityRow(row.label, tokens, ppl, ppl / dense.ppl, passkey, density, sparse_s, dense_s / sparse_s)


def _dense(model, tokenizer, ids, prompts, a, bar) -> QualityRow:
    ppl = perplexity(model, ids)
    bar.update()
    passkey = _passkey(model, tokenizer, prompts, a.new_tokens, bar)
    prefill_seconds(model, ids)  # warm-up
    times = []
    for _ in range(a.repeats):
        times.append(prefill_seconds(model, ids))
        bar.update()
    return QualityRow("dense (sdpa)", ids.shape[1], ppl, 1.0, passkey, 1.0, statistics.median(times), 1.0)


def run(a: argparse.Namespace) -> list[QualityRow]:
    begin = time.perf_counter()
    model, tokenizer = load_smollm2(a.cache_dir)
    print(f"model loaded in {time.perf_counter() - begin:.1f} s", file=sys.stderr)
    plan = {n: method_rows(n, a.methods, a.trained_gates) for n in a.lengths}
    texts = {n: text_tokens(tokenizer, n) for n in a.lengths}
    prompts = {n: passkey_probes(tokenizer, n - a.new_tokens, a.probes, a.seed, a.chat) for n in a.lengths}
    per_row = 1 + a.probes + a.repeats
    results = []
    with tqdm(total=per_row * sum(len(rows) for rows in plan.values()), desc="lm quality") as bar:
        for n, rows in plan.items():
            dense = _dense(model, tokenizer, texts[n], prompts[n], a, bar)
            results.append(dense)
            for row in rows[1:]:
                bar.set_postfix_str(f"{row.label} @ {n}")
                try:
                    results.append(_measure(model, tokenizer, row, texts[n], prompts[n], dense, a, bar))
                except Exception as e:  # one broken method must not lose the others' hours of measurements
                    traceback.print_exc()
                    results.append(QualityRow(row.label, n, error=f"{type(e).__name__}: {e}"[:200]))
                # the rows so far, so an interrupted run keeps what it measured
                write_atomic(a.out, lambda tmp: tmp.write_text(format_table(results, "partial: run in progress")))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192], help="window lengths in tokens")
    p.add_argument("--probes", type=int, default=20, help="passkey probes per length")
    p.add_argument("--repeats", type=int, default=3, help="timed prefill pairs (median)")
    p.add_argument("--methods", nargs="+", default=None, help="keep rows whose label contains one of these")
    p.add_argument("--trained-gates", type=Path, default=None, help="SeerAttention gates (vzoo train lm-gates)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=False,
                   help="passkey prompt inside the chat template (default: plain text, which dense SmolLM2 solves)")
    p.add_argument("--new-tokens", type=int, default=8, help="greedy tokens decoded per passkey probe")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkeys")
    p.add_argument("--cache-dir", default=None, help="model folder (default $VZOO_CACHE/smollm2 or ~/.cache/vzoo/smollm2)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lm_quality.md")
    p.add_argument("--quick", action="store_true", help="smoke run: 2048 tokens, 3 probes")
    a = p.parse_args()
    if a.quick:
        a.lengths, a.probes = [2048], 3
    begin = time.perf_counter()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    rows = run(a)
    title = (f"SmolLM2-135M-Instruct (fp32, CPU, {torch.get_num_threads()} threads, load average "
             f"{os.getloadavg()[0]:.1f}): perplexity over the last half of each window of pydoc_data.topics; passkey "
             f"{a.probes} probes per length ({'chat template' if a.chat else 'plain text'}, seed {a.seed}); density = "
             f"selected share of causal pairs over all layers; prefill = median of {a.repeats}, speed-up vs dense SDPA "
             f"timed in alternation. Total {time.perf_counter() - begin:.0f} s.")
    table = format_table(rows, title)
    print(table)
    write_atomic(a.out, lambda tmp: tmp.write_text(table))
    plot_rows(rows, a.out.with_suffix(".png"))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
