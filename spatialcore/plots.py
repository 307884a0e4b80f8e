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


def samples_per_iteration(folder: Path) -> int:
    """Generated samples per iteration of a grpo run folder (all ranks): ``group_size x prompts_per_iter`` of its
    ``config.yaml``."""
    import yaml

    cfg = Path(folder) / "config.yaml"
    if not cfg.is_file():
        raise ValueError(f"{cfg} is missing (the samples axis needs the run's group_size and prompts_per_iter)")
    data = yaml.safe_load(cfg.read_text()) or {}
    return int(data["group_size"]) * int(data["prompts_per_iter"])


def time_to_gain(recs: list[dict], key: str, gain: float, per_iteration: int) -> dict:
    """Where a run's ``key`` first reaches its step-0 value + ``gain``: ``{"start", "best", "reached", "step",
    "samples", "seconds"}`` (the last three None when it never does)."""
    if not recs or recs[0]["step"] != 0:
        raise ValueError(f"the '{key}' records start at step {recs[0]['step'] if recs else None}, not 0: no "
                         "start value to measure a gain from")
    start = recs[0][key]
    hit = next((r for r in recs if r[key] >= start + gain - 1e-12), None)
    return {"start": start, "best": max(r[key] for r in recs), "reached": hit is not None,
            "step": hit["step"] if hit else None, "samples": hit["step"] * per_iteration if hit else None,
            "seconds": hit["elapsed_s"] if hit else None}


def compare_runs(runs: dict[str, list[Path]] | dict[str, Path], path: Path, *, key: str = "eval_reward",
                 gain: float | None = None) -> tuple[Path, str]:
    """One PNG with ``key`` of several runs against generated samples and training seconds; runs sharing a label
    (seeds of one recipe) share a colour. With ``gain``: a Markdown table of the samples and seconds each run took
    to first reach its step-0 value + ``gain`` (and the mean per label over the seeds that reached it), also
    written beside the PNG as ``.md``. Returns (PNG path, table or "")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .logs import read_metrics

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110, sharey=True)
    rows = []
    for n, (label, folders) in enumerate(runs.items()):
        folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
        colour = f"C{n % 10}"
        results = []
        for j, folder in enumerate(folders):
            recs = [r for r in read_metrics(Path(folder) / "metrics.jsonl") if key in r]
            if not recs:
                raise ValueError(f"{folder} has no '{key}' records")
            per_it = samples_per_iteration(folder)
            kw = {"color": colour, "label": label if j == 0 else None, "alpha": 0.9 if len(folders) == 1 else 0.6}
            axes[0].plot([r["step"] * per_it for r in recs], [r[key] for r in recs], **kw)
            axes[1].plot([r["elapsed_s"] for r in recs], [r[key] for r in recs], **kw)
            if gain is not None:
                results.append((folder, time_to_gain(recs, key, gain, per_it)))
        for folder, t in results:
            where = (f"{t['samples']:,} | {t['seconds']:.0f}" if t["reached"] else "not reached | not reached")
            rows.append(f"| {label} | {Path(folder).name} | {t['start']:.3f} | {t['best']:.3f} | {where} |")
        if len(results) > 1:
            hit = [t for _, t in results if t["reached"]]
            mean = (f"{sum(t['samples'] for t in hit) / len(hit):,.0f} | "
                    f"{sum(t['seconds'] for t in hit) / len(hit):.0f}") if hit else "- | -"
            rows.append(f"| **{label}** | mean of the {len(hit)} of {len(results)} that reached it | "
                        f"{sum(t['start'] for _, t in results) / len(results):.3f} | "
                        f"{sum(t['best'] for _, t in results) / len(results):.3f} | {mean} |")
    axes[0].set_xlabel("generated samples")
    axes[1].set_xlabel("training seconds")
    axes[0].set_ylabel(key.replace("_", " "))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
        if gain is not None:
            ax.set_title(f"to +{gain:g} over the start", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    table = ""
    if gain is not None:
        table = (f"| run | folder | {key} at step 0 | best | samples to +{gain:g} | seconds to +{gain:g} |\n"
                 "|---|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")
        path.with_suffix(".md").write_text(table)
    return path, table
