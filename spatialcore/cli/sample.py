"""``spatialcore sample``: generate images with a Flux checkpoint (+ a trained policy)."""

from __future__ import annotations

import argparse

from ..config import ConfigError, from_dict
from .common import add_out, command, device_of


def add(sub) -> None:
    p = command(sub, "sample", help="generate images with a Flux checkpoint (+ a trained policy)",
                description="Sample images from prompts with any Flux checkpoint, optionally with a trained policy "
                            "(LoRA or full transformer from `grpo train`); writes PNGs and samples.jsonl.",
                examples=["spatialcore sample --model assets/tiny_generator --prompt \"the red circle is left of the "
                          "blue square\" -n 2 --size 32 --steps 12 --out runs/sample-quick",
                          "spatialcore sample --model assets/tiny_generator --seed 7 "
                          "--prompts-file configs/prompts/easy_grid_examples.txt -n 1 --size 32 --steps 12 --sde "
                          "--dtype float32 --out runs/sample-policy"])
    p.add_argument("--model", required=True, metavar="DIR|HUB_ID", help="Flux pipeline")
    p.add_argument("--lora", metavar="DIR", help="policy folder written by grpo train (out/policy)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE", help="one prompt per line, or JSON Lines (.jsonl) with a "
                                                          "'prompt' field")
    add_out(p, "where the PNGs and samples.jsonl go", required=True)
    p.add_argument("-n", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sde", action="store_true", help="stochastic (SDE) sampling instead of the ODE")
    p.add_argument("--compile", choices=["none", "regional", "full"], default="none")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..paths import require, require_policy
    from ..rl.sampler import SamplerConfig
    from ..sample import sample_to_folder

    scfg = from_dict(SamplerConfig, {"steps": args.steps, "image_size": args.size, "guidance": args.guidance,
                                     "compile": args.compile}, "sample")
    scfg.check()
    prompts = list(args.prompt)
    if args.prompts_file:
        from ..data.prompts import read_prompts

        prompts += read_prompts(args.prompts_file, "--prompts-file")
    if not prompts:
        raise ConfigError("prompt", "give --prompt and/or --prompts-file")
    require(args.model, "--model", "flux", hub=True)
    require_policy(args.lora, "--lora")
    sample_to_folder(args.model, prompts, args.out, n=args.n, seed=args.seed, sampler_cfg=scfg, sde=args.sde,
                     lora=args.lora, dtype=getattr(torch, args.dtype), device=device_of(args.device))
    return 0
