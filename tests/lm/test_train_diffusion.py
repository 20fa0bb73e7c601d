"""``vzoo train lm-diffusion``: the step loss of each objective equals a hand computation through eager attention
with the BD3 float mask, and the command converts a saved model with checkpoints and an exact resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vzoo.lm import BlockDiffusionConfig, apply_sparse_attention
from vzoo.lm.diffusion_objectives import complementary_masking, position_dependent_masking
from vzoo.lm.train_diffusion import diffusion_step_loss


def _bd3_float(t: int, block: int) -> torch.Tensor:
    def ok(q, k):
        bq, bk = (q % t) // block, (k % t) // block
        return (bq == bk) if q < t and k < t else (bk < bq) if q < t else (k >= t and bk <= bq)
    allowed = torch.tensor([[ok(q, k) for k in range(2 * t)] for q in range(2 * t)])
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


@pytest.mark.parametrize("objective", ["fast-dllm", "efficient-dlm"])
def test_step_loss_equals_a_hand_computation(lm, objective):
    model = lm.make(layers=2)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), apply_sparse_attention(model, BlockDiffusionConfig(block=4)):
        got = diffusion_step_loss(model, ids, 4, 96, objective, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    resp = torch.ones_like(ids, dtype=torch.bool)
    if objective == "fast-dllm":
        noisy, labels = complementary_masking(ids, resp, 4, 96, g)
        clean = ids.repeat(2, 1)
    else:
        noisy, labels = position_dependent_masking(ids, resp, 4, 96, g)
        clean = ids
    model.set_attn_implementation("eager")
    pos = torch.arange(16).repeat(2)[None].expand(noisy.shape[0], -1)
    with torch.no_grad():
        logits = model(torch.cat([noisy, clean], 1), position_ids=pos, attention_mask=_bd3_float(16, 4)).logits[:, :16]
    if objective == "fast-dllm":  # token shift: token i from row i - 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (labels != -100).any()


def test_train_command_converts_checkpoints_and_resumes_exactly(lm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vzoo.cli import main

    words = lm.checkpoint(tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    (tmp_path / "data.txt").write_text(" ".join(words[1 + int(i)] for i in torch.randint(0, 89, (600,), generator=g)))
    common = ["train", "lm-diffusion", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "data.txt"),
              "--block", "8", "--seq-len", "32", "--steps", "6", "--batch-size", "2", "--ckpt-every", "2"]
    assert main(common + ["--out", str(tmp_path / "whole")]) == 0
    with pytest.raises(KeyboardInterrupt):
        main(common + ["--out", str(tmp_path / "split"), "--stop-after", "3"])
    assert not (tmp_path / "split" / "model").exists()
    assert main(common + ["--out", str(tmp_path / "split"), "--resume"]) == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "model")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "split" / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "whole" / "model")
    assert a.config.vzoo_block_diffusion == {"block": 8, "objective": "fast-dllm", "mask_id": tok.mask_token_id,
                                             "token_shift": True}
    assert tok.mask_token == "<|mask|>" and tok.mask_token_id == len(words)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name)
    with pytest.raises(ValueError, match="multiple of --block"):
        main(common[:-8] + ["--seq-len", "30", "--steps", "6", "--out", str(tmp_path / "bad")])
