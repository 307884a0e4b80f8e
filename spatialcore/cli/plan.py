"""``spatialcore plan KIND``: a run's GPU memory per rank and phase, from its config, before launch."""

from __future__ import annotations

import argparse

from ..config import ConfigError, load_config
from ..config_reference import config_class
from .common import add_config_args, add_json, command, emit_json

KINDS = ("grpo", "reward", "sft")


def add(sub) -> None:
    p = command(sub, "plan", help="GPU memory per rank and phase of a run, read from its config before launch",
                description="Build every model of a trainer's config on the meta device (no weights, no GPU), replay "
                            "one iteration's phases at the config's shapes and this rank's share of the batch, and print "
                            "each phase's peak of allocated memory with the verdict for the GPU size. Exit 0 when it "
                            "fits, 1 when it does not. Models: local folders, random:SHAPE, and the reference configs' "
                            "hub ids (no download).",
                examples=["spatialcore plan grpo --config configs/grpo/tiny_cpu_grid.yaml "
                          "reward.spatialscore.model=random:tiny-qwen --gpus 1 --gpu-memory 24",
                          "spatialcore plan sft --config configs/sft/tiny_cpu_grid_perfect.yaml --json -"])
    p.add_argument("kind", choices=KINDS, help="which trainer's config")
    p.add_argument("--gpus", type=int, default=1, help="ranks the run is launched on (default 1)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory of one GPU (default 80)")
    add_json(p, "the plan")
    add_config_args(p, "sample_batch=4 micro_batch=1")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..plan import plan_run

    if args.gpus < 1:
        raise ConfigError("--gpus", f"must be >= 1, got {args.gpus}")
    cfg = load_config(config_class(args.kind), args.config, args.overrides)
    plan = plan_run(args.kind, cfg, world=args.gpus, gpu_gib=args.gpu_memory)
    if not emit_json(args.json, plan.to_dict()):
        print(plan.markdown(), end="")
    return 0 if plan.to_dict()["fits"] else 1
