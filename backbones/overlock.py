"""OverLoCK backbones for timm: ``overlock_xt``, ``overlock_t``, ``overlock_s``, ``overlock_b``, ``test_overlock``.

Lou & Yu, CVPR 2025, arXiv 2502.20087; architecture and module names of LMMMEng/OverLoCK
``models/overlock.py`` (2c8ab3b), so the released ``*_in1k_224.pth`` and ``*_in1k_224_reparam.pth``
checkpoints load through :func:`checkpoint_filter_fn` without renaming, and without NATTEN::

    import timm, vzoo
    model = timm.create_model("overlock_t.in1k_reparam", pretrained=True)   # or pretrained_cfg_overlay=dict(file=...)

Base-Net (stem, RepConvBlock stages at /4, /8, /16) -> Overview-Net (/32 RepConvBlocks, a coarse context
prior with an auxiliary classifier) -> Focus-Net (DynamicConvBlocks at /16 and /32 fed with the Base-Net
/16 map and the context re-injected in every block) -> conv 1x1 projection head. ``forward`` returns
timm-style logits; built with ``aux_head=True``, :meth:`OverLoCK.forward_with_aux` adds the aux logits
for deep supervision.

Dense prediction: ``dense="det"`` / ``dense="seg"`` builds the official detection / segmentation backbone
(``detection/models/overlock.py``, ``segmentation/models/overlock.py``): no heads, a LayerNorm2d
``extra_norm.i`` on each of the four outputs and, for detection, ``h_proj(extra_norm.4(context))`` added to
the last. ``features_only=True`` defaults to ``dense="det"``; mmdet/mmseg checkpoints (``backbone.*``)
load through :func:`checkpoint_filter_fn`.
"""

# No ``from __future__ import annotations``: FX writes forward()'s annotations into the traced code as
# names, and TorchScript (timm's fx-torchscript test) must resolve them.
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from vzoo.overlock import CTXDownsample, DilatedReparamBlock, DynamicConvBlock, LayerScale, RepConvBlock

__all__ = ["OverLoCK", "checkpoint_filter_fn", "AUX_LOSS_RATIO"]

AUX_LOSS_RATIO = 0.4
"""Weight of the Overview-Net's auxiliary loss in the official recipe (``train.py --aux-loss-ratio``)."""

# Modules in execution order (layer-wise learning-rate decay follows it).
_ORDER = (
    "patch_embed1", "blocks1", "patch_embed2", "blocks2", "patch_embed3", "blocks3", "patch_embed4", "blocks4",
    "high_level_proj", "sub_blocks3", "patch_embedx", "sub_blocks4",
)


def _stem(in_chans: int, dim: int) -> nn.Sequential:
    """Four 3x3 convs without bias (strides 2, 1, 2, 1) with BN, GELU between them: ``/4``."""
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(dim // 2), nn.GELU(),
        nn.Conv2d(dim // 2, dim // 2, 3, padding=1, bias=False), nn.BatchNorm2d(dim // 2), nn.GELU(),
        nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(dim), nn.GELU(),
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim),
    )


def _downsample(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_dim))


class OverLoCK(nn.Module):
    """OverLoCK classifier / backbone (NCHW in, logits out).

    Args:
        depth: RepConvBlocks in Base-Net stages 1-3 and in the Overview-Net.
        sub_depth: DynamicConvBlocks in the Focus-Net at /16 and /32 (both >= 1).
        embed_dim: channels ``C0..C3``; the context stream has ``C3 / 4``.
        kernel_size: large kernel per stage (the Focus-Net uses entries 2 and 3).
        mlp_ratio, sub_mlp_ratio: ConvFFN widths of the RepConv and DynamicConv blocks.
        sub_num_heads: Focus-Net kernel heads (``2x`` that many dynamic-kernel groups).
        ls_init_value: LayerScale init per stage (``None``: no LayerScale).
        res_scale: scale the shortcut instead of the branch (official default).
        smk_size: ContMix's small kernel.
        deploy: build re-parameterised large kernels (the ``*_reparam`` checkpoint layout).
        aux_head: add the Overview-Net's auxiliary classifier (``aux_head.*``) for deep-supervised
            training with :meth:`forward_with_aux`; off by default, as ``forward`` never uses it.
        projection: width of the 1x1 conv before pooling in the head.
        in_chans, num_classes, global_pool ('avg' or ''), drop_rate, drop_path_rate: as in timm.
        dense: ``"det"`` or ``"seg"`` for the official dense-prediction backbone: no heads (``num_classes``
            is ignored), the four outputs through ``extra_norm`` and, for ``"det"``, the projected
            Overview context ``h_proj`` added to the last (``forward_intermediates``; ``forward_features``
            gives the last). As in the official code, the network runs on from the normed /8 output.
    """

    def __init__(
        self,
        depth: Sequence[int] = (2, 2, 2, 2),
        sub_depth: Sequence[int] = (4, 2),
        embed_dim: Sequence[int] = (96, 192, 384, 768),
        kernel_size: Sequence[int] = (7, 7, 7, 7),
        mlp_ratio: Sequence[float] = (4, 4, 4, 4),
        sub_mlp_ratio: Sequence[float] = (4, 4),
        sub_num_heads: Sequence[int] = (4, 8),
        ls_init_value: Sequence[float | None] = (None, None, 1.0, 1.0),
        res_scale: bool = True,
        smk_size: int = 5,
        deploy: bool = False,
        aux_head: bool = False,
        projection: int = 1024,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        dense: str | None = None,
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"OverLoCK: global_pool={global_pool!r} must be 'avg' or ''")
        if dense not in (None, "det", "seg"):
            raise ValueError(f"OverLoCK: dense={dense!r} must be None, 'det' or 'seg'")
        if dense and aux_head:
            raise ValueError("OverLoCK: aux_head=True needs a classifier; the dense backbone (dense=...) has none")
        if len(depth) != 4 or len(embed_dim) != 4 or len(kernel_size) != 4 or len(sub_depth) != 2 or min(sub_depth) < 1:
            raise ValueError(
                f"OverLoCK: depth, embed_dim and kernel_size need 4 entries and sub_depth 2 entries >= 1; got "
                f"depth={tuple(depth)}, embed_dim={tuple(embed_dim)}, kernel_size={tuple(kernel_size)}, sub_depth={tuple(sub_depth)}"
            )
        c0, c1, c2, c3 = embed_dim
        ctx = c3 // 4
        fusion_dim = c3 + ctx
        self.num_classes = 0 if dense else num_classes
        self.global_pool, self.drop_rate, self.dense = global_pool, drop_rate, dense
        self.num_features, self.head_hidden_size = fusion_dim, fusion_dim if dense else projection
        self.grad_checkpointing = False

        self.patch_embed1 = _stem(in_chans, c0)
        self.patch_embed2 = _downsample(c0, c1)
        self.patch_embed3 = _downsample(c1, c2)
        self.patch_embed4 = _downsample(c2, c3)
        self.high_level_proj = nn.Conv2d(c3, ctx, 1)
        self.patch_embedx = CTXDownsample(c2, c3)

        rates = iter(torch.linspace(0, drop_path_rate, sum(depth) + sum(sub_depth)).tolist())
        for i in range(4):
            blocks = [
                RepConvBlock(embed_dim[i], kernel_size[i], mlp_ratio[i], ls_init_value[i], res_scale, next(rates), deploy)
                for _ in range(depth[i])
            ]
            setattr(self, f"blocks{i + 1}", nn.ModuleList(blocks))
        for s, (dim, k) in enumerate(((c2, kernel_size[2]), (c3, kernel_size[3]))):
            blocks = [
                DynamicConvBlock(
                    dim, ctx, k, smk_size, sub_num_heads[s], sub_mlp_ratio[s], ls_init_value[2 + s], res_scale, next(rates),
                    is_first=s == 0 and j == 0, deploy=deploy,
                )
                for j in range(sub_depth[s])
            ]
            setattr(self, f"sub_blocks{s + 3}", nn.ModuleList(blocks))

        self.aux_head = (
            nn.Sequential(nn.BatchNorm2d(c3), nn.AdaptiveAvgPool2d(1), self._classifier(c3, num_classes)) if aux_head else None
        )
        self.head = None if dense else nn.Sequential(
            nn.Conv2d(fusion_dim, projection, 1, bias=False),
            nn.BatchNorm2d(projection),
            nn.SiLU(),
            nn.Dropout(drop_rate),  # an empty slot in the official head (its pooling); keeps key ``head.4``
            self._classifier(projection, num_classes),
        )
        # official dense backbones: output norms (+ the context projection for detection)
        norms = (c0, c1, c2 + ctx, fusion_dim) + ((c3,) if dense == "det" else ())
        self.extra_norm = nn.ModuleList([LayerNorm2d(d, eps=1e-6) for d in norms]) if dense else None
        self.h_proj = nn.Sequential(nn.Conv2d(c3, fusion_dim, 1), LayerScale(fusion_dim, 1e-5)) if dense == "det" else None
        self.feature_info = [
            dict(num_chs=c0, reduction=4, module="blocks1"),
            dict(num_chs=c1, reduction=8, module="blocks2"),
            dict(num_chs=c2 + ctx, reduction=16, module="sub_blocks3"),
            dict(num_chs=fusion_dim, reduction=32, module="sub_blocks4"),
        ]
        self.apply(self._init_weights)

    @staticmethod
    def _classifier(dim: int, num_classes: int) -> nn.Module:
        return nn.Conv2d(dim, num_classes, 1) if num_classes > 0 else nn.Identity()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Official init: trunc-normal(0.02) conv/linear weights, zero biases, unit norms."""
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- timm API ---------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[float, ...]]:
        """Parameter groups in execution order: the stem, then each module (each block unless ``coarse``)."""

        def ordinal(name: str) -> tuple[float, ...]:
            part, _, rest = name.partition(".")
            if part not in _ORDER:
                return (float("inf"),)  # heads
            index = int(rest.split(".")[0]) if "blocks" in part and not coarse else 0
            return (float(_ORDER.index(part)), float(index))

        return ordinal

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return nn.Identity() if self.head is None else self.head[4]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New main (and aux) classifiers for ``num_classes`` (0 removes them); ``global_pool`` 'avg' or ''."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"OverLoCK: global_pool={global_pool!r} must be 'avg' or ''")
            self.global_pool = global_pool
        if self.head is None:
            if num_classes:
                raise ValueError(f"OverLoCK.reset_classifier: num_classes={num_classes}, but the dense backbone has no head")
            return
        self.num_classes = num_classes
        self.head[4] = self._classifier(self.head_hidden_size, num_classes)
        if self.aux_head is not None:
            self.aux_head[2] = self._classifier(self.aux_head[0].num_features, num_classes)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge every dilated large-kernel branch (in place; eval-mode outputs unchanged), giving the
        ``*_reparam`` layout. ``timm.utils.reparameterize_model`` calls this too."""
        for m in self.modules():
            if isinstance(m, DilatedReparamBlock):
                m.reparameterize()

    def _run(self, block: nn.Module, *args: torch.Tensor):
        """``block(*args)``, checkpointed if enabled (eager only: TorchScript calls the blocks directly)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _output(self, level: int, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Feature level ``level`` as returned: unchanged, or (dense) through ``extra_norm[level]``, at level 3
        of the detection backbone plus ``h_proj(extra_norm[4](ctx))``."""
        if self.extra_norm is None:
            return x
        for i, norm in enumerate(self.extra_norm):  # TorchScript indexes a ModuleList by literals only
            if i == level:
                x = norm(x)
        if level == 3 and self.h_proj is not None:
            assert ctx is not None
            x = x + self.h_proj(self.extra_norm[4](ctx))
        return x

    def _forward(
        self, x: torch.Tensor, take: list[int], last: int = 3
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """Runs the network up to feature level ``last`` (0-3). Returns ``(final map, Overview context or
        None, [the levels in take])``; level 2 is ``cat[x, h]`` after the /16 Focus stage, level 3 the fused
        /32 map that the head reads (dense models: each level through :meth:`_output`)."""
        feats: list[torch.Tensor] = []
        x = self.patch_embed1(x)
        for blk in self.blocks1:
            x = blk(x) if torch.jit.is_scripting() else self._run(blk, x)
        if 0 in take:
            feats.append(self._output(0, x))
        if last == 0:
            return x, None, feats
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x) if torch.jit.is_scripting() else self._run(blk, x)
        x = self._output(1, x)  # the official dense backbones run on from the normed /8 map (their forward_features)
        if 1 in take:
            feats.append(x)
        if last == 1:
            return x, None, feats
        x = self.patch_embed3(x)
        for blk in self.blocks3:
            x = blk(x) if torch.jit.is_scripting() else self._run(blk, x)
        ctx = self.patch_embed4(x)  # Overview-Net: the /16 Base-Net map, downsampled
        for blk in self.blocks4:
            ctx = blk(ctx) if torch.jit.is_scripting() else self._run(blk, ctx)
        ctx_ori = self.high_level_proj(ctx)
        ctx_up = F.interpolate(ctx_ori, size=x.shape[2:], mode="bilinear", align_corners=False)
        h = ctx_up
        for blk in self.sub_blocks3:  # Focus-Net on the Base-Net /16 map, context re-injected every block
            x, h = blk(x, h, ctx_up) if torch.jit.is_scripting() else self._run(blk, x, h, ctx_up)
        if 2 in take:
            feats.append(self._output(2, torch.cat([x, h], 1)))
        if last == 2:
            return x, ctx, feats
        x, h = self.patch_embedx(x, h)
        for blk in self.sub_blocks4:
            x, h = blk(x, h, ctx_ori) if torch.jit.is_scripting() else self._run(blk, x, h, ctx_ori)
        x = self._output(3, torch.cat([x, h], 1), ctx)  # the fused /32 map (the official last block's output)
        if 3 in take:
            feats.append(x)
        return x, ctx, feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> fused Focus-Net map ``[N, C3 + C3/4, H/32, W/32]``."""
        return self._forward(x, [])[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.head is None:  # dense backbone: pooled features
            return x.mean((2, 3)) if self.global_pool == "avg" else x
        x = self.head[2](self.head[1](self.head[0](x)))
        if self.global_pool == "avg":
            x = x.mean((2, 3), keepdim=True)
        x = self.head[3](x)
        if not pre_logits:
            x = self.head[4](x)
        return x.flatten(1) if self.global_pool == "avg" else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, aux_logits)``, both ``[N, num_classes]``: the aux head classifies the Overview-Net
        context (deep supervision; the official loss is ``ce(logits) + AUX_LOSS_RATIO * ce(aux_logits)``)."""
        if self.aux_head is None:
            raise RuntimeError("OverLoCK.forward_with_aux: this model was built with aux_head=False")
        x, ctx, _ = self._forward(x, [])
        return self.forward_head(x), self.aux_head(ctx).flatten(1)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The four maps the official dense-prediction model reads (NCHW; ``C0``, ``C1``, ``C2 + C3/4`` and
        ``C3 + C3/4`` channels at /4, /8, /16, /32) at ``indices`` (last n if int, all if None). ``norm`` is
        accepted for API parity; OverLoCK has no final norm. Returns them, or ``(final map, them)``."""
        if output_fmt != "NCHW":
            raise ValueError(f"OverLoCK.forward_intermediates: output_fmt='{output_fmt}'; only 'NCHW' is supported")
        take, max_index = feature_take_indices(4, indices)  # four levels (feature_info: not a TorchScript type)
        final, _, feats = self._forward(x, take, max_index if stop_early or intermediates_only else 3)
        if intermediates_only:
            return feats
        return final, feats

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop what the requested intermediates do not need (and the heads)."""
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        first_unused = {0: "patch_embed3", 1: "patch_embed3", 2: "patch_embedx"}.get(max_index)
        for name in _ORDER[_ORDER.index(first_unused) :] if first_unused else ():
            setattr(self, name, nn.ModuleList() if "blocks" in name else nn.Identity())
        if self.extra_norm is not None:  # the norms of outputs nobody reads go too
            needed = set(take) | {1} | ({4} if max_index == 3 else set())  # [1] also feeds the /16 stage, [4] h_proj
            for i in range(len(self.extra_norm)):
                if i not in needed:
                    self.extra_norm[i] = nn.Identity()
            if max_index < 3:
                self.h_proj = None
        if prune_head or max_index < 3:
            self.aux_head = None
            self.reset_classifier(0, "")
        return take


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: OverLoCK) -> dict[str, torch.Tensor]:
    """Official OverLoCK checkpoints (the bare state dict, or under ``state_dict``/``model``; DDP's
    ``module.`` prefix removed; mmdet/mmseg checkpoints reduced to their ``backbone.*``) load unchanged;
    their ``aux_head.*`` is dropped when the model has no aux head (``aux_head.2.*`` when the class count
    differs, as timm drops the cfg's ``classifier`` ``head.4``). A re-parameterised checkpoint
    (``lk_origin.bias``, no ``origin_bn``) turns a not-yet-deployed ``model`` into its deploy form first;
    the reverse is an error. A dense checkpoint (``extra_norm``, detection also ``h_proj``) needs the
    matching ``dense`` model; ImageNet weights for a dense model lose their heads and the dense modules keep
    their initialisation (what the official dense recipes' non-strict load does)."""
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
    if "patch_embed1.0.weight" not in state_dict:
        raise ValueError("checkpoint is not an OverLoCK state dict: it has no 'patch_embed1.0.weight'")
    ckpt_dense = "det" if "h_proj.0.weight" in state_dict else "seg" if "extra_norm.0.weight" in state_dict else None
    if ckpt_dense is not None and ckpt_dense != model.dense:
        kind = "detection (extra_norm, h_proj)" if ckpt_dense == "det" else "segmentation (extra_norm, no h_proj)"
        raise ValueError(f"checkpoint is OverLoCK's {kind} backbone: build the model with dense='{ckpt_dense}'")
    if model.head is None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("head.", "aux_head."))}
        if ckpt_dense is None:
            state_dict.update({k: v for k, v in model.state_dict().items() if k.startswith(("extra_norm.", "h_proj."))})
    if model.aux_head is None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("aux_head.")}
    else:  # the aux classifier is not in the cfg's ``classifier``: at a new class count it starts afresh here
        own = {k: v.shape for k, v in model.state_dict().items() if k.startswith("aux_head.2.")}
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("aux_head.2.") or own.get(k) == v.shape}
    ckpt_deployed = any(k.endswith("lk_origin.bias") for k in state_dict)
    model_deployed = any(isinstance(m, DilatedReparamBlock) and m.deployed for m in model.modules())
    if ckpt_deployed and not model_deployed:
        model.reparameterize()
    elif model_deployed and not ckpt_deployed:
        raise ValueError("checkpoint has un-merged dilated branches (origin_bn, dil_*) but the model is deployed; build it with deploy=False")
    return state_dict


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.95,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed1.0",
        "classifier": "head.4",  # the optional aux head's classifier is dropped or kept by checkpoint_filter_fn
        "license": "apache-2.0",
        "paper_ids": "arXiv:2502.20087",
        "paper_name": "OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels",
        "origin_url": "https://github.com/LMMMEng/OverLoCK",
        **kwargs,
    }


_RELEASE = "https://github.com/LMMMEng/OverLoCK/releases/download/v1/overlock_{}_in1k_224{}.pth"
_CROP = dict(xt=0.925, t=0.95, s=0.95, b=0.975)
default_cfgs = generate_default_cfgs(
    {
        **{f"overlock_{v}.in1k": _cfg(url=_RELEASE.format(v, ""), crop_pct=c) for v, c in _CROP.items()},
        **{f"overlock_{v}.in1k_reparam": _cfg(url=_RELEASE.format(v, "_reparam"), crop_pct=c) for v, c in _CROP.items()},
        "test_overlock.untrained": _cfg(input_size=(3, 96, 96), pool_size=(3, 3)),
    }
)


def _create(variant: str, pretrained: bool = False, **kwargs) -> OverLoCK:
    if kwargs.get("features_only"):
        kwargs.setdefault("dense", "det")  # the official detection backbone (pass dense=None for raw levels)
    return build_model_with_cfg(
        OverLoCK,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": (0, 1, 2, 3), "feature_cls": "getter", **kwargs.pop("feature_cfg", {})},
        **kwargs,
    )


_COMMON = dict(kernel_size=(17, 15, 13, 7), mlp_ratio=(4, 4, 4, 4), sub_mlp_ratio=(3, 3))


@register_model
def overlock_xt(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-XT: 16.45 M params deployed (no aux head), 2.6 GFLOPs, 82.7 % ImageNet-1k top-1."""
    args = dict(_COMMON, depth=(2, 2, 3, 2), sub_depth=(6, 2), embed_dim=(56, 112, 256, 336), sub_num_heads=(4, 6))
    return _create("overlock_xt", pretrained, **dict(args, **kwargs))


@register_model
def overlock_t(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-T: 33.47 M params deployed (no aux head), 5.5 GFLOPs, 84.2 % ImageNet-1k top-1."""
    args = dict(_COMMON, depth=(4, 4, 6, 2), sub_depth=(12, 2), embed_dim=(64, 128, 256, 512), sub_num_heads=(4, 8))
    return _create("overlock_t", pretrained, **dict(args, **kwargs))


@register_model
def overlock_s(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-S: 56.16 M params deployed (no aux head), 9.7 GFLOPs, 84.8 % ImageNet-1k top-1."""
    args = dict(_COMMON, depth=(6, 6, 8, 3), sub_depth=(16, 3), embed_dim=(64, 128, 320, 512), sub_num_heads=(8, 16))
    return _create("overlock_s", pretrained, **dict(args, **kwargs))


@register_model
def overlock_b(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-B: 94.94 M params deployed (no aux head), 16.7 GFLOPs, 85.1 % ImageNet-1k top-1."""
    args = dict(_COMMON, depth=(8, 8, 10, 4), sub_depth=(20, 4), embed_dim=(80, 160, 384, 576), sub_num_heads=(6, 9))
    return _create("overlock_b", pretrained, **dict(args, **kwargs))


@register_model
def test_overlock(pretrained: bool = False, **kwargs) -> OverLoCK:
    """A tiny OverLoCK for tests: every mechanism of the real ones (including the small-map upsampling)."""
    args = dict(
        depth=(1, 1, 1, 1), sub_depth=(2, 1), embed_dim=(16, 32, 64, 64), kernel_size=(7, 7, 7, 5),
        mlp_ratio=(2, 2, 2, 2), sub_mlp_ratio=(2, 2), sub_num_heads=(2, 2), projection=64,
    )
    return _create("test_overlock", pretrained, **dict(args, **kwargs))
