"""The lightweight re-ID attention block, its placement in timm CNNs, and vzoo reid-search."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from vzoo.cli import main
from vzoo.reid_attention import LiteAttention, insert_attention, parse_placement


def test_lite_attention_formula():
    torch.manual_seed(0)
    block = LiteAttention(32)
    x = torch.randn(2, 32, 5, 6)
    c1, c2 = block.channel[1], block.channel[3]
    gate_c = torch.sigmoid(F.conv2d(F.relu(F.conv2d(x.mean((2, 3), keepdim=True), c1.weight, c1.bias)), c2.weight, c2.bias))
    gate_s = torch.sigmoid(F.conv2d(torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True).values], 1), block.spatial.weight, block.spatial.bias, padding=1))
    torch.testing.assert_close(block(x), x * gate_c * gate_s)
    assert sum(p.numel() for p in block.parameters()) == 2 * 32 * 8 + 8 + 32 + 18 + 1


@pytest.mark.parametrize("kind", ["lite", "se", "cbam", "nonlocal"])
def test_insert_after_chosen_stages_of_a_timm_cnn(kind):
    model = timm.create_model("resnet18", num_classes=0)
    x = torch.randn(1, 3, 64, 64)
    before = model(x).shape
    insert_attention(model, kind, (3, 4))
    assert isinstance(model.layer3, torch.nn.Sequential) and isinstance(model.layer4, torch.nn.Sequential)
    assert len(model.layer3) == 2 and len(model.layer3[0]) == 2  # (the stage's two BasicBlocks, the attention block)
    assert not isinstance(model.layer2[-1], torch.nn.Sequential)  # other stages untouched
    assert model(x).shape == before


def test_placement_errors():
    assert parse_placement("lite:3,4") == ("lite", (3, 4)) and parse_placement("none") == ("none", ())
    for bad in ("fancy:3", "lite", "lite:x"):
        with pytest.raises(ValueError, match="placement"):
            parse_placement(bad)
    with pytest.raises(ValueError, match="out of range"):
        insert_attention(timm.create_model("resnet18"), "lite", (9,))


def test_reid_search_writes_table_json_and_png(tmp_path, capsys, synthetic):
    data = synthetic.make_market(tmp_path / "market", identities=12, per_id=6)
    main(["reid-search", "--model", "resnet18", "--data", str(data), "--epochs", "2", "--batch-size", "16", "--image-size", "64", "32",
          "--out", str(tmp_path / "out"), "--placements", "none", "lite:4"])
    rows = json.loads((tmp_path / "out" / "search.json").read_text())
    assert [r["placement"] for r in rows] == ["none", "lite:4"]
    lite = 2 * 512 * 32 + 32 + 512 + 2 * 9 + 1  # one LiteAttention on resnet18's 512-channel last stage
    assert (rows[1]["params_m"] - rows[0]["params_m"]) * 1e6 == pytest.approx(lite, abs=0.5)
    for row, folder in zip(rows, ("none", "lite_4")):  # each row reports its own run's final metrics
        final = json.loads((tmp_path / "out" / folder / "metrics.json").read_text())["final"]
        assert (row["mAP"], row["rank1"]) == (final["mAP"], final["rank1"])
    assert (tmp_path / "out" / "search.png").read_bytes()[:4] == b"\x89PNG"
    assert "lite:4" in capsys.readouterr().out
