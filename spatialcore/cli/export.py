"""``spatialcore export``: a diffusers-loadable generator from any checkpoint of a grpo or sft run."""

from __future__ import annotations

import argparse

from .common import add_out, command


def add(sub) -> None:
    p = command(sub, "export", help="a diffusers-loadable generator from any checkpoint of a grpo or sft run",
                description="Write the policy of a grpo run (LoRA file, or transformer/) or the pipeline of an sft "
                            "run from CHECKPOINT: a run folder (its newest complete checkpoint) or one of its "
                            "checkpoints/step_N folders.",
                examples=["spatialcore export runs/grpo-quick --out runs/grpo-quick-export",
                          "spatialcore export runs/sft-quick-lora/checkpoints/step_00000002 --merged "
                          "--out runs/sft-quick-lora-2"])
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    add_out(p, "the exported policy or pipeline folder", required=True)
    p.add_argument("--merged", action="store_true", help="LoRA: also write transformer/ with the adapter folded in")
    p.add_argument("--no-ema", action="store_true", help="the raw weights even when the run kept an EMA")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export import export
    from ..logs import info

    info(export(args.checkpoint, args.out, merged=args.merged, ema=not args.no_ema), who="export")
    return 0
