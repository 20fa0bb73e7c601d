"""SeerAttention in transformers: the gate against loops, exact block-sparse inference, equality with eager
attention when every block is kept, self-distillation that learns, gate files, the lm-gates command."""

from __future__ import annotations

import math

import pytest
import torch

from vzoo.cli import main
from vzoo.lm import SeerAttentionConfig, apply_sparse_attention, block_recall, load_gates, save_gates
from vzoo.lm.seer import seer_attention
from vzoo.lm.train_gates import train_gates


def rope(x, pos, theta=10000.0):
    """Rotate-half RoPE of ``x [..., E]`` at integer position ``pos``, computed from scratch."""
    e = x.shape[-1]
    freq = pos / theta ** (torch.arange(0, e, 2, dtype=torch.float64) / e)
    cos, sin = torch.cat([freq.cos(), freq.cos()]), torch.cat([freq.sin(), freq.sin()])
    return x * cos + torch.cat([-x[..., e // 2 :], x[..., : e // 2]]) * sin


def loop_gate(q, k, pos, block, w_k, w_q=None):
    """Gate logits [B, H, NB, NB] by loops: avg-pooled q, max/min/avg-pooled k, per-head projections."""
    b, hq, s, _ = q.shape
    g = hq // k.shape[1]
    nb = -(-s // block)
    hidden = w_k.shape[-1]
    out = torch.full((b, hq, nb, nb), torch.finfo(torch.float32).min, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(nb):
                qi = q[bi, h, i * block : (i + 1) * block].double().mean(0)
                qi = qi @ w_q[h].double() if w_q is not None else qi
                qi = rope(qi, int(pos[bi, i * block]))
                for j in range(i + 1):
                    kj = k[bi, h // g, j * block : (j + 1) * block].double()
                    kcat = torch.cat([kj.amax(0), kj.amin(0), kj.mean(0)])
                    kh = kcat @ w_k[h // g if w_q is not None else h].double()
                    out[bi, h, i, j] = qi @ rope(kh, int(pos[bi, j * block])) / math.sqrt(hidden)
    return out


@pytest.mark.parametrize("force_double", [False, True])
def test_gate_matches_loops(lm, force_double):
    model = lm.make()
    apply_sparse_attention(model, SeerAttentionConfig(block_size=8, force_double=force_double))
    gate = model.model.layers[0].self_attn.attn_gate
    torch.manual_seed(3)
    q, k = torch.randn(2, 4, 37, 16), torch.randn(2, 2, 37, 16)
    pos = torch.arange(37).expand(2, 37) + torch.tensor([[0], [5]])
    with torch.no_grad():
        got = gate(q, k, pos)
    w_q = gate.mask_linear_q.weight if force_double else None
    want = loop_gate(q, k, pos, 8, gate.mask_linear_k.weight, w_q)
    assert (got.double() - want).abs().max() < 1e-4


def naive(q, k, v, allowed, scale):
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1).double() for x in (k, v))
    s = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("selection", [dict(topk=2), dict(threshold=0.1), dict(topk=1, last_block_dense=True)])
def test_inference_attends_exactly_the_selected_blocks(lm, selection):
    model = lm.make()
    config = SeerAttentionConfig(block_size=8, dense_fallback=False, **selection)
    apply_sparse_attention(model, config)
    module = model.model.layers[0].self_attn
    torch.manual_seed(4)
    q_pre, k_pre = torch.randn(1, 4, 43, 16), torch.randn(1, 2, 43, 16)
    query, key, value = torch.randn(1, 4, 43, 16), torch.randn(1, 2, 43, 16), torch.randn(1, 2, 43, 16)
    pos = torch.arange(43)[None]
    logits = loop_gate(q_pre, k_pre, pos, 8, module.attn_gate.mask_linear_k.weight)
    probs = torch.softmax(logits, -1)
    if "topk" in selection:
        best = probs.masked_fill(torch.eye(probs.shape[-1], dtype=torch.bool), 2.0).topk(selection["topk"], -1).indices
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, best, True)  # the diagonal counts in the topk
    else:
        keep = probs > selection["threshold"]
    if selection.get("last_block_dense"):
        keep[..., -2:, :] = True  # the official makes the last two query blocks dense
    keep |= torch.eye(keep.shape[-1], dtype=torch.bool)  # every query block keeps its own block
    allowed = torch.zeros(1, 4, 43, 43, dtype=torch.bool)
    for i in range(43):
        for j in range(i + 1):
            allowed[..., i, j] = keep[..., i // 8, j // 8]
    want = naive(query, key, value, allowed, 0.25)
    for mask in (None, torch.ones(1, 1, 43, 43, dtype=torch.bool)):  # kernel path and padded (dense) path
        module.attn_gate.pending = (q_pre, k_pre)
        with torch.no_grad():
            got = seer_attention(config, query, key, value, mask, 0.25, module, position_ids=pos)
        assert (got.double() - want).abs().max() < 1e-5


def test_left_padding_blocks_get_no_gate_probability(lm):
    """As the official gate mask: key blocks made only of (left) padding are out of the softmax, so the
    threshold applies to the probabilities over real blocks."""
    model = lm.make()
    apply_sparse_attention(model, SeerAttentionConfig(block_size=8))
    module = model.model.layers[0].self_attn
    torch.manual_seed(5)
    n, pad = 45, 19  # two whole padding blocks and 3 padded tokens in the third
    q_pre, k_pre = torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16)
    query, key, value = torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
    pos = (torch.arange(n) - pad).clamp_min(0)[None]
    logits = loop_gate(q_pre, k_pre, pos, 8, module.attn_gate.mask_linear_k.weight).detach()
    unmasked = torch.softmax(logits, -1)
    logits[..., :2] = torch.finfo(torch.float32).min
    probs = torch.softmax(logits, -1)
    # a threshold between the probabilities, with and without the padding blocks, of the real key block
    # (off the diagonal, seen by real queries) that dropping the padding raises most
    real = torch.zeros(6, 6, dtype=torch.bool)
    real[3:, 2:] = True
    gain = (probs / unmasked).masked_fill(~(real & torch.ones(6, 6, dtype=torch.bool).tril(-1)), 0)
    at = torch.unravel_index(gain.argmax(), gain.shape)
    threshold = float(unmasked[at] + probs[at]) / 2
    config = SeerAttentionConfig(block_size=8, threshold=threshold, dense_fallback=False)
    keep = (probs > threshold) | torch.eye(6, dtype=torch.bool)
    assert not torch.equal(keep, (unmasked > threshold) | torch.eye(6, dtype=torch.bool))
    valid = torch.arange(n) >= pad
    allowed = torch.zeros(1, 4, n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            allowed[..., i, j] = keep[..., i // 8, j // 8] & valid[j]
    want = naive(query, key, value, allowed, 0.25)
    mask = (torch.ones(n, n, dtype=torch.bool).tril() & valid)[None, None]
    module.attn_gate.pending = (q_pre, k_pre)
    with torch.no_grad():
        got = seer_attention(config, query, key, value, mask, 0.25, module, position_ids=pos)
    assert (got.double() - want)[:, :, pad:].abs().max() < 1e-5


def test_32k_layout_keeps_the_diagonal_when_the_threshold_keeps_nothing():
    """512 blocks of 64 tokens, near-uniform gate scores: with the default threshold 2e-3 the rows past
    ~500 blocks have no probability above it (the official rule selects nothing there); each query
    block must still attend to its own block."""
    from vzoo.kernels import BlockSparseLayout
    from vzoo.lm.seer import _selected_blocks

    n = 512
    logits = 1e-3 * torch.randn(1, 2, n, n, generator=torch.Generator().manual_seed(0))
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    official = torch.softmax(logits, -1) > 2e-3
    assert not official[..., -1, :].any()  # the case the fix is for
    chosen = _selected_blocks(SeerAttentionConfig(), logits)
    layout = BlockSparseLayout.from_block_mask(chosen, 64, 64, n * 64, n * 64)
    assert int(layout.kv_num_blocks.min()) >= 1
    rows = torch.arange(n)
    assert bool((layout.kv_indices == rows[:, None]).any(-1).all())  # every row lists its diagonal block
    assert torch.equal(chosen, (official | torch.eye(n, dtype=torch.bool)) & torch.ones(n, n, dtype=torch.bool).tril())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_every_block_kept_equals_eager_with_left_padding_and_generate(lm, kind):
    lm.assert_equals_eager(lm.make(kind), SeerAttentionConfig(block_size=8, threshold=0.0, dense_fallback=False))


def test_distillation_lowers_the_loss_and_raises_block_recall(lm):
    model = lm.make()
    with torch.no_grad():  # sharper attention than random init gives, so blocks matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    ids = torch.randint(0, 97, (4, 128), generator=torch.Generator().manual_seed(0))
    base = {n: p.clone() for n, p in model.named_parameters()}
    apply_sparse_attention(model, SeerAttentionConfig(block_size=16))
    before = block_recall(model, ids, topk=2)
    losses = train_gates(model, ids, steps=60, lr=1e-2, warmup=5, batch_size=4, progress=False)
    after = block_recall(model, ids, topk=2)
    assert losses[-1] < losses[0] / 5
    assert after > before + 0.03
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)  # only gates trained
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_distillation_target_ignores_padded_keys(lm):
    model = lm.make()
    apply_sparse_attention(model, SeerAttentionConfig(block_size=8))
    ids = torch.randint(0, 97, (2, 48))
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[1, :11] = 0
    model.train()
    model(ids, attention_mask=mask, logits_to_keep=1)
    gate = model.model.layers[1].self_attn.attn_gate
    logits, target = gate.last
    assert torch.isfinite(gate.loss) and gate.loss >= 0
    assert target[1, :, :, 0].abs().max() == 0  # key block 0 of the padded row is all padding ...
    assert target[0, :, :, 0].min() > 0  # ... and is attended to in the unpadded row
    torch.testing.assert_close(target[1, :, 2:].sum(-1), torch.ones_like(target[1, :, 2:].sum(-1)))


def test_gate_files_round_trip_and_removal(lm, tmp_path):
    model = lm.make()
    handle = apply_sparse_attention(model, SeerAttentionConfig(block_size=8))
    path = save_gates(model, tmp_path / "gates.safetensors")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.attn_gate.mask_linear_k.weight.zero_()
    load_gates(model, path)
    assert model.model.layers[0].self_attn.attn_gate.mask_linear_k.weight.abs().sum() > 0
    from safetensors.torch import load_file

    assert sorted(load_file(str(path))) == [f"model.layers.{i}.self_attn.attn_gate.mask_linear_k.weight" for i in range(3)]
    with pytest.raises(FileNotFoundError, match="no gate file"):
        load_gates(model, tmp_path / "missing.safetensors")
    for config, word in ((SeerAttentionConfig(block_size=8, k_pooling=("max",)), "shape"),
                         (SeerAttentionConfig(block_size=8, hidden=8), "no weights for")):
        other = lm.make()
        apply_sparse_attention(other, config)
        with pytest.raises(ValueError, match=word):
            load_gates(other, path)
    handle.remove()
    layer = model.model.layers[0].self_attn
    assert not hasattr(layer, "attn_gate") and not layer.q_proj._forward_hooks and not layer.k_proj._forward_hooks
    with pytest.raises(ValueError, match="no SeerAttention gates"):
        save_gates(model, tmp_path / "again.safetensors")
    for kwargs, field in ((dict(block_size=0), "block_size"), (dict(q_pooling=("sum",)), "q_pooling"),
                          (dict(hidden=7), "hidden"), (dict(threshold=1.5), "threshold"), (dict(topk=0), "topk")):
        with pytest.raises(ValueError, match=f"SeerAttentionConfig.{field}"):
            SeerAttentionConfig(**kwargs)


def test_lm_gates_command_trains_and_saves(lm, tmp_path, capsys):
    words = lm.checkpoint(tmp_path / "model")
    text = tmp_path / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[1 + int(i)] for i in torch.randint(0, 90, (300,), generator=g)))
    out = tmp_path / "gates.safetensors"
    assert main(["train", "lm-gates", "--model", str(tmp_path / "model"), "--data", str(text), "--out", str(out),
                 "--steps", "3", "--seq-len", "64", "--block-size", "16"]) == 0
    assert "gates saved to" in capsys.readouterr().out
    model = lm.make()
    apply_sparse_attention(model, SeerAttentionConfig(block_size=16))
    load_gates(model, out)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        main(["train", "lm-gates", "--model", str(tmp_path / "model"), "--data", str(text), "--seq-len", "4096", "--steps", "1"])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        main(["train", "lm-gates", "--model", str(tmp_path), "--data", str(text)])
