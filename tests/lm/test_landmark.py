"""Landmark Attention in transformers models: data side (insertion, collator, token), the attention
against a per-query oracle of the grouped softmax registered as an eager attention function, retrieval,
cached generation, gradients, saving and the ``vzoo train lm-landmark`` command."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface

from vzoo.lm import LandmarkConfig, apply_sparse_attention
from vzoo.lm.landmark import (
    LandmarkCollator, add_landmark_token, generate_with_landmarks, insert_landmarks, load_landmark_model,
    save_landmark_model, strip_landmarks,
)

LANDMARK = 96  # the last id of the tiny models' 97-token vocabulary


def _oracle_weights(scores: torch.Tensor, block: int, top_k: int | None, local_blocks: int) -> torch.Tensor:
    """Grouped-softmax weights ``[Tq, Tk]`` of one head from its scores ``[Tq, Tk]``, one query at a time."""
    tq, tk = scores.shape
    p = block + 1
    w = torch.zeros_like(scores)
    for j in range(tq):
        i = tk - tq + j
        c = i // p
        current = [x for x in range(c * p, i + 1) if x % p != block]
        past = list(range(c))
        if top_k is not None:
            local = [g for g in past if g >= c - local_blocks]
            rest = sorted((g for g in past if g < c - local_blocks), key=lambda g: -float(scores[j, g * p + block]))
            past = sorted(local + rest[:top_k])
        items = [scores[j, g * p + block] for g in past] + [scores[j, x] for x in current]
        p1 = torch.softmax(torch.stack(items), 0)
        for n, g in enumerate(past):
            regular = list(range(g * p, g * p + block))
            w[j, regular] = p1[n] * torch.softmax(scores[j, regular], 0)
        for n, x in enumerate(current):
            w[j, x] = p1[len(past) + n]
    return w


def _oracle_attention(block: int, top_k: int | None = None, local_blocks: int = 0):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = query.double() @ key.double().transpose(-1, -2) * scaling
        out = torch.empty(query.shape[:3] + (value.shape[-1],), dtype=torch.float64)
        for b in range(query.shape[0]):
            for h in range(query.shape[1]):
                out[b, h] = _oracle_weights(scores[b, h], block, top_k, local_blocks) @ value[b, h].double()
        return out.to(query.dtype).transpose(1, 2), None

    return attention


def _ids(tokens: int, block: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    regular = torch.randint(0, LANDMARK, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    return insert_landmarks(regular, block, LANDMARK)


def test_insertion_collator_and_strip():
    ids = torch.arange(40).view(2, 20)
    out = insert_landmarks(ids, 5, 99)
    assert out.shape == (2, 23)  # landmarks after tokens 5, 10, 15 (none after the last block)
    where = [p for p in range(23) if p % 6 == 5]
    assert bool((out[:, where] == 99).all()) and where == [5, 11, 17]
    assert all(torch.equal(s, r) for s, r in zip(strip_landmarks(out, 99), ids))
    batch = LandmarkCollator(99, 5)([{"input_ids": list(range(20))}, torch.arange(20, 40)])
    assert torch.equal(batch["input_ids"], out)
    expected = out.clone()
    expected[:, where] = -100
    assert torch.equal(batch["labels"], expected)
    with pytest.raises(ValueError, match="one length"):
        LandmarkCollator(99, 5)([list(range(20)), list(range(19))])
    with pytest.raises(ValueError, match="block"):
        LandmarkCollator(99, 0)


@pytest.mark.parametrize("top_k,local_blocks", [(None, 0), (1, 0), (1, 1), (2, 0)])
def test_model_equals_the_grouped_softmax_oracle(lm, top_k, local_blocks):
    model = lm.make(layers=2)
    ids = _ids(30, 4)  # 37 tokens, 7 full blocks
    AttentionInterface.register("test_landmark_oracle", _oracle_attention(4, top_k, local_blocks))
    with torch.no_grad():
        model.set_attn_implementation("test_landmark_oracle")
        ref = model(ids).logits
        model.set_attn_implementation("sdpa")
        with apply_sparse_attention(model, LandmarkConfig(block=4, top_k=top_k, local_blocks=local_blocks)):
            out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_one_block_is_the_models_attention_and_all_blocks_retrieved_is_exact(lm):
    model = lm.make(layers=2)
    ids = torch.randint(0, LANDMARK, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        with apply_sparse_attention(model, LandmarkConfig(block=30)):  # no landmark in 30 tokens
            one = model(ids).logits
        many = _ids(40, 4)
        with apply_sparse_attention(model, LandmarkConfig(block=4)):
            exact = model(many).logits
        with apply_sparse_attention(model, LandmarkConfig(block=4, top_k=10)):
            retrieved = model(many).logits
    torch.testing.assert_close(one, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(retrieved, exact, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("config", [LandmarkConfig(block=4), LandmarkConfig(block=4, top_k=1, local_blocks=1)])
def test_cached_generation_equals_recomputation(lm, config):
    model = lm.make(layers=2)
    prompt = torch.randint(0, LANDMARK, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), apply_sparse_attention(model, config):
        kwargs = dict(max_new_tokens=16, do_sample=False)
        cached = generate_with_landmarks(model, prompt, LANDMARK, 4, use_cache=True, **kwargs)[0]
        recomputed = generate_with_landmarks(model, prompt, LANDMARK, 4, use_cache=False, **kwargs)[0]
        # and by hand: every step a full forward, the landmark forced at landmark positions
        ids = insert_landmarks(prompt, 4, LANDMARK)
        while ids.shape[1] < insert_landmarks(prompt, 4, LANDMARK).shape[1] + 16:
            nxt = LANDMARK if ids.shape[1] % 5 == 4 else int(model(ids).logits[0, -1, :LANDMARK].argmax())
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, strip_landmarks(ids, LANDMARK)[0])
    assert torch.equal(cached[:17], prompt[0]) and (cached != LANDMARK).all()


def test_decode_logits_equal_prefill_logits_with_retrieval(lm):
    """One token at a time through the KV cache gives the logits of the whole prompt at once."""
    from transformers import DynamicCache

    model = lm.make(layers=2)
    ids = _ids(40, 4, seed=3)
    with torch.no_grad(), apply_sparse_attention(model, LandmarkConfig(block=4, top_k=2, local_blocks=1)):
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :21], cache=cache, use_cache=True).logits
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(21, ids.shape[1])]
    torch.testing.assert_close(torch.cat([first, *steps], 1), full, atol=1e-5, rtol=1e-5)


def test_training_reaches_the_landmark_embedding_and_padding_is_refused(lm):
    model = lm.make(layers=2).train()
    batch = LandmarkCollator(LANDMARK, 4)(torch.randint(0, LANDMARK, (2, 24)))
    with apply_sparse_attention(model, LandmarkConfig(block=4)):
        out = model(**batch)
        assert math.isfinite(out.loss.item())
        out.loss.backward()
        grad = model.get_input_embeddings().weight.grad
        assert grad[LANDMARK].abs().sum() > 0  # the landmarks' keys gate the past blocks
        assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
        mask = torch.ones_like(batch["input_ids"])
        mask[1, :3] = 0
        with pytest.raises(ValueError, match="padded batches"):
            model(batch["input_ids"], attention_mask=mask)


def test_landmark_token_save_and_load(lm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm.checkpoint(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    before, n = model.get_input_embeddings().weight.detach().clone(), len(tok)
    new_id = add_landmark_token(model, tok)
    assert tok.convert_tokens_to_ids("<landmark>") == new_id == n  # 91 < the model's 97 rows: no resize
    emb = model.get_input_embeddings().weight
    assert emb.shape == before.shape
    torch.testing.assert_close(emb[new_id], before[:n].mean(0))
    assert add_landmark_token(model, tok) == new_id  # idempotent
    config = LandmarkConfig(block=4)
    apply_sparse_attention(model, config)
    ids = insert_landmarks(torch.randint(0, 90, (1, 20)), 4, new_id)
    with torch.no_grad():
        ref = model(ids).logits
    save_landmark_model(model, tok, tmp_path / "saved", config, new_id)
    loaded, tok2, cfg2, lid = load_landmark_model(tmp_path / "saved")
    assert cfg2 == config and lid == new_id and tok2.convert_tokens_to_ids("<landmark>") == new_id
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref)
    _, _, cfg3, _ = load_landmark_model(tmp_path / "saved", top_k=2, local_blocks=1)
    assert (cfg3.top_k, cfg3.local_blocks) == (2, 1)
    with pytest.raises(ValueError, match="vzoo_landmark"):
        load_landmark_model(tmp_path / "base")


def test_config_validation():
    for kwargs, field in [({"block": 0}, "block"), ({"top_k": 0}, "top_k"), ({"local_blocks": -1}, "local_blocks"),
                          ({"layers": [0]}, "layers")]:
        with pytest.raises(ValueError, match=f"LandmarkConfig.{field}"):
            LandmarkConfig(**kwargs)


def test_train_command_checkpoints_and_resumes_exactly(lm, tmp_path):
    from vzoo.cli import main

    words = lm.checkpoint(tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[1 + int(i)] for i in torch.randint(0, 89, (700,), generator=g))
    (tmp_path / "data.txt").write_text(text)
    common = ["train", "lm-landmark", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "data.txt"),
              "--block", "8", "--seq-len", "48", "--steps", "6", "--batch-size", "2", "--ckpt-every", "2"]
    assert main(common + ["--out", str(tmp_path / "whole")]) == 0
    for name in ("last.pt", "metrics.json", "model/config.json", "model/tokenizer_config.json"):
        assert (tmp_path / "whole" / name).is_file(), name
    with pytest.raises(KeyboardInterrupt):
        main(common + ["--out", str(tmp_path / "split"), "--stop-after", "3"])
    assert not (tmp_path / "split" / "model").exists()
    assert main(common + ["--out", str(tmp_path / "split"), "--resume"]) == 0
    a, _, cfg, lid = load_landmark_model(tmp_path / "whole" / "model")
    b, _, _, _ = load_landmark_model(tmp_path / "split" / "model")
    assert cfg.block == 8 and lid == 91
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name)
    with pytest.raises(ValueError, match="other settings"):
        main(common[:-4] + ["--steps", "7", "--batch-size", "2", "--ckpt-every", "2", "--out", str(tmp_path / "split"),
                            "--resume"])
