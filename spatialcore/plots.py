"""PNG figures: image grids, metric curves and the comparison of runs (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw


def image_grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str] | None, path: str | Path,
               *, cell: int | None = None, label_width: int = 260) -> Path:
    """Save a grid with one row per group (e.g. one prompt's G samples), labelled on the left."""
    path = Path(path)
    cell = cell or max(im.width for row in rows for im in row)
    ncol = max(len(r) for r in rows)
    lw = label_width if labels else 0
    grid = Image.new("RGB", (lw + ncol * cell, len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        if labels:
            draw.text((4, r * cell + cell // 2 - 6), labels[r], fill=(0, 0, 0))
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((cell, cell)), (lw + c * cell, r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def curves(series: dict[str, Sequence[tuple[float, float]]], path: str | Path, *, xlabel: str = "step",
           ylabel: str = "", title: str = "") -> Path:
    """Plot named (x, y) series on one axis and save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def compare_runs(runs: dict[str, Path], path: Path, *, key: str = "eval_reward") -> Path:
    """One PNG with the held-out reward of several runs against iterations and training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .logs import read_metrics

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110, sharey=True)
    for label, folder in runs.items():
        recs = [r for r in read_metrics(Path(folder) / "metrics.jsonl") if key in r]
        if not recs:
            raise ValueError(f"{folder} has no '{key}' records")
        axes[0].plot([r["step"] for r in recs], [r[key] for r in recs], label=label)
        axes[1].plot([r["elapsed_s"] for r in recs], [r[key] for r in recs], label=label)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("training seconds")
    axes[0].set_ylabel(key.replace("_", " "))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
