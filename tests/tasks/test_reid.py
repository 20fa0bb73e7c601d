"""Re-ID: Market-1501 reader, PK sampler, losses, the Market evaluation protocol against hand-computed
cases, learning on synthetic identities, resume and 2-process torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vzoo.cli import main
from vzoo.tasks.reid import PKSampler, ReIDImages, batch_hard_triplet_loss, evaluate_rank, read_market1501


@pytest.fixture(scope="module")
def market(tmp_path_factory, synthetic):
    return synthetic.make_market(tmp_path_factory.mktemp("market"))


def test_reader_follows_the_market_conventions(market):
    split = read_market1501(market)
    assert sorted({s.pid for s in split["train"]}) == list(range(10))  # relabelled
    assert all(s.pid > 0 for s in split["query"])
    assert any(s.pid == 0 for s in split["gallery"])  # distractors stay in the gallery
    assert not any(s.pid == -1 for part in split.values() for s in part)  # junk is skipped
    assert {s.camid for s in split["query"]} == {0, 1, 2}


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="bounding_box_train"):
        read_market1501(tmp_path)
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (tmp_path / sub).mkdir()
    with pytest.raises(ValueError, match="no Market-1501 images"):
        read_market1501(tmp_path)
    (tmp_path / "bounding_box_train" / "person.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="person.jpg"):
        read_market1501(tmp_path)
    (tmp_path / "bounding_box_train" / "person.jpg").unlink()
    bad = tmp_path / "bounding_box_train" / "0001_c1s1_000001_00.jpg"
    bad.write_bytes(b"not a jpeg")
    for sub in ("query", "bounding_box_test"):
        (tmp_path / sub / "0002_c1s1_000002_00.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="0001_c1s1_000001_00.jpg"):
        ReIDImages(read_market1501(tmp_path)["train"])[0]


def test_pk_sampler_batches():
    pids = [i // 3 for i in range(30)]  # 10 identities with 3 images
    sampler = PKSampler(pids, p=4, k=4, seed=1)
    order = list(sampler)
    assert len(order) == len(sampler) == 2 * 16
    for start in range(0, len(order), 16):
        batch = [pids[i] for i in order[start : start + 16]]
        assert len(set(batch)) == 4 and all(batch.count(p) == 4 for p in set(batch))
    sampler.set_epoch(1)
    again = PKSampler(pids, p=4, k=4, seed=1)
    again.set_epoch(1)
    assert list(sampler) == list(again) != order  # reproducible per epoch, reshuffled between epochs
    with pytest.raises(ValueError, match="p=11"):
        PKSampler(pids, p=11, k=2)


def test_batch_hard_triplet_loss_matches_loops():
    torch.manual_seed(0)
    feats, pids = torch.randn(8, 5), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    want = 0.0
    for i in range(8):
        pos = max((feats[i] - feats[j]).norm() for j in range(8) if pids[j] == pids[i])
        neg = min((feats[i] - feats[j]).norm() for j in range(8) if pids[j] != pids[i])
        want += max(0.0, (pos - neg + 0.3).item())
    assert batch_hard_triplet_loss(feats, pids).item() == pytest.approx(want / 8, rel=1e-5)


def test_evaluate_rank_hand_computed():
    # query 0 (pid 1, cam 0): gallery order by distance: g0 (pid 1, cam 0: same cam, removed), g1 (pid 2),
    # g2 (pid 1, cam 1), g3 (pid 1, cam 2) -> hits at ranks 2 and 3: AP = (1/2 + 2/3) / 2, CMC rank1 = 0.
    # query 1 (pid 2, cam 1): g1 first -> AP 1, rank1 1. query 2 (pid 9): no match -> skipped.
    dist = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.6, 0.7], [0.1, 0.2, 0.3, 0.4]])
    res = evaluate_rank(dist, [1, 2, 9], [1, 2, 1, 1], [0, 1, 0], [0, 0, 1, 2], max_rank=3)
    assert res["mAP"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1) / 2)
    assert res["rank1"] == pytest.approx(0.5) and res["rank5"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no query"):
        evaluate_rank(dist[:1], [1], [1, 3, 3, 3], [0], [0, 1, 1, 1])


ARGS = ["--model", "resnet18", "--batch-size", "32", "--image-size", "64", "32", "--lr", "1e-3"]


@pytest.mark.slow
def test_learns_identities_and_not_shuffled_ones(market, tmp_path, capsys, synthetic):
    """20 synthetic identities, 3 cameras: mAP >= 0.8 on unseen identities; labels shuffled: near chance."""
    main(["train", "reid", "--data", str(market), "--epochs", "300", "--eval-every", "300", "--out", str(tmp_path / "a"), *ARGS])
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["final"]["mAP"] >= 0.8, metrics["final"]
    assert (tmp_path / "a" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    shuffled = synthetic.make_market(tmp_path / "shuffled", shuffle_ids=True)
    main(["train", "reid", "--data", str(shuffled), "--epochs", "60", "--eval-every", "60", "--out", str(tmp_path / "b"), *ARGS])
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["final"]["mAP"] < 0.3
    # vzoo eval reproduces the final metrics from the checkpoint
    capsys.readouterr()
    main(["eval", "reid", "--checkpoint", str(tmp_path / "a" / "last.pt"), "--data", str(market)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mAP"] == pytest.approx(metrics["final"]["mAP"], abs=1e-6)


def test_resume_finishes_with_the_same_steps(market, tmp_path):
    common = ["train", "reid", "--data", str(market), "--epochs", "6", "--eval-every", "3", *ARGS, "--batch-size", "16"]
    main([*common, "--out", str(tmp_path / "full")])
    with pytest.raises(KeyboardInterrupt):
        main([*common, "--out", str(tmp_path / "cut"), "--stop-after", "5"])  # killed mid-epoch 2
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["step"] == 5
    main([*common, "--out", str(tmp_path / "cut"), "--resume"])
    full, cut = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("full", "cut"))
    assert cut["steps"] == full["steps"] == 12
    assert [h["step"] for h in cut["history"] if "mAP" in h] == [h["step"] for h in full["history"] if "mAP" in h]
    with pytest.raises(ValueError, match="not a readable vzoo checkpoint"):
        (tmp_path / "bad.pt").write_bytes(b"garbage")
        main(["eval", "reid", "--checkpoint", str(tmp_path / "bad.pt"), "--data", str(market)])


def test_torchrun_two_processes_on_cpu(market, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m", "vzoo.cli",
           "train", "reid", "--data", str(market), "--epochs", "2", "--out", str(tmp_path / "ddp"), *ARGS[:-2], "--batch-size", "16"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and set(metrics) == {"history", "final", "steps", "world_size"}
    assert {"mAP", "rank1", "rank5", "rank10"} <= set(metrics["final"])


def test_amp_training_runs_in_bfloat16_on_cpu(market, tmp_path):
    from vzoo.tasks.reid import reid_run
    from vzoo.tasks.trainer import TrainSettings, train

    run = reid_run("resnet18", market, 16, (64, 32))
    seen = []
    run.model.backbone.conv1.register_forward_hook(lambda m, i, o: seen.append((m.training, o.dtype)))
    train(run, TrainSettings(epochs=1, out=tmp_path, lr=1e-3, amp=True))
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}  # both training steps autocast
    assert {dtype for training, dtype in seen if not training} == {torch.float32}  # evaluation does not
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 2
