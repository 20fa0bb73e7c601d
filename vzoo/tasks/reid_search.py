"""``vzoo reid-search``: train one re-ID model per attention placement and report inference speed
against validation mAP (table, JSON and PNG), to re-derive where attention pays on the user's data."""

from __future__ import annotations

from pathlib import Path

import torch

from vzoo.atomic import save_figure, write_json_atomic

from .reid import reid_run
from .trainer import TrainSettings, train

__all__ = ["search"]


def _infer_ms(model: torch.nn.Module, size: tuple[int, int], batch: int = 32, repeats: int = 5) -> float:
    """Median eval-forward time per image (ms) on CPU."""
    from vzoo.bench import median_ms

    model = model.eval().cpu()
    x = torch.randn(batch, 3, *size)
    with torch.inference_mode():
        return median_ms(lambda: model(x), torch.device("cpu"), repeats) / batch


def search(model: str, data: str | Path, placements: list[str], *, epochs: int, batch_size: int, out: str | Path,
           size: tuple[int, int] = (256, 128), lr: float = 3.5e-4) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for placement in placements:
        run = reid_run(model, data, batch_size, size, placement=placement)
        params = sum(p.numel() for p in run.model.parameters()) / 1e6
        metrics = train(run, TrainSettings(epochs=epochs, out=out / placement.replace(":", "_").replace(",", "-"), lr=lr, eval_every=epochs))
        rows.append(dict(placement=placement, params_m=params, ms_per_image=_infer_ms(run.model, size), **metrics))
        print(f"{placement:<16} {params:6.2f}M params  {rows[-1]['ms_per_image']:7.2f} ms/image  mAP {metrics['mAP']:.3f}  rank1 {metrics['rank1']:.3f}")
    write_json_atomic(rows, out / "search.json")
    _plot(rows, out / "search.png")
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["ms_per_image"], r["mAP"])
        ax.annotate(r["placement"], (r["ms_per_image"], r["mAP"]), fontsize=8)
    ax.set_xlabel("CPU inference (ms / image)")
    ax.set_ylabel("validation mAP")
    ax.set_title("attention placement: speed vs accuracy")
    fig.tight_layout()
    save_figure(fig, path)
