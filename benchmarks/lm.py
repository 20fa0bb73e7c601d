"""Prefill of a narrow Llama (4 layers, 4 heads of 64) on CPU: vzoo methods against SDPA, same process.

    python benchmarks/lm.py --tokens 8192 16384
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vzoo.bench import median_ms
from vzoo.lm import MoBAConfig, apply_sparse_attention


def moba_density(n: int, block: int, topk: int) -> float:
    """Attended share of the causal (query, key) pairs: query ``i`` sees its own block up to itself plus
    ``min(topk - 1, complete past blocks)`` whole blocks (MoBA always finds that many candidates)."""
    seen = sum(i % block + 1 + block * min(topk - 1, i // block) for i in range(n))
    return seen / (n * (n + 1) / 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=max(a.tokens))
    model = LlamaForCausalLM(cfg).eval()
    cpu = torch.device("cpu")
    for n in a.tokens:
        ids = torch.randint(0, 1000, (1, n))
        with torch.no_grad():
            sdpa = median_ms(lambda: model(ids, logits_to_keep=1), cpu, a.repeats)
            with apply_sparse_attention(model, MoBAConfig(block_size=512, topk=3)):
                moba = median_ms(lambda: model(ids, logits_to_keep=1), cpu, a.repeats)
        print(f"{n:>6} tokens: sdpa {sdpa:8.1f} ms | moba (512, top-3) {moba:8.1f} ms  {sdpa / moba:5.2f}x  "
              f"(density {moba_density(n, 512, 3):.3f} of the causal pairs)")


if __name__ == "__main__":
    main()
