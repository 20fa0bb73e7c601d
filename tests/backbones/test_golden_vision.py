"""BiFormer and OverLoCK against golden outputs of the official code (``tests/golden/make_vision.py``:
rayleizhu/BiFormer and LMMMEng/OverLoCK, commits recorded in the fixtures; OverLoCK's two NATTEN
``na2d_av`` calls replaced there by an explicit loop with NATTEN's border rule). Official state dicts load
through vzoo's checkpoint path (``pretrained=True`` with a file, or ``checkpoint_filter_fn``); fp32, atol 1e-4."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import LayerNorm2d

import vzoo  # noqa: F401
from vzoo.backbones import biformer as vz_biformer
from vzoo.backbones import overlock as vz_overlock
from vzoo.biformer import AttentionLePE, BiLevelRoutingAttention
from vzoo.overlock import ContMix, DynamicConvBlock

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def biformer():
    return torch.load(GOLDEN / "biformer.pt", weights_only=True)


@pytest.fixture(scope="module")
def overlock():
    return torch.load(GOLDEN / "overlock.pt", weights_only=True)


def _file(tmp_path: Path, name: str, obj, num_classes: int = 1000) -> dict:
    """``create_model`` arguments that load ``obj`` (saved to a file) as the pretrained checkpoint."""
    path = tmp_path / name
    torch.save(obj, path)
    return dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=num_classes))


def _mmdet(backbone: dict[str, torch.Tensor]) -> dict:
    """An mmdet/mmseg checkpoint as the official dense recipes save it: the backbone under ``backbone.``
    next to neck and head weights."""
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(4, 8, 1, 1)
    return dict(meta=dict(epoch=12), state_dict=state)


def test_fixtures_record_their_source(biformer, overlock):
    assert biformer["repo"] == "https://github.com/rayleizhu/BiFormer" and len(biformer["commit"]) == 40
    assert overlock["repo"] == "https://github.com/LMMMEng/OverLoCK" and len(overlock["commit"]) == 40


def test_generator_refuses_without_checkouts(tmp_path):
    spec = importlib.util.spec_from_file_location("make_vision", GOLDEN / "make_vision.py")
    make_vision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_vision)
    args = ["--biformer", str(tmp_path), "--overlock", str(tmp_path)]
    with pytest.raises(SystemExit, match="is not a checkout of https://github.com/rayleizhu/BiFormer"):
        make_vision.main(args)
    for name in ("ops/bra_legacy.py", "models/overlock.py"):  # the right files, but no git history to record
        (tmp_path / name).parent.mkdir()
        (tmp_path / name).touch()
    with pytest.raises(SystemExit, match="is not a git checkout"):
        make_vision.main(args)


# -- BiFormer ------------------------------------------------------------------------------------------


def test_biformer_bra_module(biformer):
    case = biformer["bra"]
    cfg = case["config"]
    bra = BiLevelRoutingAttention(cfg["dim"], cfg["num_heads"], cfg["n_win"], cfg["topk"], cfg["side_dwconv"]).eval()
    names = {"qkv.qkv.": "qkv.", "wo.": "proj."}
    state = {next((new + k[len(old) :] for old, new in names.items() if k.startswith(old)), k): v for k, v in case["state_dict"].items()}
    bra.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(bra(case["input"]), case["output"], **TOL)
        torch.testing.assert_close(bra(case["input_pad"]), case["output_pad"], **TOL)  # official auto_pad


def test_biformer_stage4_attention(biformer):
    case = biformer["attn_lepe"]
    attn = AttentionLePE(**case["config"]).eval()
    attn.load_state_dict(case["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(attn(case["input"]), case["output"], **TOL)


def _tiny_biformer(cfg: dict, **kwargs):
    assert cfg["head_dim"] == 8 and cfg["topks"][-1] == -2
    heads = [d // cfg["head_dim"] for d in cfg["qk_dims"][:3]] + [8]  # stage 4: AttentionLePE's 8 heads
    return timm.create_model(
        "test_biformer", depths=cfg["depth"], dims=cfg["embed_dim"], num_heads=heads, mlp_ratio=cfg["mlp_ratios"][0],
        topks=[*cfg["topks"][:3], None], **kwargs,
    ).eval()


def test_biformer_model_from_official_checkpoint(biformer, tmp_path):
    case = biformer["model"]
    cfg = case["config"]
    load = _file(tmp_path, "b.pth", {"model": case["state_dict"]}, cfg["num_classes"])
    model = _tiny_biformer(cfg, n_win=cfg["n_win"], num_classes=cfg["num_classes"], **load)
    with torch.no_grad():
        torch.testing.assert_close(model(case["input"]), case["logits"], **TOL)
        torch.testing.assert_close(model.forward_features(case["input"]), case["features"], **TOL)


def _dense_biformer_checkpoint(biformer, task: str) -> dict:
    backbone = {k: v for k, v in biformer["model"]["state_dict"].items() if not k.startswith(("head.", "norm."))}
    return _mmdet({**backbone, **{f"extra_norms.{k}": v for k, v in biformer[task]["extra_state_dict"].items()}})


@pytest.mark.parametrize("task", ["det", "seg"])
def test_biformer_dense_backbone(biformer, task, tmp_path):
    """The official detection (n_win 16) / segmentation (n_win 8) backbones: auto-padding at every routing
    stage, an extra LayerNorm2d per output; here on a 40 x 72 input (stage maps 10 x 18, 5 x 9, 3 x 5)."""
    case = biformer[task]
    ckpt = _dense_biformer_checkpoint(biformer, task)
    feats = _tiny_biformer(biformer["model"]["config"], features_only=True, dense=task, **_file(tmp_path, "d.pth", ckpt))
    assert {m.n_win for m in feats.modules() if isinstance(m, BiLevelRoutingAttention)} == {case["config"]["n_win"]}
    with torch.no_grad():
        got = feats(case["input"])
    assert len(got) == 4
    for a, b in zip(got, case["features"]):
        torch.testing.assert_close(a, b, **TOL)
    # the bare dense model loads the same checkpoint strictly through checkpoint_filter_fn
    model = _tiny_biformer(biformer["model"]["config"], dense=task)
    model.load_state_dict(vz_biformer.checkpoint_filter_fn(ckpt, model))
    with torch.no_grad():
        for a, b in zip(model.forward_intermediates(case["input"], intermediates_only=True), case["features"]):
            torch.testing.assert_close(a, b, **TOL)


def test_biformer_features_only_is_the_detection_backbone(biformer, tmp_path):
    ckpt = _dense_biformer_checkpoint(biformer, "det")
    feats = _tiny_biformer(biformer["model"]["config"], features_only=True, **_file(tmp_path, "d.pth", ckpt))
    two = _tiny_biformer(biformer["model"]["config"], features_only=True, out_indices=(0, 1), **_file(tmp_path, "d.pth", ckpt))
    with torch.no_grad():
        for a, b in zip(feats(biformer["det"]["input"]), biformer["det"]["features"]):
            torch.testing.assert_close(a, b, **TOL)
        got = two(biformer["det"]["input"])
    assert len(got) == 2 and len(two.model.extra_norms) == 2
    for a, b in zip(got, biformer["det"]["features"][:2]):
        torch.testing.assert_close(a, b, **TOL)


def _layer_norm2d(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=1e-6).permute(0, 3, 1, 2)


def test_biformer_dense_backbone_from_imagenet_weights(biformer, tmp_path):
    """The official dense recipes start from the ImageNet checkpoint: classifier and final norm dropped,
    extra norms at their (identity) initialisation. Each output is then the LayerNorm of the stage output
    of the classifier run with the dense n_win (here n_win 8: a seg-config run of the same weights)."""
    case = biformer["model"]
    ckpt = {"model": case["state_dict"]}
    dense = _tiny_biformer(case["config"], dense="seg")
    dense.load_state_dict(vz_biformer.checkpoint_filter_fn(ckpt, dense))  # strict: nothing left out
    plain = _tiny_biformer(case["config"], n_win=8, num_classes=case["config"]["num_classes"])
    plain.load_state_dict(vz_biformer.checkpoint_filter_fn(ckpt, plain))
    x = biformer["seg"]["input"]
    with torch.no_grad():
        for a, b in zip(dense.forward_intermediates(x, intermediates_only=True), plain.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, _layer_norm2d(b), **TOL)


# -- OverLoCK ------------------------------------------------------------------------------------------


def test_overlock_contmix_plugin(overlock):
    case = overlock["contmix"]
    block = ContMix(**case["config"]).eval()
    block.load_state_dict(case["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(block(case["input"]), case["output"], **TOL)
        torch.testing.assert_close(block(case["input_small"]), case["output_small"], **TOL)  # upsampled, pooled back


def test_overlock_dynamic_conv_block(overlock):
    case = overlock["dynamic_conv_block"]
    block = DynamicConvBlock(**case["config"]).eval()  # ctx_dim: the context stream's width (the official passes 4x it)
    block.load_state_dict(case["state_dict"])
    with torch.no_grad():
        for tag in ("", "_small"):
            for a, b in zip(block(*case[f"input{tag}"]), case[f"output{tag}"]):
                torch.testing.assert_close(a, b, **TOL)


def _tiny_overlock(cfg: dict, **kwargs):
    return timm.create_model(
        "test_overlock", depth=cfg["depth"], sub_depth=cfg["sub_depth"], embed_dim=cfg["embed_dim"], kernel_size=cfg["kernel_size"],
        mlp_ratio=cfg["mlp_ratio"], sub_mlp_ratio=cfg["sub_mlp_ratio"], sub_num_heads=cfg["sub_num_heads"], projection=cfg["projection"],
        **kwargs,
    ).eval()


def test_overlock_model_from_official_checkpoint(overlock, tmp_path):
    case = overlock["model"]
    cfg = case["config"]
    load = _file(tmp_path, "o.pth", {"state_dict": case["state_dict"]}, cfg["num_classes"])
    model = _tiny_overlock(cfg, num_classes=cfg["num_classes"], aux_head=True, **load)
    with torch.no_grad():
        logits, aux = model.forward_with_aux(case["input"])
        torch.testing.assert_close(logits, case["logits"], **TOL)
        torch.testing.assert_close(aux, case["aux_logits"], **TOL)
        torch.testing.assert_close(model(case["input"]), case["logits"], **TOL)


def _dense_overlock_checkpoint(overlock, task: str) -> dict:
    backbone = {k: v for k, v in overlock["model"]["state_dict"].items() if not k.startswith(("head.", "aux_head."))}
    return _mmdet({**backbone, **overlock[task]["extra_state_dict"]})


@pytest.mark.parametrize("task", ["det", "seg"])
def test_overlock_dense_backbone(overlock, task, tmp_path):
    """The official detection backbone (extra_norm per output, h_proj(extra_norm[4](context)) added to the
    last map) and the segmentation one (extra_norm only), from mmdet/mmseg-layout checkpoints."""
    ckpt = _dense_overlock_checkpoint(overlock, task)
    assert ("backbone.h_proj.0.weight" in ckpt["state_dict"]) == (task == "det")
    x = overlock["model"]["input"]
    feats = _tiny_overlock(overlock["model"]["config"], features_only=True, dense=task, **_file(tmp_path, "d.pth", ckpt))
    assert feats.feature_info.channels() == [8, 16, 20, 20]
    model = _tiny_overlock(overlock["model"]["config"], dense=task)
    model.load_state_dict(vz_overlock.checkpoint_filter_fn(ckpt, model))  # strict: every official key has a home
    with torch.no_grad():
        for got in (feats(x), model.forward_intermediates(x, intermediates_only=True)):
            assert len(got) == 4
            for a, b in zip(got, overlock[task]["features"]):
                torch.testing.assert_close(a, b, **TOL)


def test_overlock_features_only_is_the_detection_backbone(overlock, tmp_path):
    ckpt = _dense_overlock_checkpoint(overlock, "det")
    feats = _tiny_overlock(overlock["model"]["config"], features_only=True, **_file(tmp_path, "d.pth", ckpt))
    three = _tiny_overlock(overlock["model"]["config"], features_only=True, out_indices=(0, 1, 2), **_file(tmp_path, "d.pth", ckpt))
    x = overlock["model"]["input"]
    with torch.no_grad():
        for a, b in zip(feats(x), overlock["det"]["features"]):
            torch.testing.assert_close(a, b, **TOL)
        got = three(x)
    assert len(got) == 3 and three.model.h_proj is None
    assert [isinstance(m, LayerNorm2d) for m in three.model.extra_norm] == [True, True, True, False, False]
    for a, b in zip(got, overlock["det"]["features"][:3]):
        torch.testing.assert_close(a, b, **TOL)


def test_overlock_dense_backbone_from_imagenet_weights(overlock):
    """ImageNet weights into the detection backbone: heads dropped, extra_norm and h_proj keep their
    initialisation; the first two outputs are then the LayerNorm of the classifier's."""
    case = overlock["model"]
    ckpt = {"state_dict": case["state_dict"]}
    dense = _tiny_overlock(case["config"], dense="det")
    dense.load_state_dict(vz_overlock.checkpoint_filter_fn(ckpt, dense))  # strict: nothing left out
    assert not any(k.startswith(("head", "aux_head")) for k in dense.state_dict())
    plain = _tiny_overlock(case["config"], num_classes=case["config"]["num_classes"], aux_head=True)
    plain.load_state_dict(vz_overlock.checkpoint_filter_fn(ckpt, plain))
    with torch.no_grad():
        got = dense.forward_intermediates(case["input"], indices=(0, 1), intermediates_only=True)
        want = plain.forward_intermediates(case["input"], indices=(0, 1), intermediates_only=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, _layer_norm2d(b), **TOL)


def test_dense_checkpoints_need_the_matching_model(overlock, biformer):
    det, seg = _dense_overlock_checkpoint(overlock, "det"), _dense_overlock_checkpoint(overlock, "seg")
    cfg = overlock["model"]["config"]
    with pytest.raises(ValueError, match="dense='det'"):
        vz_overlock.checkpoint_filter_fn(det, _tiny_overlock(cfg))
    with pytest.raises(ValueError, match="dense='seg'"):
        vz_overlock.checkpoint_filter_fn(seg, _tiny_overlock(cfg, dense="det"))
    with pytest.raises(ValueError, match="dense='det'"):
        vz_overlock.checkpoint_filter_fn(det, _tiny_overlock(cfg, dense="seg"))
    with pytest.raises(ValueError, match="dense"):
        _tiny_overlock(cfg, dense="panoptic")
    bcfg = biformer["model"]["config"]
    with pytest.raises(ValueError, match="dense="):
        vz_biformer.checkpoint_filter_fn(_dense_biformer_checkpoint(biformer, "seg"), _tiny_biformer(bcfg))
    with pytest.raises(ValueError, match="dense"):
        _tiny_biformer(bcfg, dense="panoptic")


@pytest.mark.parametrize("name", ["test_biformer", "test_overlock"])
def test_dense_features_use_every_parameter(name):
    """What a detector reads (levels 1-3, as vzoo's detection task asks) leaves no parameter without a
    gradient: the norms of unread levels are pruned (DDP without find_unused_parameters needs this)."""
    torch.manual_seed(0)
    feats = timm.create_model(name, features_only=True, out_indices=(1, 2, 3))
    sum(f.square().mean() for f in feats(torch.randn(1, 3, 64, 96))).backward()
    assert [n for n, p in feats.named_parameters() if p.grad is None] == []
