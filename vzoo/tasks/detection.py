"""Object detection with any timm backbone: a ``features_only`` model under torchvision's
FeaturePyramidNetwork, in torchvision's Faster R-CNN or RetinaNet; COCO-format data; COCO mAP with
pycocotools.

torchvision's ``BackboneWithFPN`` cannot tap a timm feature model (its ``IntermediateLayerGetter`` only
sees top-level children), hence :class:`TimmFPNBackbone`. Inputs are padded to ``size_divisible``
(32 by default; vzoo's BiFormer and OverLoCK pad or resize internally and take any size).
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["CocoDetection", "read_coco", "TimmFPNBackbone", "build_detector", "coco_map", "detection_run"]


@dataclass(frozen=True)
class CocoImage:
    path: Path
    image_id: int
    boxes: torch.Tensor  # [N, 4] xyxy
    labels: torch.Tensor  # [N] in 1..K


def read_coco(annotations: str | Path, image_dir: str | Path) -> tuple[list[CocoImage], dict[int, int]]:
    """Images with their boxes (COCO ``[x, y, w, h]`` -> ``xyxy``), and ``{category_id: label}`` with labels
    ``1..K`` (0 is the background). Crowd annotations are skipped; as in torchvision's reference scripts,
    boxes are clipped to the image and those left with zero width or height are dropped (a warning
    gives the count). Errors name the file."""
    annotations, image_dir = Path(annotations), Path(image_dir)
    if not annotations.is_file():
        raise FileNotFoundError(f"COCO annotation file {annotations} does not exist")
    try:
        data = json.loads(annotations.read_text())
        images, anns, cats = data["images"], data.get("annotations", []), data["categories"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{annotations}: not COCO-format JSON ({err})") from err
    labels = {c["id"]: i + 1 for i, c in enumerate(sorted(cats, key=lambda c: c["id"]))}
    by_image: dict[int, list[dict]] = {img["id"]: [] for img in images}
    for ann in anns:
        if ann["image_id"] not in by_image:
            raise ValueError(f"{annotations}: annotation {ann.get('id')} refers to unknown image {ann['image_id']}")
        if ann["category_id"] not in labels:
            raise ValueError(f"{annotations}: annotation {ann.get('id')} has unknown category {ann['category_id']}")
        if not ann.get("iscrowd", 0):
            by_image[ann["image_id"]].append(ann)
    out, dropped = [], 0
    for img in images:
        path = image_dir / img["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{annotations}: image {path} is missing")
        boxes = torch.tensor([a["bbox"] for a in by_image[img["id"]]], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        if "width" in img and "height" in img:
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, img["width"])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, img["height"])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # as torchvision's reference scripts
        dropped += int((~keep).sum())
        cls = torch.tensor([labels[a["category_id"]] for a in by_image[img["id"]]], dtype=torch.int64)
        out.append(CocoImage(path, img["id"], boxes[keep], cls[keep]))
    if not out:
        raise ValueError(f"{annotations}: no images")
    if dropped:
        warnings.warn(f"{annotations}: dropped {dropped} boxes of zero width or height (inside the image)", stacklevel=2)
    return out, labels


class CocoDetection(torch.utils.data.Dataset):
    """``(image [3, H, W] in 0..1, {"boxes", "labels", "image_id"})``; training adds horizontal flips."""

    def __init__(self, items: list[CocoImage], train: bool = False) -> None:
        self.items, self.train = items, train

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.functional import pil_to_tensor

        item = self.items[i]
        try:
            with Image.open(item.path) as img:
                image = pil_to_tensor(img.convert("RGB")).float() / 255
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{item.path}: cannot read the image ({err})") from err
        boxes = item.boxes.clone()
        if self.train and torch.rand(()) < 0.5:
            image = image.flip(-1)
            boxes[:, [0, 2]] = image.shape[-1] - boxes[:, [2, 0]]
        return image, {"boxes": boxes, "labels": item.labels, "image_id": item.image_id}


class TimmFPNBackbone(nn.Module):
    """timm ``features_only`` model + FPN (256 channels) returning ``OrderedDict("0", "1", ..., "pool"|"p6", "p7")``."""

    def __init__(self, name: str, out_indices: tuple[int, ...] = (1, 2, 3), pretrained: bool = False, retinanet: bool = False) -> None:
        super().__init__()
        import timm
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

        self.body = timm.create_model(name, features_only=True, out_indices=out_indices, pretrained=pretrained)
        channels = self.body.feature_info.channels()
        self.out_channels = 256
        extra = LastLevelP6P7(256, 256) if retinanet else LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork(channels, 256, extra_blocks=extra)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def build_detector(
    name: str, num_classes: int, detector: str = "fasterrcnn", pretrained: bool = False, min_size: int = 800, max_size: int = 1333,
    size_divisible: int = 32, rois_per_image: int = 512,
) -> nn.Module:
    """Faster R-CNN or RetinaNet (torchvision) on a timm backbone; ``num_classes`` excludes the background;
    ``rois_per_image``: RoIs sampled per image for the Faster R-CNN box head (torchvision: 512)."""
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    if detector not in ("fasterrcnn", "retinanet"):
        raise ValueError(f"detector={detector!r} must be 'fasterrcnn' or 'retinanet'")
    backbone = TimmFPNBackbone(name, pretrained=pretrained, retinanet=detector == "retinanet")
    levels = len(backbone.body.feature_info.channels()) + (2 if detector == "retinanet" else 1)
    sizes = tuple((16 * 2**i,) for i in range(levels))
    kw = dict(min_size=min_size, max_size=max_size)
    if detector == "retinanet":
        sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for (s,) in sizes)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
        model = RetinaNet(backbone, num_classes + 1, anchor_generator=anchors, **kw)
    else:
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
        names = [str(i) for i in range(levels - 1)]
        model = FasterRCNN(backbone, num_classes + 1, rpn_anchor_generator=anchors, box_batch_size_per_image=rois_per_image,
                           box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2), **kw)
    model.transform.size_divisible = size_divisible
    return model


@torch.no_grad()
def coco_map(model: nn.Module, items: list[CocoImage], annotations: Path, labels: dict[int, int], device: torch.device, batch: int = 8) -> dict[str, float]:
    """COCO box mAP (``mAP`` at IoU .50:.95, ``mAP50``) of ``model`` on ``items`` with pycocotools."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    model.eval()
    to_cat = {v: k for k, v in labels.items()}
    data = CocoDetection(items)
    results = []
    for start in range(0, len(data), batch):
        chunk = [data[i] for i in range(start, min(start + batch, len(data)))]
        outputs = model([img.to(device) for img, _ in chunk])
        for (_, target), out in zip(chunk, outputs):
            for box, score, label in zip(out["boxes"].cpu(), out["scores"].cpu(), out["labels"].cpu()):
                x0, y0, x1, y1 = box.tolist()
                results.append(dict(image_id=target["image_id"], category_id=to_cat[int(label)], bbox=[x0, y0, x1 - x0, y1 - y0], score=float(score)))
    if not results:
        return {"mAP": 0.0, "mAP50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.params.imgIds = [it.image_id for it in items]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"mAP": float(evaluator.stats[0]), "mAP50": float(evaluator.stats[1])}


def detection_run(model_name: str, data: str | Path, batch_size: int, image_size: list[int] | None = None, pretrained: bool = False,
                  seed: int = 0, detector: str = "fasterrcnn", rois_per_image: int = 512):
    """The detection :class:`~vzoo.tasks.trainer.TaskRun` on ``DIR/train.json``, ``DIR/val.json`` and
    ``DIR/images/``; ``image_size`` (one or two ints) sets the detector's min/max resize."""
    from .trainer import TaskRun, check_batch_size, split_batches

    check_batch_size(batch_size)
    if image_size is not None and len(image_size) not in (1, 2):
        raise ValueError(f"image_size={list(image_size)} must be one or two sizes (min side, max side)")
    root = Path(data)
    train_items, labels = read_coco(root / "train.json", root / "images")
    val_items, val_labels = read_coco(root / "val.json", root / "images")
    if val_labels != labels:
        raise ValueError(f"{root}: train.json and val.json have different categories")
    lo, hi = (image_size or [800, 1333]) * (2 if image_size and len(image_size) == 1 else 1)
    model = build_detector(model_name, len(labels), detector, pretrained, min_size=lo, max_size=hi, rois_per_image=rois_per_image)
    images = CocoDetection(train_items, train=True)

    def load(indices: list[int]):
        return [images[i] for i in indices]

    def loss(net: nn.Module, batch, device: torch.device) -> torch.Tensor:
        imgs = [img.to(device) for img, _ in batch]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for _, t in batch]
        return sum(net(imgs, targets).values())

    meta = dict(task="detect", model=model_name, size=image_size, detector=detector, rois_per_image=rois_per_image,
                categories=sorted(labels), batch_size=batch_size)
    return TaskRun(
        model, lambda epoch: split_batches(list(range(len(images))), batch_size, seed, epoch), load, loss,
        lambda net, device: coco_map(net, val_items, root / "val.json", labels, device), meta,
    )
