"""``spatialcore bench|profile SUITE``: benchmarks with same-run baselines, and profiles."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_out, command, device_of

SUITES = {
    "score": "SpatialScore vs the stock path",
    "sample": "Flux eager vs compiled / float8",
    "grpo": "one Spatial-RL step",
    "kernels": "the Triton kernels against their references and baselines",
    "logprob": "stored vs recomputed SDE log-probs",
}
PROFILED = ["score", "sample", "grpo"]


def add(sub) -> None:
    for name, helptext in (("bench", "benchmarks with same-run baselines -> JSON + Markdown"),
                           ("profile", "torch.profiler trace, top ops, NVTX phases, NVML timeline")):
        suites = list(SUITES) if name == "bench" else PROFILED
        p = command(sub, name, help=helptext,
                    description=("Benchmark" if name == "bench" else "Profile") + " a suite: "
                    + ", ".join(f"{s} ({SUITES[s]})" for s in suites) + ". --shape full builds FLUX.1-dev / "
                    "Qwen2.5-VL-7B shapes with random weights on the GPU; --shape tiny runs the tiny models anywhere. "
                    "key=value sets a suite parameter (an unknown key is refused with the list of known ones).",
                    examples=[f"spatialcore {name} score --tiny runs/tiny --reps 1 --warmup 0 --out runs/{name}-score",
                              f"spatialcore {name} grpo --tiny runs/tiny --reps 1 --warmup 0 group_size=4 top_k=1 "
                              f"--out runs/{name}-grpo"])
        p.add_argument("suite", choices=suites)
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="suite parameter, e.g. batch=8 or sizes=[512] (the suite's defaults: profiling/suites.py)")
        p.add_argument("--shape", choices=["tiny", "full"], default="tiny")
        add_out(p, f"where the results go (default runs/{name})", default=f"runs/{name}")
        p.add_argument("--tiny", metavar="DIR", help="tiny checkpoints (default: build them in a temp folder)")
        p.add_argument("--device", default=None, help="default: cuda when available")
        p.add_argument("--reps", type=int, default=5 if name == "bench" else 1)
        p.add_argument("--warmup", type=int, default=2 if name == "bench" else 1)
        p.set_defaults(func=bench if name == "bench" else profile)


def _suite_run(args: argparse.Namespace, emit=None):
    """(callable running the suite -> (rows, info), device) for bench and profile."""
    import torch

    from ..profiling.suites import suite_runner

    device = torch.device(device_of(args.device))
    return suite_runner(args.suite, args.shape, device, tiny=args.tiny, overrides=args.overrides, reps=args.reps,
                        warmup=args.warmup, out=Path(args.out), emit=emit), device


def bench(args: argparse.Namespace) -> int:
    from ..logs import info
    from ..profiling import bench as suites

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env: dict = {}

    def write(rows, setup) -> str:
        data = suites.to_json(args.suite, rows, setup, env)
        (out / f"{args.suite}.json").write_text(json.dumps(data, indent=2) + "\n")
        md = suites.to_markdown(data)
        (out / f"{args.suite}.md").write_text(md)
        return md

    run, device = _suite_run(args, emit=write)
    env.update(suites.environment(device))
    print(write(*run()))
    info(f"-> {out / (args.suite + '.json')}, {out / (args.suite + '.md')}", who="bench")
    return 0


def profile(args: argparse.Namespace) -> int:
    from ..logs import info
    from ..profiling.profile import run_profile

    run, _ = _suite_run(args)
    out = Path(args.out)
    summary = run_profile(run, out, title=f"{args.suite} ({args.shape})")
    info(f"{summary['wall_s']:.2f} s profiled -> {out / 'trace.json'}, {out / 'profile.md'}", who="profile")
    return 0
