"""Make the BiFormer and OverLoCK golden fixtures from the official code.

    python tests/golden/make_vision.py --biformer PATH --overlock PATH

``PATH`` are git checkouts of https://github.com/rayleizhu/BiFormer and https://github.com/LMMMEng/OverLoCK;
the script refuses to run without them, imports the official modules from there, runs tiny configurations
(fixed seeds, fp32, eval mode) and writes ``biformer.pt`` and ``overlock.pt`` next to itself: repository
URL, commit, configurations, inputs, state dicts (official key names) and outputs. Nothing from the
official code is copied; what it needs but cannot import here is stubbed below:

- mmcv / mmdet / mmseg / mmengine / fairscale: registries, loggers and checkpoint helpers the classification
  and dense backbones import but never call in these runs (no ``pretrained``, no checkpointing);
- NATTEN: OverLoCK calls ``natten.functional.na2d_av`` (NATTEN 0.17; removed in >= 0.20). :func:`na2d_av` below
  is an explicit loop over pixels and taps with NATTEN's border rule (the window is shifted inside the map,
  never zero-padded), checked against ``models/contmix.py``'s own NATTEN-free fallback before use.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn

from vzoo.atomic import write_atomic

HERE = Path(__file__).resolve().parent
REPOS = {"biformer": "https://github.com/rayleizhu/BiFormer", "overlock": "https://github.com/LMMMEng/OverLoCK"}
NEEDED = {"biformer": "ops/bra_legacy.py", "overlock": "models/overlock.py"}


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int = 1) -> torch.Tensor:
    """NATTEN 0.17 ``na2d_av`` for dilation 1: ``attn [B, G, H, W, K*K]``, ``value [B, G, H, W, c]`` ->
    ``[B, G, H, W, c]``; pixel (i, j) reads the K x K window starting at ``clamp(i - K//2, 0, H - K)``
    (same for j), taps in row-major order."""
    assert dilation == 1, "only dilation 1 is used by OverLoCK"
    k = kernel_size
    _, _, h, w, _ = value.shape
    out = torch.zeros_like(value)
    for i in range(h):
        si = min(max(i - k // 2, 0), h - k)
        for j in range(w):
            sj = min(max(j - k // 2, 0), w - k)
            for a in range(k):
                for b in range(k):
                    out[:, :, i, j] += attn[:, :, i, j, a * k + b, None] * value[:, :, si + a, sj + b]
    return out


def _stub(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


class _Registry:
    def register_module(self, *args, **kwargs):
        return lambda cls: cls


def _install_stubs() -> None:
    unused = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stub called"))  # noqa: E731
    _stub("natten")
    _stub("natten.functional", na2d_av=na2d_av)
    _stub("fairscale")
    _stub("fairscale.nn")
    _stub("fairscale.nn.checkpoint", checkpoint_wrapper=unused)
    for pkg in ("mmengine", "mmcv"):
        _stub(pkg)
        _stub(f"{pkg}.runner", load_checkpoint=unused)
    _stub("mmcv_custom", load_checkpoint=unused)
    for pkg in ("mmdet", "mmseg"):
        _stub(pkg)
        _stub(f"{pkg}.models")
        _stub(f"{pkg}.models.builder", BACKBONES=_Registry(), MODELS=_Registry())
        _stub(f"{pkg}.utils", get_root_logger=unused)


def _import(root: Path, module: str, extra_path: Path | None = None) -> types.ModuleType:
    """Import ``module`` from the checkout ``root`` (and ``extra_path``), then forget the top-level package
    names so the other repository's ``models`` package can be imported too."""
    paths = [str(p) for p in (extra_path, root) if p is not None]
    sys.path[:0] = paths
    try:
        mod = __import__(module, fromlist=["_"])
    finally:
        del sys.path[: len(paths)]
        for name in list(sys.modules):
            if name.split(".")[0] in ("models", "ops", "models_cls", "models_mm"):
                del sys.modules[name]
    return mod


def _commit(root: Path, name: str) -> str:
    if not (root / NEEDED[name]).is_file():
        sys.exit(f"make_vision.py: error: --{name} {root} is not a checkout of {REPOS[name]} (no {NEEDED[name]})")
    git = ["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"]
    try:
        top, commit = subprocess.run(git, check=True, capture_output=True, text=True).stdout.split()
    except (subprocess.CalledProcessError, FileNotFoundError, ValueError):
        top, commit = "", ""
    if Path(top).resolve() != root.resolve():
        sys.exit(f"make_vision.py: error: --{name} {root} is not a git checkout (its commit must be recorded)")
    return commit


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Perturb every parameter (zero-initialised RPB, GRN and LayerScale included) and BN statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return module.eval()


def _sd(module: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The state dict without ``skip`` prefixes and BN ``num_batches_tracked`` (unused in eval mode;
    ``load_state_dict`` restores it), to keep the fixture small."""
    return {k: v.clone() for k, v in module.state_dict().items() if not k.startswith(skip) and not k.endswith("num_batches_tracked")}


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def make_biformer(root: Path) -> dict:
    fixture = dict(repo=REPOS["biformer"], commit=_commit(root, "biformer"))
    bra_mod = _import(root, "ops.bra_legacy")
    common = _import(root, "models._common")
    cls_mod = _import(root, "models.biformer")
    det_mod = _import(root / "object_detection", "models_mm.biformer_mm", extra_path=root)
    seg_mod = _import(root / "semantic_segmentation", "models_mm.biformer_mm", extra_path=root)

    # BRA module: n_win 4, 3 of 16 regions routed, on a divisible map and (auto_pad) a ragged one
    bra_cfg = dict(dim=32, num_heads=2, n_win=4, qk_dim=32, topk=3, side_dwconv=5, kv_downsample_mode="identity")
    torch.manual_seed(0)
    bra = _randomize(bra_mod.BiLevelRoutingAttention(**bra_cfg, auto_pad=True), seed=0)
    x, x_pad = _randn(1, 16, 12, 32, seed=1), _randn(1, 11, 14, 32, seed=2)
    fixture["bra"] = dict(config=bra_cfg, state_dict=_sd(bra), input=x, output=bra(x), input_pad=x_pad, output_pad=bra(x_pad))

    # Stage-4 attention (plain MHSA, 8 heads, LePE on the input)
    torch.manual_seed(3)
    lepe = _randomize(common.AttentionLePE(dim=32, side_dwconv=5), seed=3)
    x = _randn(2, 5, 6, 32, seed=4)
    fixture["attn_lepe"] = dict(config=dict(dim=32, num_heads=8, side_dwconv=5), state_dict=_sd(lepe), input=x, output=lepe(x))

    # Tiny classifier (biformer_tiny's recipe at small widths), n_win 7 at 112 x 112
    model_cfg = dict(
        depth=[1, 1, 1, 1], embed_dim=[8, 16, 32, 32], qk_dims=[8, 16, 32, 32], head_dim=8, mlp_ratios=[2, 2, 2, 2],
        n_win=7, kv_downsample_mode="identity", kv_per_wins=[-1] * 4, topks=[1, 4, 16, -2], side_dwconv=5,
        before_attn_dwconv=3, layer_scale_init_value=-1, param_routing=False, diff_routing=False, soft_routing=False,
        pre_norm=True, pe=None, num_classes=10,
    )
    torch.manual_seed(5)
    model = _randomize(cls_mod.BiFormer(**model_cfg), seed=5)
    x = _randn(1, 3, 112, 112, seed=6)
    fixture["model"] = dict(config=model_cfg, state_dict=_sd(model), input=x, logits=model(x), features=model.forward_features(x))

    # Dense backbones (object_detection/ and semantic_segmentation/ BiFormer_mm): auto_pad, n_win 16 / 8,
    # no head or final norm, an extra LayerNorm2d per stage output. Same weights plus the extra norms.
    x = _randn(1, 3, 40, 72, seed=7)
    for task, mod, n_win in (("det", det_mod, 16), ("seg", seg_mod, 8)):
        torch.manual_seed(8)
        dense = mod.BiFormer_mm(**dict(model_cfg, n_win=n_win, auto_pad=True))
        missing = dense.load_state_dict(fixture["model"]["state_dict"], strict=False).missing_keys
        assert all(k.startswith("extra_norms.") for k in missing), missing
        for norm in dense.extra_norms:
            _randomize(norm, seed=9)
        dense.eval()
        fixture[task] = dict(
            config=dict(n_win=n_win, auto_pad=True), extra_state_dict=_sd(dense.extra_norms), input=x,
            features=[f.clone() for f in dense(x)],
        )
    return fixture


@torch.no_grad()
def make_overlock(root: Path) -> dict:
    fixture = dict(repo=REPOS["overlock"], commit=_commit(root, "overlock"))
    contmix = _import(root, "models.contmix")
    cls_mod = _import(root, "models.overlock")
    det_mod = _import(root / "detection", "models.overlock")
    seg_mod = _import(root / "segmentation", "models.overlock")

    # The NATTEN stand-in against contmix.py's own NATTEN-free path (unfold + replicate pad), both branches
    torch.manual_seed(10)
    block = _randomize(contmix.ContMixBlock(dim=16, kernel_size=7, smk_size=5, num_heads=2, mlp_ratio=2), seed=10)
    x, x_small = _randn(1, 16, 8, 10, seed=11), _randn(1, 16, 4, 9, seed=12)
    contmix.has_natten = True
    want, want_small = block(x), block(x_small)
    contmix.has_natten = False
    torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block(x_small), want_small, atol=1e-5, rtol=1e-5)
    contmix.has_natten = True
    fixture["contmix"] = dict(
        config=dict(dim=16, kernel_size=7, smk_size=5, num_heads=2, mlp_ratio=2), state_dict=_sd(block),
        input=x, output=want, input_small=x_small, output_small=want_small,
    )

    # Focus-Net block with its context stream, on a map >= K and one narrower than K (upsampled, pooled back)
    cfg = dict(dim=16, ctx_dim=32, kernel_size=7, smk_size=5, num_heads=2, mlp_ratio=2, ls_init_value=1, res_scale=True)
    torch.manual_seed(13)
    block = _randomize(cls_mod.DynamicConvBlock(**cfg), seed=13)
    case = dict(config=dict(cfg, ctx_dim=8), state_dict=_sd(block))  # vzoo's ctx_dim: the stream's own width
    for tag, (h, w), seed in (("", (8, 10), 14), ("_small", (5, 9), 15)):
        x, hx, hr = _randn(1, 16, h, w, seed=seed), _randn(1, 8, h, w, seed=seed + 10), _randn(1, 8, h, w, seed=seed + 20)
        case.update({f"input{tag}": (x, hx, hr), f"output{tag}": block(x, hx, hr)})
    fixture["dynamic_conv_block"] = case

    # Tiny classifier (overlock_xt's recipe at small widths); /16 map 5 x 7 (>= K), /32 map 3 x 4 (< K: upsampled)
    model_cfg = dict(
        depth=[1, 1, 1, 1], sub_depth=[2, 1], embed_dim=[8, 16, 16, 16], kernel_size=[7, 7, 5, 5], mlp_ratio=[2, 2, 2, 2],
        sub_mlp_ratio=[2, 2], sub_num_heads=[2, 2], projection=32, num_classes=10, use_gemm=False,
    )
    torch.manual_seed(16)
    model = _randomize(cls_mod.OverLoCK(**model_cfg), seed=16)
    x = _randn(1, 3, 80, 112, seed=17)
    model.train()  # the official forward returns the aux logits only in training mode; BN/DropPath stay eval
    for m in model.modules():
        if m is not model:
            m.eval()
    out = model(x)
    model.eval()
    fixture["model"] = dict(config=model_cfg, state_dict=_sd(model), input=x, logits=out["main"], aux_logits=out["aux"])

    # Dense backbones (detection/ and segmentation/ models/overlock.py): heads deleted, extra_norm per output
    # (the normed /8 output is also what the /16 stage reads); detection adds h_proj(extra_norm[4](Overview
    # context)) to the last map.
    for task, mod in (("det", det_mod), ("seg", seg_mod)):
        torch.manual_seed(18)
        dense = mod.OverLoCK(**model_cfg)
        missing = dense.load_state_dict(_sd(model, skip=("head.", "aux_head.")), strict=False).missing_keys
        assert all(k.startswith(("extra_norm.", "h_proj.")) for k in missing), missing
        extra = nn.ModuleDict({k: getattr(dense, k) for k in ("extra_norm", "h_proj") if hasattr(dense, k)})
        _randomize(extra, seed=19)
        dense.eval()
        fixture[task] = dict(extra_state_dict=_sd(extra), features=[f.clone() for f in dense(x)])
    return fixture


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--biformer", type=Path, required=True, help="git checkout of " + REPOS["biformer"])
    parser.add_argument("--overlock", type=Path, required=True, help="git checkout of " + REPOS["overlock"])
    args = parser.parse_args(argv)
    for name in REPOS:
        _commit(getattr(args, name), name)  # refuse early, before anything is written
    _install_stubs()
    torch.set_num_threads(1)
    for name, make in (("biformer", make_biformer), ("overlock", make_overlock)):
        fixture = make(getattr(args, name).resolve())
        path = HERE / f"{name}.pt"
        write_atomic(path, lambda tmp: torch.save(fixture, tmp))
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB, {fixture['repo']} @ {fixture['commit'][:7]})")


if __name__ == "__main__":
    main()
