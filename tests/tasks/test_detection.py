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
        stem = next(p for p in model.backbone.body.parameters() if p.dim() == 4)  # the backbone's first conv
        assert stem.grad is not None and stem.grad.abs().sum() > 0  # the losses reach the timm backbone
        model.eval()
        with torch.no_grad():
            out = model(images)
        assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    fpn = TimmFPNBackbone("resnet18", retinanet=detector == "retinanet")
    maps = fpn(torch.rand(1, 3, 128, 96))
    strides = fpn.body.feature_info.reduction()
    assert strides == [4, 8, 16]  # resnet18's layer1..layer3
    sizes = [(32, 24), (16, 12), (8, 6)] + ([(4, 3), (2, 2)] if detector == "retinanet" else [(4, 3)])  # then P6/P7 or max-pool
    assert list(maps) == (["0", "1", "2", "p6", "p7"] if detector == "retinanet" else ["0", "1", "2", "pool"])
    assert [tuple(m.shape[1:]) for m in maps.values()] == [(256, *hw) for hw in sizes]


@pytest.mark.slow
def test_learns_shapes_and_eval_reproduces(shapes, tmp_path, capsys):
    args = ["--model", "resnet18", "--data", str(shapes), "--batch-size", "8", "--image-size", "128", "128", "--lr", "1e-3", "--rois-per-image", "128"]
    main(["train", "detect", "--epochs", "8", "--eval-every", "8", "--out", str(tmp_path), *args])
    final = json.loads((tmp_path / "metrics.json").read_text())["final"]
    assert final["mAP50"] >= 0.5, final
    capsys.readouterr()
    main(["eval", "detect", "--checkpoint", str(tmp_path / "last.pt"), "--data", str(shapes)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mAP50"] == pytest.approx(final["mAP50"], abs=1e-6)


class _Fixed(torch.nn.Module):
    """A "detector" that answers each successive image with the given (boxes xyxy, scores, labels)."""

    def __init__(self, answers):
        super().__init__()
        self.answers = iter(answers)

    def forward(self, images):
        return [dict(zip(("boxes", "scores", "labels"), map(torch.tensor, next(self.answers)))) for _ in images]


def test_coco_map_perfect_and_hand_computed(tmp_path):
    """pycocotools through coco_map: box conversion, category ids 5 and 9 mapped to labels 1 and 2 and back."""
    from PIL import Image

    from vzoo.tasks.detection import coco_map

    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64)).save(tmp_path / "images" / name)
    gt = [(1, [10, 10, 20, 20], 5), (1, [30, 30, 15, 25], 9), (2, [0, 0, 30, 30], 5)]
    coco = dict(images=[dict(id=1, file_name="a.png", width=64, height=64), dict(id=2, file_name="b.png", width=64, height=64)],
                categories=[dict(id=9, name="nine"), dict(id=5, name="five")],
                annotations=[dict(id=i + 1, image_id=im, bbox=b, category_id=c, area=b[2] * b[3], iscrowd=0) for i, (im, b, c) in enumerate(gt)])
    (tmp_path / "val.json").write_text(json.dumps(coco))
    items, labels = read_coco(tmp_path / "val.json", tmp_path / "images")
    assert labels == {5: 1, 9: 2}
    a, b, c = ([x, y, x + w, y + h] for _, (x, y, w, h), _ in gt)

    def score(answers):
        return coco_map(_Fixed(answers), items, tmp_path / "val.json", labels, torch.device("cpu"))

    assert score([([a, b], [0.9, 0.8], [1, 2]), ([c], [0.7], [1])]) == {"mAP": 1.0, "mAP50": 1.0}
    # category 5: one of its two boxes found (AP = 51/101 on COCO's 101 recall points); category 9: AP 1
    missed = score([([a, b], [0.9, 0.8], [1, 2]), ([[40, 40, 60, 60]], [0.1], [2])])
    assert missed["mAP"] == pytest.approx((51 / 101 + 1) / 2) and missed["mAP50"] == pytest.approx((51 / 101 + 1) / 2)
    # category 5: a false positive ranked above both hits: precision 2/3 at every recall level
    ranked = score([([[40, 0, 60, 20], a, b], [0.95, 0.9, 0.8], [1, 1, 2]), ([c], [0.8], [1])])
    assert ranked["mAP"] == pytest.approx((2 / 3 + 1) / 2)
