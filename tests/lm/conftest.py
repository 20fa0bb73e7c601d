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


def assert_equals_eager(model: torch.nn.Module, config) -> None:
    """With ``config`` applied, a left-padded batch gives eager attention's logits on its tokens and its
    greedy generation, and an unpadded row (the methods' kernel paths) its logits."""
    from vzoo.lm import apply_sparse_attention

    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :7] = 0
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model(ids, attention_mask=mask).logits
        ref_gen = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        model.set_attn_implementation("sdpa")
        with apply_sparse_attention(model, config):
            out = model(ids, attention_mask=mask).logits
            single = model(ids[:1]).logits
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, ref[:1], atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, ref_gen)


def tiny_checkpoint(folder) -> list[str]:
    """Save :func:`make_lm` and a word-level tokenizer over ``w0 .. w89`` to ``folder``; returns the words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]"] + [f"w{i}" for i in range(90)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    make_lm().save_pretrained(folder)
    return words


class LM:
    make = staticmethod(make_lm)
    cache_of = staticmethod(cache_of)
    assert_equals_eager = staticmethod(assert_equals_eager)
    checkpoint = staticmethod(tiny_checkpoint)


@pytest.fixture
def lm() -> type[LM]:
    return LM
