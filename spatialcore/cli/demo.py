"""``spatialcore demo``: the paper in miniature, end to end on tiny CPU models."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import load_config
from .common import add_config_args, add_out, command


def add(sub) -> None:
    p = command(sub, "demo", help="the paper in miniature, end to end on tiny CPU models",
                description="Pretrained tiny generator -> synthetic pairs -> SpatialScore -> Spatial-RL (GRPO + "
                            "Top-k) rewarded by it -> `spatialcore eval` of base and policy on held-out prompts; "
                            "writes REPORT.md. With the defaults (`make demo`) it takes about 15 min on 2 cores; "
                            "configs/demo/smoke.yaml runs every stage in about a minute (its numbers mean nothing).",
                examples=["spatialcore demo --config configs/demo/smoke.yaml --out runs/demo-smoke",
                          "spatialcore config show demo"])
    add_out(p, "run folder (default runs/demo)", default="runs/demo")
    add_config_args(p, "grpo.iterations=100 seed=1")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_demo

    cfg = load_config(DemoConfig, args.config, args.overrides)
    return run_demo(cfg, Path(args.out))
