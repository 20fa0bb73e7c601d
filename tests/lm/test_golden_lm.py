"""vzoo against golden outputs of the official code (``tests/golden/make_lm.py`` made them; each fixture
records the repository and commit): MoBA's naive reference (MoonshotAI/MoBA) and SeerAttention's
``AttnGate`` with its threshold selection (microsoft/SeerAttention). fp32, atol 1e-4.

LongGen has no public code (see ``vzoo/lm/longgen.py``); its tests compare with loop oracles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vzoo.lm import MoBAConfig, SeerAttentionConfig, apply_sparse_attention
from vzoo.lm.moba import moba_attention
from vzoo.lm.seer import _selected_blocks, distill_target

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def _load(name: str) -> dict:
    data = torch.load(GOLDEN / name, weights_only=True)
    assert data["repo"].startswith("https://github.com/") and len(data["commit"]) == 40
    return data


MOBA = _load("moba.pt")
SEER = _load("seer_gate.pt")


@pytest.mark.parametrize("case", MOBA["cases"], ids=lambda c: f"chunk{c['chunk_size']}-top{c['topk']}-S{c['q'].shape[2]}")
def test_moba_matches_official_naive_reference(case):
    q, k, v = case["q"], case["k"], case["v"]
    config = MoBAConfig(block_size=case["chunk_size"], topk=case["topk"], dense_fallback=False)
    out = moba_attention(config, q, k, v, None, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out.transpose(1, 2), case["out"], atol=1e-4, rtol=1e-4)


def _gate(case: dict):
    """vzoo's gate on a tiny Llama shaped like the fixture, loaded from the official weights."""
    b, s, hq, d = case["q"].shape
    cfg = LlamaConfig(vocab_size=11, hidden_size=hq * d, intermediate_size=8, num_hidden_layers=1, num_attention_heads=hq,
                      num_key_value_heads=case["k"].shape[2], max_position_embeddings=128)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": case["rope_theta"]}
    model = LlamaForCausalLM(cfg).eval()
    config = SeerAttentionConfig(block_size=case["block_size"], q_pooling=tuple(case["q_pooling"]),
                                 k_pooling=tuple(case["k_pooling"]), hidden=case["hidden"],
                                 force_double=case["force_double"], threshold=case["threshold"])
    apply_sparse_attention(model, config)
    gate = model.model.layers[0].self_attn.attn_gate
    gate.load_state_dict(case["state_dict"])  # official parameter names
    return gate, config


@pytest.mark.parametrize("case", SEER["cases"], ids=lambda c: f"{c['gate_type']}-h{c['hidden']}-double{c['force_double']}")
def test_seer_gate_matches_official(case):
    gate, config = _gate(case)
    b, s = case["q"].shape[:2]
    with torch.no_grad():
        logits = gate(case["q"].transpose(1, 2), case["k"].transpose(1, 2), torch.arange(s)[None].expand(b, s))
    causal = torch.ones(logits.shape[-2:], dtype=torch.bool).tril()
    torch.testing.assert_close(logits[..., causal], case["logits"][..., causal], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.softmax(logits, -1), case["probs"], atol=1e-4, rtol=1e-4)
    # the official threshold rule, plus the diagonal block vzoo always keeps (the official can select nothing)
    diagonal = torch.eye(logits.shape[-1], dtype=torch.bool)
    assert torch.equal(_selected_blocks(config, logits), case["selected"] | diagonal)
    dense_last = SeerAttentionConfig(**{**config.__dict__, "last_block_dense": True})
    assert torch.equal(_selected_blocks(dense_last, logits), case["selected_last_dense"] | diagonal)


def test_seer_distillation_target_matches_official_pooling_kernel():
    """The official Triton attention-pooling kernel rounds to bf16 the per-block row-max logits it
    exponentiates later (``R``: up to 2**-9 relative of a logit, 1-2% of a pooled probability here)
    and the pooled map and its row sums (``Po``), so vzoo's fp32 target differs by up to 5.6e-3 on this
    fixture (rounding it to bf16 as well does not bring it closer): atol 6e-3."""
    case = SEER["distill"]
    q, k = case["q"].transpose(1, 2), case["k"].transpose(1, 2)  # official layout [B, S, H, D]
    target = distill_target(q, k, case["block_size"], case["scale"])
    torch.testing.assert_close(target, case["target"], atol=6e-3, rtol=0)
    assert (target - case["target"]).abs().mean() < 2e-3  # bf16 rounding, not a different map
