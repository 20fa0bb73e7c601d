"""Synthetic data for the task tests, written as real files: a Market-1501 tree of coloured, textured
figures seen by cameras with their own light, background and framing; COCO-format shapes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _figure(pid: int, cam: int, rng: random.Random, size=(64, 32)) -> Image.Image:
    """A person-like figure: identity = (upper colour, lower colour, texture); the camera sets the
    background, a colour cast and brightness; each shot jitters position and scale."""
    g = random.Random(pid * 7919)
    upper = tuple(g.randrange(30, 226) for _ in range(3))
    lower = tuple(g.randrange(30, 226) for _ in range(3))
    stripes = g.choice([0, 3, 5])
    cams = [((90, 110, 90), (1.0, 0.9, 0.9), 1.0), ((120, 120, 140), (0.9, 1.0, 1.1), 0.8), ((70, 60, 60), (1.1, 1.0, 0.85), 1.15)]
    background, cast, light = cams[cam % len(cams)]
    h, w = size
    img = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(img)
    dx, dy, s = rng.randint(-3, 3), rng.randint(-3, 3), rng.uniform(0.85, 1.1)
    x0, x1 = w / 2 - 9 * s + dx, w / 2 + 9 * s + dx
    draw.ellipse([w / 2 - 5 * s + dx, 4 + dy, w / 2 + 5 * s + dx, 14 * s + dy], fill=(220, 190, 160))
    draw.rectangle([x0, 15 * s + dy, x1, 36 * s + dy], fill=upper)
    if stripes:
        for y in range(int(15 * s + dy), int(36 * s + dy), stripes * 2):
            draw.line([x0, y, x1, y], fill=tuple(255 - c for c in upper))
    draw.rectangle([x0 + 1, 36 * s + dy, x1 - 1, 58 * s + dy], fill=lower)
    arr = np.asarray(img).astype(np.float32) * np.array(cast) * light
    arr += np.random.default_rng(rng.randrange(1 << 30)).normal(0, 6, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def make_market(root: Path, identities: int = 20, cameras: int = 3, per_id: int = 10, seed: int = 0, shuffle_ids: bool = False) -> Path:
    """Market-1501 tree: the first half of the identities train, the second half are query (one per
    camera) and gallery, plus distractors (pid 0) and junk (pid -1). ``shuffle_ids`` relabels every
    image with a random identity, destroying the identity structure."""
    rng = random.Random(seed)
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shots = [(pid, i % cameras) for pid in range(1, identities + 1) for i in range(per_id)]
    labels = [pid for pid, _ in shots]
    if shuffle_ids:
        rng.shuffle(labels)
    seen = set()
    for n, ((pid, cam), label) in enumerate(zip(shots, labels)):
        img = _figure(pid, cam, rng)
        if pid <= identities // 2:
            folder = "bounding_box_train"
        elif (label, cam) not in seen:
            seen.add((label, cam))
            folder = "query"
        else:
            folder = "bounding_box_test"
        img.save(root / folder / f"{label:04d}_c{cam + 1}s1_{n:06d}_00.jpg")
    for n in range(4):
        _figure(1000 + n, n % cameras, rng).save(root / "bounding_box_test" / f"0000_c{n % cameras + 1}s1_{900000 + n:06d}_00.jpg")
    _figure(2000, 0, rng).save(root / "bounding_box_test" / f"-1_c1s1_{990000:06d}_00.jpg")
    return root


def make_shapes(root: Path, images: int = 60, size: int = 128, seed: int = 0) -> Path:
    """COCO-format detection data: rectangles (category 1) and ellipses (category 2) at known boxes, on
    noisy backgrounds; ``train.json`` / ``val.json`` and ``images/``."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    cats = [dict(id=1, name="box"), dict(id=2, name="disc")]
    splits = {"train": dict(images=[], annotations=[], categories=cats), "val": dict(images=[], annotations=[], categories=cats)}
    ann_id = 1
    for i in range(images):
        split = "val" if i % 5 == 0 else "train"
        arr = np.random.default_rng(seed * 1000 + i).normal(110, 20, (size, size, 3)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        draw = ImageDraw.Draw(img)
        boxes = []
        for _ in range(rng.randint(1, 3)):
            for _try in range(20):
                w, h = rng.randint(20, 48), rng.randint(20, 48)
                x, y = rng.randint(0, size - w - 1), rng.randint(0, size - h - 1)
                if all(x + w < bx or bx + bw < x or y + h < by or by + bh < y for bx, by, bw, bh, _ in boxes):
                    break
            else:
                continue
            cat = rng.choice([1, 2])
            colour = (230, 60, 40) if cat == 1 else (40, 80, 230)
            (draw.rectangle if cat == 1 else draw.ellipse)([x, y, x + w, y + h], fill=colour)
            boxes.append((x, y, w, h, cat))
        name = f"{i:05d}.jpg"
        img.save(root / "images" / name)
        splits[split]["images"].append(dict(id=i + 1, file_name=name, width=size, height=size))
        for x, y, w, h, cat in boxes:
            splits[split]["annotations"].append(dict(id=ann_id, image_id=i + 1, bbox=[x, y, w + 1, h + 1], category_id=cat, area=(w + 1) * (h + 1), iscrowd=0))
            ann_id += 1
    for split, content in splits.items():
        (root / f"{split}.json").write_text(json.dumps(content))
    return root


def make_grounding(root: Path, samples: int = 80, size: int = 64, seed: int = 0) -> Path:
    """Grounding data: every image holds a red square and a blue disc; the question asks for one of
    them and the mask marks that one, so the answer region depends on the question."""
    rng = random.Random(seed)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "val": []}
    for i in range(samples):
        arr = np.random.default_rng(seed * 1000 + i).normal(120, 15, (size, size, 3)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        draw = ImageDraw.Draw(img)
        s = size // 4
        spots = rng.sample([(x, y) for x in range(0, size - s, s // 2) for y in range(0, size - s, s // 2)], 2)
        (ax, ay), (bx, by) = spots
        if abs(ax - bx) < s and abs(ay - by) < s:
            bx = (ax + s + 2) % (size - s)
        draw.rectangle([ax, ay, ax + s, ay + s], fill=(220, 40, 40))
        draw.ellipse([bx, by, bx + s, by + s], fill=(40, 60, 220))
        ask_square = i % 2 == 0
        mask = Image.new("L", (size, size), 0)
        mdraw = ImageDraw.Draw(mask)
        if ask_square:
            mdraw.rectangle([ax, ay, ax + s, ay + s], fill=255)
        else:
            mdraw.ellipse([bx, by, bx + s, by + s], fill=255)
        img.save(root / "images" / f"{i:04d}.jpg")
        mask.save(root / "masks" / f"{i:04d}.png")
        question = "where is the red square" if ask_square else "where is the blue circle"
        splits["val" if i % 5 == 0 else "train"].append(dict(image=f"images/{i:04d}.jpg", question=question, mask=f"masks/{i:04d}.png"))
    for split, entries in splits.items():
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root
