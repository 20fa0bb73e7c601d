"""Person re-identification: Market-1501 data, PK sampling, BNNeck model, losses and the Market protocol.

Conventions of the BoT / strong baseline (Luo et al., arXiv 1903.07071; JDAI-CV/fast-reid
``Base-bagtricks.yml``): triplet loss on the pre-BN feature, label-smoothed cross-entropy on logits of
the post-BN feature, retrieval with the post-BN feature. Evaluation as torchreid's ``eval_market1501``:
per query, gallery items with the same identity *and* camera are removed, queries without a valid
match are skipped.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

__all__ = [
    "ReIDSample", "read_market1501", "ReIDImages", "PKSampler", "ReIDModel", "batch_hard_triplet_loss",
    "evaluate_rank",
]

_NAME = re.compile(r"^([-\d]+)_c(\d+)")


@dataclass(frozen=True)
class ReIDSample:
    path: Path
    pid: int
    camid: int  # 0-based


def _read_split(folder: Path, relabel: bool, keep_distractors: bool) -> list[ReIDSample]:
    if not folder.is_dir():
        raise FileNotFoundError(f"Market-1501 folder {folder} is missing")
    samples = []
    for path in sorted(folder.glob("*.jpg")):
        match = _NAME.match(path.name)
        if match is None:
            raise ValueError(f"{path}: file name does not follow the Market-1501 pattern PPPP_cC...jpg")
        pid, cam = int(match.group(1)), int(match.group(2))
        if pid == -1 or (pid == 0 and not keep_distractors):
            continue  # junk; distractors only belong in the gallery
        samples.append(ReIDSample(path, pid, cam - 1))
    if not samples:
        raise ValueError(f"{folder} holds no Market-1501 images")
    if relabel:
        ids = {pid: i for i, pid in enumerate(sorted({s.pid for s in samples}))}
        samples = [ReIDSample(s.path, ids[s.pid], s.camid) for s in samples]
    return samples


def read_market1501(root: str | Path) -> dict[str, list[ReIDSample]]:
    """``{"train", "query", "gallery"}`` from ``bounding_box_train/``, ``query/``, ``bounding_box_test/``.
    Junk (pid -1) is skipped everywhere, distractors (pid 0) are kept in the gallery, train ids are
    relabelled to ``0..N-1``."""
    root = Path(root)
    return {
        "train": _read_split(root / "bounding_box_train", relabel=True, keep_distractors=False),
        "query": _read_split(root / "query", relabel=False, keep_distractors=False),
        "gallery": _read_split(root / "bounding_box_test", relabel=False, keep_distractors=True),
    }


class ReIDImages(Dataset):
    """``(image [3, H, W] float, pid, camid)``; images resized to ``size`` (default 256 x 128)."""

    def __init__(self, samples: list[ReIDSample], size: tuple[int, int] = (256, 128), train: bool = False) -> None:
        from torchvision.transforms import v2

        self.samples = samples
        steps = [v2.ToImage(), v2.Resize(size, antialias=True)]
        if train:
            steps += [v2.RandomHorizontalFlip(), v2.Pad(10), v2.RandomCrop(size)]
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        from PIL import Image, UnidentifiedImageError

        s = self.samples[i]
        try:
            with Image.open(s.path) as img:
                image = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{s.path}: cannot read the image ({err})") from err
        return self.transform(image), s.pid, s.camid


class PKSampler(Sampler[int]):
    """Batches of ``p`` identities x ``k`` images each (images repeat when an identity has fewer than
    ``k``); one epoch visits every identity once. Deterministic per epoch (``set_epoch``)."""

    def __init__(self, pids: list[int], p: int, k: int, seed: int = 0) -> None:
        if p < 2 or k < 2:
            raise ValueError(f"PKSampler: p={p} and k={k} must both be at least 2 (the triplet loss needs positives and negatives)")
        self.by_pid: dict[int, list[int]] = defaultdict(list)
        for i, pid in enumerate(pids):
            self.by_pid[pid].append(i)
        if len(self.by_pid) < p:
            raise ValueError(f"PKSampler: p={p} identities x k={k} images per batch, "
                             f"but the data holds only {len(self.by_pid)} training identities")
        self.p, self.k, self.seed, self.epoch = p, k, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed + self.epoch)
        pids = list(self.by_pid)
        rng.shuffle(pids)
        for start in range(0, len(pids) - self.p + 1, self.p):
            for pid in pids[start : start + self.p]:
                items = self.by_pid[pid]
                yield from (rng.sample(items, self.k) if len(items) >= self.k else rng.choices(items, k=self.k))

    def __len__(self) -> int:
        return len(self.by_pid) // self.p * self.p * self.k


def _last_stride_one(model: nn.Module) -> None:
    """BoT's "last stride 1" for ResNet-style timm models (``layer4``): the last stage keeps the /16 map.
    Other architectures are left as they are."""
    stage = getattr(model, "layer4", None)
    if not isinstance(stage, nn.Sequential) or not len(stage):
        return
    for m in stage[0].modules():
        if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
            m.stride = (1, 1)
        elif isinstance(m, nn.AvgPool2d) and m.stride == 2:  # ResNet-D style downsampling
            m.stride, m.kernel_size = 1, 1


class ReIDModel(nn.Module):
    """timm backbone (pooled features; last stride 1 on ResNets) + BNNeck + bias-free classifier; ``placement`` ("none", or e.g.
    "lite:3,4", see :func:`vzoo.reid_attention.insert_attention`) adds attention blocks after stages.

    ``forward`` returns ``(logits, pre-BN feature)`` in training and the post-BN feature in eval mode."""

    def __init__(self, backbone: str, num_classes: int, pretrained: bool = False, placement: str = "none", **backbone_kwargs) -> None:
        super().__init__()
        import timm

        from vzoo.reid_attention import insert_attention, parse_placement

        self.backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=0, **backbone_kwargs)
        _last_stride_one(self.backbone)
        insert_attention(self.backbone, *parse_placement(placement))
        dim = self.backbone.num_features if getattr(self.backbone, "head_hidden_size", None) is None else self.backbone.head_hidden_size
        self.bnneck = nn.BatchNorm1d(dim)
        self.bnneck.bias.requires_grad_(False)  # BoT: the neck's shift is frozen at 0
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        feat = self.backbone(x)
        post = self.bnneck(feat)
        return (self.classifier(post), feat) if self.training else post


def batch_hard_triplet_loss(features: torch.Tensor, pids: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al., arXiv 1703.07737) with Euclidean distances: for each
    anchor the farthest positive and the closest negative, ``mean(relu(d_ap - d_an + margin))``."""
    dist = torch.cdist(features, features).clamp_min(1e-12)
    same = pids[:, None] == pids[None, :]
    hardest_pos = dist.masked_fill(~same, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(1)
    return F.relu(hardest_pos - hardest_neg + margin).mean()


def evaluate_rank(
    distances: torch.Tensor, q_pids, g_pids, q_cams, g_cams, max_rank: int = 10
) -> dict[str, float]:
    """Market-1501 protocol: ``{"mAP", "rank1", "rank5", "rank10"}`` from a ``[Q, G]`` distance matrix.

    Per query, gallery items with the same pid and the same camera are dropped; queries left without a
    correct match are skipped (a ``ValueError`` if none remains)."""
    q_pids, g_pids, q_cams, g_cams = (torch.as_tensor(x) for x in (q_pids, g_pids, q_cams, g_cams))
    order = torch.sort(distances, dim=1, stable=True).indices
    cmc_sum = torch.zeros(max_rank, dtype=torch.float64)
    aps, valid = [], 0
    for i in range(distances.shape[0]):
        ranked = order[i]
        keep = ~((g_pids[ranked] == q_pids[i]) & (g_cams[ranked] == q_cams[i]))
        hits = (g_pids[ranked][keep] == q_pids[i]).double()
        if not hits.any():
            continue
        valid += 1
        cmc = hits.cumsum(0).clamp_max(1)
        cmc_sum += torch.nn.functional.pad(cmc[:max_rank], (0, max(0, max_rank - len(cmc))), value=1.0)
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
        aps.append((precision * hits).sum().item() / hits.sum().item())
    if not valid:
        raise ValueError("evaluate_rank: no query has a correct match in the gallery (other than same-camera items)")
    cmc = cmc_sum / valid
    return {"mAP": sum(aps) / valid, "rank1": cmc[0].item(), "rank5": cmc[min(4, max_rank - 1)].item(), "rank10": cmc[min(9, max_rank - 1)].item()}


@torch.no_grad()
def extract(model: nn.Module, samples: list[ReIDSample], size: tuple[int, int], device: torch.device, batch: int = 64) -> torch.Tensor:
    """Post-BN retrieval features ``[N, C]`` (eval mode)."""
    model.eval()
    data = ReIDImages(samples, size)
    feats = [model(torch.stack([data[j][0] for j in range(i, min(i + batch, len(data)))]).to(device)).float().cpu() for i in range(0, len(data), batch)]
    return torch.cat(feats)


def evaluate_model(model: nn.Module, split: dict[str, list[ReIDSample]], size: tuple[int, int], device: torch.device) -> dict[str, float]:
    """Market-1501 mAP / CMC of ``model`` with squared Euclidean distances on the post-BN features."""
    q, g = extract(model, split["query"], size, device), extract(model, split["gallery"], size, device)
    dist = torch.cdist(q, g).square()
    return evaluate_rank(dist, [s.pid for s in split["query"]], [s.pid for s in split["gallery"]],
                         [s.camid for s in split["query"]], [s.camid for s in split["gallery"]])


def reid_run(model_name: str, data: str | Path, batch_size: int, size: tuple[int, int] = (256, 128), pretrained: bool = False,
             seed: int = 0, instances: int = 4, placement: str = "none"):
    """The re-ID :class:`~vzoo.tasks.trainer.TaskRun`: PK batches (``batch_size / instances`` identities),
    CE with label smoothing 0.1 on post-BN logits + batch-hard triplet (margin 0.3) on pre-BN features."""
    from .trainer import TaskRun, check_batch_size

    check_batch_size(batch_size)
    if batch_size < 2 * instances:
        raise ValueError(f"batch_size={batch_size} is smaller than one P x K group: re-ID batches hold at least "
                         f"2 identities x {instances} images = {2 * instances}")
    split = read_market1501(data)
    pids = [s.pid for s in split["train"]]
    num_classes = max(pids) + 1
    sampler = PKSampler(pids, batch_size // instances, instances, seed)  # refuses more identities per batch than the data has
    model = ReIDModel(model_name, num_classes, pretrained=pretrained, placement=placement)
    images = ReIDImages(split["train"], size, train=True)

    def batches(epoch: int) -> list[list[int]]:
        sampler.set_epoch(epoch)
        order, size = list(sampler), sampler.p * sampler.k  # whole P x K groups, even when batch_size is not a multiple of K
        return [order[i : i + size] for i in range(0, len(order), size)]

    def load(indices: list[int]):
        items = [images[i] for i in indices]
        return torch.stack([x for x, _, _ in items]), torch.tensor([p for _, p, _ in items])

    def loss(net: nn.Module, batch, device: torch.device) -> torch.Tensor:
        x, y = (t.to(device) for t in batch)
        logits, feat = net(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=0.1) + batch_hard_triplet_loss(feat.float(), y)

    identities = sorted({int(_NAME.match(s.path.name).group(1)) for s in split["train"]})  # before relabelling
    meta = dict(task="reid", model=model_name, num_classes=num_classes, size=list(size), placement=placement,
                identities=identities, batch_size=batch_size)
    return TaskRun(model, batches, load, loss, lambda net, device: evaluate_model(net, split, size, device), meta)
