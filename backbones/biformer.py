"""BiFormer backbones for timm: ``biformer_tiny``, ``biformer_small``, ``biformer_base``, ``test_biformer``.

Zhu et al., CVPR 2023, arXiv 2303.08810; architecture of rayleizhu/BiFormer ``models/biformer.py``
(1697bbb), in timm's layout (``stem``, ``stages.i.downsample``, ``stages.i.blocks.j``). Official
checkpoints (weights under ``"model"``, keys ``downsample_layers.*``, ``stages.i.j.*``,
``attn.qkv.qkv``, ``attn.wo``, ``mlp.0``/``mlp.3``) load through :func:`checkpoint_filter_fn`::

    import timm, vzoo
    model = timm.create_model("biformer_small", pretrained=True,
                              pretrained_cfg_overlay=dict(file="biformer_small_in1k.pth"))

Any input size works: every routing stage zero-pads to a multiple of ``n_win`` as the official
``auto_pad`` does (at 224 x 224 nothing is padded, exactly as the released classifiers run).

Dense prediction: ``dense="det"`` / ``dense="seg"`` builds the official detection / segmentation backbone
(``object_detection/`` and ``semantic_segmentation/`` ``BiFormer_mm``: ``n_win`` 16 / 8 with auto-padding,
no classifier or final norm, a LayerNorm2d ``extra_norms.i`` on each stage output). ``features_only=True``
defaults to ``dense="det"``; mmdet/mmseg checkpoints (``backbone.*`` keys) load through
:func:`checkpoint_filter_fn`.
"""

# No ``from __future__ import annotations``: FX writes forward()'s annotations into the traced code as
# names, and TorchScript (timm's fx-torchscript test) must resolve them.
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from vzoo.biformer import AttentionLePE, BiLevelRoutingAttention

__all__ = ["BiFormer", "checkpoint_filter_fn", "DENSE_N_WIN"]

DENSE_N_WIN = {"det": 16, "seg": 8}
"""Regions per side of the official dense configurations (COCO at 800 x 1333 / ADE20K at 512 x 512 crops)."""


class BiFormerBlock(nn.Module):
    """``x + DWConv3x3(x)``, then pre-norm attention and MLP residuals (LN eps 1e-6, no layer scale).

    Takes and returns NHWC ``[N, H, W, C]``; ``topk=None`` makes the stage-4 block (plain attention).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        topk: int | None,
        n_win: int = 7,
        mlp_ratio: float = 3.0,
        drop_path: float = 0.0,
        side_dwconv: int = 5,
    ) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk is None:
            self.attn = AttentionLePE(dim, num_heads=num_heads, side_dwconv=side_dwconv)
        else:
            self.attn = BiLevelRoutingAttention(dim, num_heads=num_heads, n_win=n_win, topk=topk, side_dwconv=side_dwconv)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BiFormerStage(nn.Module):
    """Optional downsampling (Conv3x3 s2 + BN), then blocks. NCHW in and out."""

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, drop_path: Sequence[float], **block_kw) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_dim, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim)) if downsample else nn.Identity()
        )
        self.blocks = nn.Sequential(*[BiFormerBlock(dim, drop_path=drop_path[j], **block_kw) for j in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1).contiguous()  # blocks run on contiguous NHWC
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory (channels_last)


class BiFormer(nn.Module):
    """BiFormer: routing stages 1-3 (BRA), plain attention in stage 4, BatchNorm, average pool, Linear.

    Args:
        depths: blocks per stage.
        dims: channels per stage.
        num_heads: heads per stage (BRA stages: ``dim // 32``; stage 4: 8).
        topks: routed regions per stage, ``None`` for plain attention.
        n_win: regions per side in the routing stages (default 7, or ``DENSE_N_WIN[dense]``).
        mlp_ratio: MLP hidden width / dim.
        in_chans, num_classes, global_pool ('avg' or ''), drop_rate, drop_path_rate: as in timm.
        dense: ``"det"`` or ``"seg"`` for the official dense-prediction backbone: no classifier
            (``num_classes`` is ignored) and no final BatchNorm; every stage output passes through its
            ``extra_norms`` LayerNorm2d (``forward_intermediates``; ``forward_features`` gives the last).
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 8, 2),
        dims: Sequence[int] = (64, 128, 256, 512),
        num_heads: Sequence[int] = (2, 4, 8, 8),
        topks: Sequence[int | None] = (1, 4, 16, None),
        n_win: int | None = None,
        mlp_ratio: float = 3.0,
        side_dwconv: int = 5,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        dense: str | None = None,
    ) -> None:
        super().__init__()
        if dense is not None and dense not in DENSE_N_WIN:
            raise ValueError(f"BiFormer: dense={dense!r} must be None, 'det' or 'seg'")
        if n_win is None:
            n_win = DENSE_N_WIN[dense] if dense else 7
        if dense:
            num_classes = 0
        if global_pool not in ("avg", ""):
            raise ValueError(f"BiFormer: global_pool={global_pool!r} must be 'avg' or ''")
        if not len(depths) == len(dims) == len(num_heads) == len(topks):
            raise ValueError("BiFormer: depths, dims, num_heads and topks must have one entry per stage")
        self.num_classes, self.global_pool, self.drop_rate = num_classes, global_pool, drop_rate
        self.num_features = self.head_hidden_size = dims[-1]
        c0 = dims[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, c0 // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(c0 // 2),
            nn.GELU(),
            nn.Conv2d(c0 // 2, c0, 3, stride=2, padding=1),
            nn.BatchNorm2d(c0),
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, self.feature_info = [], []
        for i, depth in enumerate(depths):
            stages.append(
                BiFormerStage(
                    dims[max(i - 1, 0)], dims[i], depth, downsample=i > 0,
                    drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])],
                    num_heads=num_heads[i], topk=topks[i], n_win=n_win, mlp_ratio=mlp_ratio, side_dwconv=side_dwconv,
                )
            )
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity() if dense else nn.BatchNorm2d(dims[-1])
        self.extra_norms = nn.ModuleList([LayerNorm2d(d) for d in dims]) if dense else None
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- timm API ---------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"BiFormer: global_pool={global_pool!r} must be 'avg' or ''")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, C4, H/32, W/32]`` (after the final BatchNorm, or the last extra norm)."""
        x = self.stages(self.stem(x))
        return self.norm(x) if self.extra_norms is None else self.extra_norms[-1](x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (NCHW) at ``indices`` (last n if int, all if None); ``norm`` applies the final
        BatchNorm to the last stage's output. A dense model returns every output through its extra norm,
        as the official dense backbones do. Returns them, or ``(final features, them)``."""
        if output_fmt != "NCHW":
            raise ValueError(f"BiFormer.forward_intermediates: output_fmt='{output_fmt}'; only 'NCHW' is supported")
        take, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stop = max_index if stop_early else last
        intermediates: list[torch.Tensor] = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):  # no slicing or break: TorchScript unrolls this loop
            if i <= stop:
                x = stage(x)
                if i in take:
                    intermediates.append(self._output(i, x, norm and i == last))
        if intermediates_only:
            return intermediates
        if stop == last:
            x = self._output(last, x, True)
        return x, intermediates

    def _output(self, i: int, x: torch.Tensor, final_norm: bool) -> torch.Tensor:
        """Stage ``i``'s output as returned: through ``extra_norms[i]`` (dense), else through the final
        BatchNorm if ``final_norm``."""
        if self.extra_norms is None:
            return self.norm(x) if final_norm else x
        for j, extra in enumerate(self.extra_norms):  # TorchScript indexes a ModuleList by literals only
            if j == i:
                x = extra(x)
        return x

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop the stages (and norm/head) that the requested intermediates do not need."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if self.extra_norms is not None:  # the norms of outputs nobody reads go too
            self.extra_norms = nn.ModuleList([m if i in take else nn.Identity() for i, m in enumerate(self.extra_norms[: max_index + 1])])
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or max_index < len(self.feature_info) - 1:
            self.reset_classifier(0, "")
        return take


_KEY_RULES = (
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.attn\.qkv\.qkv\.", ".attn.qkv."),
    (r"\.attn\.wo\.", ".attn.proj."),
    (r"\.mlp\.0\.", ".mlp.fc1."),
    (r"\.mlp\.3\.", ".mlp.fc2."),
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: BiFormer) -> dict[str, torch.Tensor]:
    """Map an official BiFormer checkpoint (``{"model": ...}``, an mmdet/mmseg ``{"state_dict": {"backbone.*"}}``
    or the bare state dict) to vzoo's names; vzoo-format state dicts pass through unchanged.

    ImageNet weights for a dense model lose their classifier and final norm, and the extra norms keep
    their initialisation (what the official dense recipes' non-strict load does); a dense checkpoint
    (``extra_norms.*``) needs a dense model."""
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
    if "stem.0.weight" in state_dict:
        return state_dict
    if "downsample_layers.0.0.weight" not in state_dict:
        raise ValueError("checkpoint is neither an official BiFormer (downsample_layers.*) nor a vzoo state dict (stem.*)")
    dense_ckpt = any(k.startswith("extra_norms.") for k in state_dict)
    if dense_ckpt and model.extra_norms is None:
        raise ValueError("checkpoint is a dense-prediction BiFormer (extra_norms.*): build the model with dense='det' or dense='seg'")
    out = {}
    for key, value in state_dict.items():
        if key.startswith("pre_logits.") or (model.extra_norms is not None and key.startswith(("head.", "norm."))):
            continue  # pre_logits: an empty Identity in every released model
        for pattern, repl in _KEY_RULES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    if model.extra_norms is not None and not dense_ckpt:
        out.update({k: v for k, v in model.state_dict().items() if k.startswith("extra_norms.")})
    return out


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2303.08810",
        "paper_name": "BiFormer: Vision Transformer with Bi-Level Routing Attention",
        "origin_url": "https://github.com/rayleizhu/BiFormer",
        **kwargs,
    }


_ONEDRIVE = "https://api.onedrive.com/v1.0/shares/s!{}/root/content"
default_cfgs = generate_default_cfgs(
    {
        "biformer_tiny.in1k": _cfg(url=_ONEDRIVE.format("AkBbczdRlZvChHEOoGkgwgQzEDlM")),
        "biformer_small.in1k": _cfg(url=_ONEDRIVE.format("AkBbczdRlZvChHDyM-x9KWRBZ832")),
        "biformer_base.in1k": _cfg(url=_ONEDRIVE.format("AkBbczdRlZvChHI_XPhoadjaNxtO")),
        "test_biformer.untrained": _cfg(input_size=(3, 112, 112), pool_size=(4, 4)),
    }
)


def _create(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    if kwargs.get("features_only"):
        kwargs.setdefault("dense", "det")  # the official detection backbone (pass dense=None for raw stages)
    return build_model_with_cfg(
        BiFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": (0, 1, 2, 3), "feature_cls": "getter", **kwargs.pop("feature_cfg", {})},
        **kwargs,
    )


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T: 13.1 M params, 2.2 GFLOPs, 81.4 % ImageNet-1k top-1 (paper)."""
    return _create("biformer_tiny", pretrained, **dict(dict(depths=(2, 2, 8, 2)), **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S: 25.5 M params, 4.5 GFLOPs, 83.8 % ImageNet-1k top-1 (paper)."""
    return _create("biformer_small", pretrained, **dict(dict(depths=(4, 4, 18, 4)), **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B: 56.8 M params, 9.8 GFLOPs, 84.3 % ImageNet-1k top-1 (paper)."""
    return _create("biformer_base", pretrained, **dict(dict(depths=(4, 4, 18, 4), dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 8)), **kwargs))


@register_model
def test_biformer(pretrained: bool = False, **kwargs) -> BiFormer:
    """A tiny BiFormer for tests: every mechanism of the real ones, 0.25 M params."""
    model_args = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 64), num_heads=(1, 2, 2, 2), topks=(1, 4, 8, None), mlp_ratio=2.0)
    return _create("test_biformer", pretrained, **dict(model_args, **kwargs))
