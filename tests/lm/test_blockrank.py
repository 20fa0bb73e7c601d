"""BlockRank in transformers: the packer, the structured mask against eager attention with the pattern
spelled out by loops, permutation invariance over documents, scores, the auxiliary loss, rank()."""

from __future__ import annotations

import math

import pytest
import torch

from vzoo.lm import BlockRankConfig, apply_sparse_attention, blockrank_aux_loss, rank
from vzoo.lm.blockrank import document_scores, pack_ids, scores_of

H = 16


def _prompt(order=(0, 1, 2, 3)):
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (5, 9, 16, 3)]
    return pack_ids([1, 2, 3], [docs[i] for i in order], [7, 8, 9, 10], H, 0), docs


def test_packer_left_pads_and_restarts_positions():
    prompt, docs = _prompt()
    ids, mask, pos = (t.view(6, H) for t in (prompt.input_ids, prompt.attention_mask, prompt.position_ids))
    assert ids[0, -3:].tolist() == [1, 2, 3] and mask[0].sum() == 3 and ids[0, :-3].eq(0).all()
    for s, doc in enumerate(docs, start=1):
        assert ids[s, H - len(doc) :].tolist() == doc and mask[s].sum() == len(doc)
        assert pos[s, H - len(doc) :].tolist() == list(range(3, 3 + len(doc)))  # after the 3 instruction tokens
    assert pos[0, -3:].tolist() == [0, 1, 2] and pos[5, -4:].tolist() == [16384, 16385, 16386, 16387]
    assert pos[mask == 0].eq(0).all() and prompt.num_documents == 4
    assert prompt.segment_ids[0, ::H].tolist() == [0, 1, 2, 3, 4, 5]
    long = pack_ids([1] * 40, [[2] * 40], list(range(1, 41)), H, 0)
    assert long.input_ids.view(3, H)[2].tolist() == list(range(25, 41))  # the query keeps its end


def loop_mask(valid, m):
    """Additive [1, 1, n, n] mask of the BlockRank pattern, one (query, key) pair at a time."""
    n = m * H
    out = torch.full((1, 1, n, n), torch.finfo(torch.float32).min)
    for i in range(n):
        for j in range(n):
            si, sj = i // H, j // H
            ok = (si == sj and j <= i) or (sj == 0 and 0 < si) or (si == m - 1 and sj < si)
            if ok and valid[j]:
                out[0, 0, i, j] = 0.0
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_structured_attention_equals_eager_with_the_pattern_mask(lm, kind):
    model = lm.make(kind)
    prompt, _ = _prompt()
    valid = prompt.attention_mask[0].bool()
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model(prompt.input_ids, attention_mask=loop_mask(valid, 6), position_ids=prompt.position_ids).logits
        model.set_attn_implementation("sdpa")
        with apply_sparse_attention(model, BlockRankConfig(block_length=H)):
            got = model(**prompt.model_inputs()).logits
    torch.testing.assert_close(got[0, valid], ref[0, valid], atol=1e-5, rtol=1e-5)


def test_documents_are_order_invariant(lm):
    model = lm.make()
    order = (2, 0, 3, 1)
    a, _ = _prompt()
    b, _ = _prompt(order)
    with torch.no_grad(), apply_sparse_attention(model, BlockRankConfig(block_length=H, score_layers=(0, 2))):
        out_a = model(**a.model_inputs(), output_hidden_states=True)
        scores_a = scores_of(model)
        out_b = model(**b.model_inputs(), output_hidden_states=True)
        scores_b = scores_of(model)
    ha, hb = out_a.hidden_states[-1].view(6, H, -1), out_b.hidden_states[-1].view(6, H, -1)
    valid_a, valid_b = a.attention_mask.view(6, H).bool(), b.attention_mask.view(6, H).bool()
    torch.testing.assert_close(hb[5][valid_b[5]], ha[5][valid_a[5]], atol=1e-5, rtol=1e-5)  # the query block
    for slot, doc in enumerate(order, start=1):
        torch.testing.assert_close(hb[slot][valid_b[slot]], ha[1 + doc][valid_a[1 + doc]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores_b[0], scores_a[0, list(order)], atol=1e-6, rtol=1e-5)
    assert abs(float(scores_a.sum()) - 1.0) < 1e-5


def test_document_scores_match_loops():
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 4 * H, 8), torch.randn(1, 2, 4 * H, 8)
    valid = torch.rand(1, 4 * H) > 0.3
    got = document_scores(q, k, valid, 0.3, H, 2)
    want = torch.zeros(1, 2, dtype=torch.float64)
    for h in range(4):
        for t in (-2, -1):
            doc_keys = [j for j in range(H, 3 * H) if valid[0, j]]
            s = torch.tensor([float(q[0, h, t] @ k[0, h // 2, j]) * 0.3 for j in doc_keys], dtype=torch.float64)
            p = torch.softmax(s, 0)
            for j, pj in zip(doc_keys, p):
                want[0, j // H - 1] += pj / 8
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_aux_loss_values_and_gradient():
    uniform = torch.zeros(2, 5, requires_grad=True)
    pos = torch.zeros(2, 5, dtype=torch.bool)
    pos[:, 3] = True
    loss = blockrank_aux_loss(uniform, pos, 0.05)
    assert abs(loss.item() - math.log(5)) < 1e-6
    loss.backward()
    assert (uniform.grad[:, 3] < 0).all() and (uniform.grad[:, [0, 1, 2, 4]] > 0).all()  # descent raises the positive
    two = pos.clone()
    two[:, 1] = True
    assert abs(blockrank_aux_loss(torch.zeros(2, 5), two).item() - math.log(5 / 2)) < 1e-6
    with pytest.raises(ValueError, match="temperature"):
        blockrank_aux_loss(torch.zeros(2, 5), pos, 0.0)
    with pytest.raises(ValueError, match="at least one relevant"):
        blockrank_aux_loss(torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.bool))


def test_rank_orders_documents_and_ignores_their_order(lm):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "Query:", "Answer:"] + [f"w{i}" for i in range(80)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    model = lm.make()
    docs = ["w1 w2 w3", "w4 w5 w6 w7", "w8", "w9 w10 w11 w12 w13 w14"]
    config = BlockRankConfig(block_length=H)
    first = rank(model, tokenizer, "w4 w5", docs, config=config)
    second = rank(model, tokenizer, "w4 w5", docs[::-1], config=config)
    assert sorted(d for d, _ in first) == sorted(docs)
    assert [s for _, s in first] == sorted((s for _, s in first), reverse=True)
    assert [d for d, _ in first] == [d for d, _ in second]
    for (_, s1), (_, s2) in zip(first, second):
        assert abs(s1 - s2) < 1e-5
    assert model.config._attn_implementation == "sdpa"  # rank() removed what it applied


def test_bad_configs_and_inputs(lm):
    for kwargs, field in ((dict(block_length=0), "block_length"), (dict(score_tokens=0), "score_tokens"),
                          (dict(score_layers=(-1,)), "score_layers")):
        with pytest.raises(ValueError, match=f"BlockRankConfig.{field}"):
            BlockRankConfig(**kwargs)
    model = lm.make()
    with pytest.raises(ValueError, match="score_layers"):
        apply_sparse_attention(model, BlockRankConfig(score_layers=(7,)))
    with torch.no_grad(), apply_sparse_attention(model, BlockRankConfig(block_length=H)):
        with pytest.raises(ValueError, match="whole segments"):
            model(torch.randint(0, 97, (1, 40)))
    with pytest.raises(ValueError, match="at least one document"):
        pack_ids([1], [], [2], H, 0)
