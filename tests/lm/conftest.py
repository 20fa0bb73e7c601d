"""Tiny random causal LMs built from configs in code (no downloads) and cache accessors that work with
transformers 4.57 (``past_key_values``) and 5.x (``cache``)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def make_lm(kind: str = "llama", layers: int = 3, seed: int = 0) -> torch.nn.Module:
    """Llama or Qwen2 with 4 query / 2 key-value heads of 16, in eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    return model.eval()


def cache_of(output):
    """The KV cache a forward pass returned."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class LM:
    make = staticmethod(make_lm)
    cache_of = staticmethod(cache_of)


@pytest.fixture
def lm() -> type[LM]:
    return LM
