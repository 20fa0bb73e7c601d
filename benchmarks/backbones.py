"""vzoo backbones against plain re-implementations of the official semantics (same weights) and against
timm models of similar FLOPs: training-step and inference times, peak memory.

- BiFormer-T vs the gather-based BRA (and the official code with --official-repo), swin_tiny,
  convnextv2_nano, pvt_v2_b1;
- OverLoCK-T vs the unfold-based ContMix of the official no-NATTEN path, convnext_tiny, biformer_small.

    python benchmarks/backbones.py                 # CPU, fp32, batch 8, 224 x 224, both families
    python benchmarks/backbones.py --family overlock
    python benchmarks/backbones.py --official-repo ~/src/BiFormer   # also the official BiFormer code

Times are medians over interleaved rounds in one process; peak memory is measured per model and mode
in a fresh child process (the process high-water mark around one step).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import timm
import torch

import vzoo  # noqa: F401  (registers the timm models)
from vzoo.bench import backbone_rows, format_models, peak_memory_mb, rows_as_dicts

ROOT = Path(__file__).resolve().parents[1]
GATHER = "biformer_tiny (gather re-impl.)"
OFFICIAL = "biformer_tiny (official code)"
VZOO = "biformer_tiny (vzoo)"
BASELINES = ("swin_tiny_patch4_window7_224", "convnextv2_nano", "pvt_v2_b1")
OVERLOCK = "overlock_t (vzoo)"
UNFOLD = "overlock_t (unfold re-impl.)"
OVERLOCK_BASELINES = ("convnext_tiny", "biformer_small")


def _official(name: str = "official_biformer"):
    """An independent re-implementation kept with the fidelity tests (official key layout)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"tests/backbones/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _official_code(repo: str):
    """``models.biformer.BiFormer`` from a checkout of rayleizhu/BiFormer (not part of vzoo). Its
    ``fairscale`` import only serves activation checkpointing, unused here, so it is stubbed."""
    import types

    for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["fairscale.nn.checkpoint"].checkpoint_wrapper = lambda module: module
    sys.path.insert(0, str(Path(repo).expanduser()))
    from models.biformer import BiFormer  # noqa: PLC0415  (the official repository's module)

    return BiFormer(
        depth=[2, 2, 8, 2], embed_dim=[64, 128, 256, 512], mlp_ratios=[3, 3, 3, 3], n_win=7,
        kv_downsample_mode="identity", kv_per_wins=[-1, -1, -1, -1], topks=[1, 4, 16, -2], side_dwconv=5,
        before_attn_dwconv=3, layer_scale_init_value=-1, qk_dims=[64, 128, 256, 512], head_dim=32,
        param_routing=False, diff_routing=False, soft_routing=False, pre_norm=True, pe=None,
    )


def overlock_factories() -> dict:
    def official_layout():
        torch.manual_seed(0)
        return _official("official_overlock").OverLoCK(
            depth=(4, 4, 6, 2), sub_depth=(12, 2), dims=(64, 128, 256, 512), kernels=(17, 15, 13, 7), sub_heads=(4, 8)
        )

    def unfold():
        return _Logits(official_layout())

    def ours():
        # the very same weights, loaded through the official-checkpoint path (aux head dropped: unused)
        model = timm.create_model("overlock_t")
        model.load_state_dict(vzoo.backbones.overlock.checkpoint_filter_fn(official_layout().state_dict(), model))
        return model

    made = {OVERLOCK: ours, UNFOLD: unfold}
    made.update({name: (lambda name=name: timm.create_model(name)) for name in OVERLOCK_BASELINES})
    return made


def factories(official_repo: str | None = None) -> dict:
    def gather():
        torch.manual_seed(0)
        return _official().official_model("biformer_tiny")

    def ours():
        # the very same weights as the gather model, loaded through the official-checkpoint path
        model = timm.create_model("biformer_tiny")
        model.load_state_dict(vzoo.backbones.biformer.checkpoint_filter_fn(gather().state_dict(), model))
        return model

    made = {VZOO: ours, GATHER: gather}
    if official_repo:

        def official():
            model = _official_code(official_repo)
            model.load_state_dict(gather().state_dict())  # the same weights; official key layout
            return model

        made[OFFICIAL] = official
    made.update({name: (lambda name=name: timm.create_model(name)) for name in BASELINES})
    return made


class _Logits(torch.nn.Module):
    """The unfold re-implementation without its aux head (vzoo's models have none by default): logits only."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        del model.aux_head
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.features(x)[0][-1]).flatten(1)


def _family(made: dict, vzoo_name: str, refs: tuple[str, ...], a: argparse.Namespace) -> list:
    amp = getattr(torch, a.amp) if a.amp else None
    rows = backbone_rows(made, batch=a.batch, size=a.size, repeats=a.repeats, device=a.device, amp=amp)
    for row in rows if a.device == "cpu" else ():  # CUDA peaks are measured in-process
        for mode in ("train", "eval"):
            cmd = [sys.executable, __file__, "--memory", row.name, mode, "--batch", str(a.batch), "--size", str(a.size)]
            cmd += ["--official-repo", a.official_repo] if a.official_repo else []
            mb = float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])
            setattr(row, f"{mode}_mb", mb)
    print(f"batch {a.batch}, {a.size}x{a.size}, {a.amp or 'fp32'} on {a.device}, {torch.get_num_threads()} threads, median of {a.repeats}")
    print(format_models(rows, vzoo_name))
    by = {r.name: r for r in rows}
    ours = by[vzoo_name]
    for base in refs:
        if base not in by:
            continue
        ref = by[base]
        checks = [
            ("train step", ref.train_ms / ours.train_ms, 2.0, "x faster"),
            ("eval forward", ref.eval_ms / ours.eval_ms, 1.5, "x faster"),
            ("train peak memory", (ours.train_mb or 0) / (ref.train_mb or 1), 0.6, "of it (at most)"),
        ]
        for name, got, bar, unit in checks:
            ok = got <= bar if "memory" in name else got >= bar
            print(f"{'PASS' if ok else 'FAIL'} {name} vs {base}: {got:.2f} {unit} (bar {bar})")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="all", choices=["all", "biformer", "overlock"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", choices=["bfloat16", "float16"], help="autocast dtype (default: fp32)")
    p.add_argument("--official-repo", metavar="PATH", help="checkout of rayleizhu/BiFormer: time its code too")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--memory", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)  # child process
    a = p.parse_args()
    if a.memory:
        made = {**factories(a.official_repo), **overlock_factories()}
        print(peak_memory_mb(made[a.memory[0]], a.memory[1], a.batch, a.size))
        return
    rows = []
    if a.family in ("all", "biformer"):
        rows += _family(factories(a.official_repo), VZOO, (OFFICIAL, GATHER), a)
    if a.family in ("all", "overlock"):
        rows += _family(overlock_factories(), OVERLOCK, (UNFOLD,), a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"backbones{'' if a.family == 'all' else '_' + a.family}.json").write_text(json.dumps(rows_as_dicts(rows), indent=1))


if __name__ == "__main__":
    main()
