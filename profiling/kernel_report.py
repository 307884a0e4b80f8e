"""Turn the kernel benchmark JSON into the compact target table the GPU check prints last.

    python -m spatialcore.profiling.kernel_report bench.json

Targets (kernels issue, measured on H100/H200, same-run baselines):
  advantages G=24, P=48 and 65,536: >= 10x TRL-style eager, >= 2x torch.compile(reference),
      <= 10 us per call at P=48 (CUDA graphs)
  SDE step 24x4096x64 bf16: >= 80% of copy bandwidth for the same bytes, >= 3x the eager formula
  reward head + pair loss fwd+bwd 48x1024x3584 bf16: >= 2x eager
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows(results: list[dict], group_prefix: str) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for r in results:
        if r["group"].startswith(group_prefix):
            out.setdefault(r["group"], {})[r["name"]] = r
    return out


def evaluate(data: dict) -> list[tuple[str, str, str, str]]:
    """(target, measured, verdict, note) rows."""
    res = data["results"]
    rows = []
    for group, impls in _rows(res, "advantages").items():
        fast = min((impls[k] for k in ("triton", "cuda") if k in impls), key=lambda r: r["median_us"], default=None)
        if fast is None:
            continue
        trl, comp = impls.get("trl_style"), impls.get("compiled_reference")
        if trl:
            ratio = trl["median_us"] / fast["median_us"]
            rows.append((f"{group}: >=10x TRL-style", f"{ratio:.1f}x ({fast['name']} {fast['median_us']:.2f} us)",
                         "met" if ratio >= 10 else "missed", ""))
        if comp:
            ratio = comp["median_us"] / fast["median_us"]
            rows.append((f"{group}: >=2x compiled ref", f"{ratio:.1f}x", "met" if ratio >= 2 else "missed", ""))
        if group.endswith("P=48"):
            rows.append((f"{group}: <=10 us/call", f"{fast['median_us']:.2f} us",
                         "met" if fast["median_us"] <= 10 else "missed", "graphed" if fast.get("graphed") else ""))
    for group, impls in _rows(res, "sde_step").items():
        k, floor, eager = impls.get("triton"), impls.get("copy_floor"), impls.get("eager_reference")
        if k and floor:
            frac = floor["median_us"] / k["median_us"]
            gbs = k["bytes"] / (k["median_us"] * 1e-6) / 1e9
            rows.append((f"{group}: >=80% copy bandwidth", f"{frac * 100:.0f}% ({gbs:.0f} GB/s)",
                         "met" if frac >= 0.8 else "missed", ""))
        if k and eager:
            ratio = eager["median_us"] / k["median_us"]
            rows.append((f"{group}: >=3x eager", f"{ratio:.1f}x", "met" if ratio >= 3 else "missed", ""))
    for group, impls in _rows(res, "head+pair").items():
        k, eager = impls.get("triton"), impls.get("eager_reference")
        if k and eager:
            ratio = eager["median_us"] / k["median_us"]
            rows.append((f"{group}: >=2x eager", f"{ratio:.1f}x", "met" if ratio >= 2 else "missed", ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m spatialcore.profiling.kernel_report BENCH_JSON", file=sys.stderr)
        return 2
    data = json.loads(Path(argv[0]).read_text())
    print(f"device: {data['device']}  torch {data['torch']}")
    print(f"{'implementation':<44} {'median us':>10} {'p10-p90':>16}")
    for r in data["results"]:
        print(f"{r['group'][:24] + ' ' + r['name']:<44} {r['median_us']:>10.2f} "
              f"{r['p10_us']:>7.1f}-{r['p90_us']:<8.1f}")
    rows = evaluate(data)
    if rows:
        print(f"\n{'target':<52} {'measured':<30} verdict")
        for target, measured, verdict, note in rows:
            print(f"{target:<52} {measured:<30} {verdict} {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
