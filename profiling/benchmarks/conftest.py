"""pytest-benchmark setup for the kernel microbenchmarks.

On CPU pytest-benchmark times the PyTorch paths directly. On CUDA every candidate is also
timed per call with CUDA events over CUDA-graph replays (``profiling.timing.time_op``); a
table of per-call medians with the ratio against the group's baseline is printed last, and
written as JSON to ``$SPATIALCORE_BENCH_JSON`` when set.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from spatialcore.profiling.timing import capture_graph, time_op

RESULTS: list[dict] = []


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def measure(benchmark, device):
    """measure(group, name, fn, baseline=False, **info): time ``fn`` both ways and record it."""

    def run(group: str, name: str, fn, *, baseline: bool = False, **info):
        benchmark.group = group
        benchmark.name = name
        t = time_op(fn, device=device, reps=30 if device == "cuda" else 10, inner=50 if device == "cuda" else 3)
        if device == "cuda":
            graph = capture_graph(fn, 50)
            chunk = graph.replay if graph is not None else (lambda: [fn() for _ in range(50)])
            benchmark.pedantic(lambda: (chunk(), torch.cuda.synchronize()), rounds=20, warmup_rounds=2)
            info["pytest_benchmark_unit"] = "50 calls + 1 sync per round"
        else:
            benchmark(fn)
        benchmark.extra_info.update({"per_call_us": t.median_us, "p10_us": t.p10_us, "p90_us": t.p90_us,
                                     "graphed": t.graphed, **info})
        RESULTS.append({"group": group, "name": name, "baseline": baseline, "device": device, **t.as_dict(), **info})

    return run


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("spatialcore kernel benchmarks (per call, median)")
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    tr.write_line(f"device: {dev}; torch {torch.__version__}")
    tr.write_line(f"{'group':<34} {'implementation':<28} {'median us':>10} {'p10-p90 us':>18} {'speed-up':>9}")
    groups: dict[str, list[dict]] = {}
    for row in RESULTS:
        groups.setdefault(row["group"], []).append(row)
    for group, rows in groups.items():
        base = next((r for r in rows if r["baseline"]), rows[0])
        for r in rows:
            ratio = base["median_us"] / r["median_us"]
            spread = f"{r['p10_us']:.1f}-{r['p90_us']:.1f}"
            extra = f"  {r['note']}" if r.get("note") else ""
            tr.write_line(f"{group:<34} {r['name']:<28} {r['median_us']:>10.2f} {spread:>18} {ratio:>8.2f}x{extra}")
    path = os.environ.get("SPATIALCORE_BENCH_JSON")
    if path:
        with open(path, "w") as fh:
            json.dump({"device": dev, "torch": torch.__version__, "results": RESULTS}, fh, indent=2)
