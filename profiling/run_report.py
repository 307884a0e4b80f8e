"""A run folder's numbers as one Markdown table (what the GPU check records per trainer): how many starts it took
(a resume is a second one), steps, seconds per step, the peak GPU memory of each phase, the last evaluation.

    python -m spatialcore.profiling.run_report RUN_DIR [TITLE]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def report(run: Path, title: str | None = None) -> str:
    from ..logs import read_metrics

    if not (run / "metrics.jsonl").is_file():
        return f"### {title or run.name}\n\nno metrics.jsonl: the run did not start (see its log)\n"
    recs = read_metrics(run / "metrics.jsonl")
    starts = json.loads((run / "run.json").read_text())["starts"] if (run / "run.json").is_file() else []
    train = [r for r in recs if r.get("step", 0) > 0 and "elapsed_s" in r and any(
        k in r for k in ("loss", "reward_mean"))]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(train, train[1:], strict=False) if b["step"] == a["step"] + 1]
    rows = [("starts (a resume adds one)", len(starts)), ("steps recorded", len(train)),
            ("seconds per step (median of consecutive steps)", f"{statistics.median(times):.2f}" if times else "n/a")]
    for key in sorted({k for r in recs for k in r if k.startswith("mem_") or k == "gpu_mem_gib"}):
        rows.append((f"peak {key.removeprefix('mem_').removesuffix('_gib')} (GiB)", f"{max(r[key] for r in recs if key in r):.1f}"))
    last = next((r for r in reversed(recs) if any(k.startswith("eval_") for k in r)), {})
    rows += [(k, f"{v:.4g}") for k, v in last.items() if k.startswith("eval_") and isinstance(v, (int, float))]
    head = f"### {title or run.name}\n\n| | |\n|---|---|\n"
    return head + "".join(f"| {k} | {v} |\n" for k, v in rows)


if __name__ == "__main__":
    print(report(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None))
