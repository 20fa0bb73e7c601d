"""Where the attention sinks are on real text (ACT, arXiv 2406.15765): SmolLM2-135M-Instruct (30 layers,
9 heads) on the first ``--tokens`` tokens of ``pydoc_data.topics`` (as the LM quality benchmark, no BOS
token unless ``--bos``), eager attention maps, ACT's statistic per layer and head: the mean attention a
key receives from the queries that can see it, a sink when above ``--tau``.

    python benchmarks/act_sinks.py                      # 512 tokens, tau 0.1
    python benchmarks/act_sinks.py --tokens 1024 --layer 12 --bos

Prints per head the sinks besides position 0 and the tokens they are, a summary (most frequent sink
tokens; how many are "tail" sinks, keys within the last ``--tail`` positions, seen by few queries);
writes ``act_sinks.json``, ``act_sinks_heatmap.png`` (layers x heads: number of sinks besides position 0,
all and before the tail) and ``act_sinks_received.png`` (received attention over positions, every head of one layer) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path

import torch

from vzoo.atomic import save_figure, write_json_atomic
from vzoo.lm.act import sink_map
from vzoo.lm_quality import load_smollm2, text_tokens


def _plots(received: torch.Tensor, counts: dict[str, torch.Tensor], layer: int, tau: float, words: list[str],
           out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, heads, t = received.shape
    fig, axes = plt.subplots(1, len(counts), figsize=(4.5 * len(counts), 8))
    for ax, (title, c) in zip(axes, counts.items()):
        im = ax.imshow(c, aspect="auto", cmap="viridis")
        for i in range(layers):
            for h in range(heads):
                ax.text(h, i, int(c[i, h]), ha="center", va="center", fontsize=6,
                        color="w" if c[i, h] < max(int(c.max()), 1) / 2 else "k")
        ax.set(xlabel="head", ylabel="layer", title=title)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"ACT sinks besides position 0: SmolLM2-135M, {t} tokens, tau {tau}")
    fig.tight_layout()
    save_figure(fig, out / "act_sinks_heatmap.png", dpi=120)

    fig, ax = plt.subplots(figsize=(11, 4))
    for h in range(heads):
        ax.plot(received[layer, h].numpy(), lw=0.8, label=f"head {h}")
    ax.axhline(tau, color="k", ls="--", lw=0.8, label=f"tau {tau}")
    ax.set(yscale="log", ylim=(1e-4, 1.5), xlabel="key position", ylabel="mean received attention",
           title=f"layer {layer}: attention each key receives from the queries that see it")
    for j in sorted(set((received[layer, :, 1:] > tau).nonzero()[:, 1].add(1).tolist()))[:25]:
        ax.annotate(repr(words[j])[1:-1][:10], (j, float(received[layer, :, j].max())), fontsize=6, rotation=60)
    ax.legend(fontsize=6, ncol=5)
    fig.tight_layout()
    save_figure(fig, out / "act_sinks_received.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--tail", type=int, default=16, help="keys in the last TAIL positions count as tail sinks")
    p.add_argument("--layer", type=int, help="layer of the received-attention plot (default: most sinks before the tail)")
    p.add_argument("--bos", action="store_true", help="prepend the tokenizer's BOS token")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    model, tok = load_smollm2()
    ids = text_tokens(tok, a.tokens)
    if a.bos:
        ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], 1)
    received, sinks = sink_map(model, ids, a.tau)
    layers, heads, t = received.shape
    words = [tok.decode([i]) for i in ids[0].tolist()]
    later = sinks[:, :, 1:]
    counts = later.sum(-1)
    early = later[:, :, : t - 1 - a.tail].sum(-1)
    layer = int(early.sum(-1).argmax()) if a.layer is None else a.layer

    per_head, tokens, places, tail = [], Counter(), Counter(), 0
    for i in range(layers):
        for h in range(heads):
            pos = (later[i, h].nonzero().flatten() + 1).tolist()
            tail += sum(j >= t - a.tail for j in pos)
            tokens.update(words[j] for j in pos if j < t - a.tail)
            places.update(j for j in pos if j < t - a.tail)
            per_head.append({"layer": i, "head": h, "first_is_sink": bool(sinks[i, h, 0]),
                             "received_first": round(float(received[i, h, 0]), 4), "sinks": pos,
                             "tokens": [words[j] for j in pos], "received": [round(float(received[i, h, j]), 4) for j in pos]})
            if pos:
                shown = ", ".join(f"{j}:{words[j]!r}" for j in pos[:12]) + (" ..." if len(pos) > 12 else "")
                print(f"layer {i:2d} head {h}: {len(pos):3d} sinks  {shown}")

    total = int(counts.sum())
    first = int(sinks[:, :, 0].sum())
    summary = [
        f"SmolLM2-135M, {t} tokens{' (BOS prepended)' if a.bos else ''}, tau {a.tau}; load average "
        f"{os.getloadavg()[0]:.1f}; {time.perf_counter() - begin:.0f} s",
        f"position 0 ({words[0]!r}) is a sink in {first} of {layers * heads} heads",
        f"{int((counts > 0).sum())} of {layers * heads} heads have sinks besides position 0: {total} in all, "
        f"{tail} of them in the last {a.tail} positions (seen by at most {a.tail} queries)",
        f"{len(places)} distinct sink positions before the tail (position token: heads): "
        + ", ".join(f"{j} {words[j]!r}: {n}" for j, n in sorted(places.items())),
        "most frequent sink tokens before the tail (heads): "
        + ", ".join(f"{w!r} {n}" for w, n in tokens.most_common(15)),
        f"received-attention plot: layer {layer}",
    ]
    print("\n".join(summary))
    _plots(received, {"all": counts, f"before the last {a.tail} positions": early}, layer, a.tau, words, a.out)
    write_json_atomic({"tokens": t, "tau": a.tau, "bos": a.bos, "summary": summary, "heads": per_head},
                      a.out / "act_sinks.json")


if __name__ == "__main__":
    main()
