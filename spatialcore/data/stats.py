"""Summary statistics of a pair set: splits, relations per prompt, perturbations, prompt length."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .pairs import scan_pair_set
from .scene import parse_prompt


def pair_set_stats(folder: str | Path) -> dict:
    records, problems = scan_pair_set(folder, check_images=False)
    rel_counts = Counter()
    rel_types = Counter()
    for r in records:
        rels = parse_prompt(r.prompt)
        rel_counts[len(rels)] += 1
        rel_types.update(x.type for x in rels)
    words = [len(r.prompt.split()) for r in records]
    return {
        "pairs": len(records),
        "bad_records": len({p.line for p in problems if p.severity == "error"}),
        "splits": dict(Counter(r.split for r in records)),
        "relations_per_prompt": dict(sorted(rel_counts.items())),
        "relation_types": dict(rel_types.most_common()),
        "n_perturbations": dict(sorted(Counter(r.n_perturbations for r in records).items())),
        "perturbation_types": dict(Counter(p for r in records for p in r.perturbations).most_common()),
        "prompt_words": {"min": min(words, default=0), "mean": sum(words) / max(1, len(words)),
                         "max": max(words, default=0)},
        "_words": words,
    }


def format_stats(stats: dict) -> str:
    lines = [f"pairs: {stats['pairs']}  (bad records skipped: {stats['bad_records']})"]
    for key in ("splits", "relations_per_prompt", "relation_types", "n_perturbations", "perturbation_types"):
        lines.append(f"{key.replace('_', ' ')}: " + ", ".join(f"{k}={v}" for k, v in stats[key].items()))
    w = stats["prompt_words"]
    lines.append(f"prompt words: min {w['min']}, mean {w['mean']:.1f}, max {w['max']}")
    return "\n".join(lines)


def plot_stats(stats: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7), dpi=100)
    panels = [("splits", "pairs per split"), ("relations_per_prompt", "relations per prompt"),
              ("relation_types", "relation types"), ("perturbation_types", "perturbation operations"),
              ("n_perturbations", "violated relations per pair")]
    for ax, (key, title) in zip(axes.flat[:5], panels, strict=True):
        data = stats[key]
        ax.bar([str(k) for k in data], list(data.values()), color="#4477aa")
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=30)
    ax = axes.flat[5]
    ax.hist(stats["_words"], bins=30, color="#aa7744")
    ax.set_title("prompt length (words)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
