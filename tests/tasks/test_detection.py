"""Detection: COCO reader errors, timm + FPN backbones in Faster R-CNN and RetinaNet, learning on shapes."""

from __future__ import annotations

import json

import pytest
import torch

from vzoo.cli import main
from vzoo.tasks.detection import TimmFPNBackbone, build_detector, read_coco


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, synthetic):
    return synthetic.make_shapes(tmp_path_factory.mktemp("shapes"), images=60)


def test_reader_converts_boxes_and_labels(shapes):
    items, labels = read_coco(shapes / "train.json", shapes / "images")
    assert labels == {1: 1, 2: 2}
    raw = json.loads((shapes / "train.json").read_text())
    first = raw["annotations"][0]
    item = next(i for i in items if i.image_id == first["image_id"])
    x, y, w, h = first["bbox"]
    assert [x, y, x + w, y + h] in item.boxes.tolist()


def test_reader_errors_name_the_file(shapes, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_coco(tmp_path / "nope.json", shapes / "images")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        read_coco(tmp_path / "bad.json", shapes / "images")
    raw = json.loads((shapes / "train.json").read_text())
    raw["annotations"][0]["image_id"] = 10**6
    (tmp_path / "orphan.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="unknown image"):
        read_coco(tmp_path / "orphan.json", shapes / "images")
    with pytest.raises(FileNotFoundError, match="00001.jpg"):
        read_coco(shapes / "train.json", tmp_path)


@pytest.mark.parametrize("detector", ["fasterrcnn", "retinanet"])
def test_detectors_on_timm_and_zoo_backbones(detector):
    torch.manual_seed(0)
    for name in ("resnet18", "test_biformer", "test_overlock"):
        model = build_detector(name, num_classes=2, detector=detector, min_size=96, max_size=128).train()
        images = [torch.rand(3, 96, 120), torch.rand(3, 100, 96)]
        targets = [{"boxes": torch.tensor([[10.0, 10, 50, 60]]), "labels": torch.tensor([1])}, {"boxes": torch.tensor([[5.0, 20, 40, 90]]), "labels": torch.tensor([2])}]
        losses = model(images, targets)
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()
        model.eval()
        with torch.no_grad():
            out = model(images)
        assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    fpn = TimmFPNBackbone("resnet18", retinanet=detector == "retinanet")
    keys = list(fpn(torch.rand(1, 3, 128, 128)))
    assert keys == (["0", "1", "2", "p6", "p7"] if detector == "retinanet" else ["0", "1", "2", "pool"])


@pytest.mark.slow
def test_learns_shapes_and_eval_reproduces(shapes, tmp_path, capsys):
    args = ["--model", "resnet18", "--data", str(shapes), "--batch-size", "8", "--image-size", "128", "128", "--lr", "1e-3", "--rois-per-image", "128"]
    main(["train", "detect", "--epochs", "8", "--eval-every", "8", "--out", str(tmp_path), *args])
    final = json.loads((tmp_path / "metrics.json").read_text())["final"]
    assert final["mAP50"] >= 0.5, final
    capsys.readouterr()
    main(["eval", "detect", "--checkpoint", str(tmp_path / "last.pt"), "--data", str(shapes)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mAP50"] == pytest.approx(final["mAP50"], abs=1e-6)
