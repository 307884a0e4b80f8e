"""``spatialcore tiny``: tiny random Qwen2.5-VL and Flux checkpoints, built offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import load_config
from .common import add_config_args, add_json, add_out, command, emit_json


def add(sub) -> None:
    p = command(sub, "tiny", help="build tiny random Qwen2.5-VL and Flux checkpoints offline",
                description="Build tiny, randomly initialised Qwen2.5-VL (reward/) and Flux (flux/) checkpoints with "
                            "locally trained tokenizers, deterministically from a seed.",
                examples=["spatialcore tiny --out runs/tiny",
                          "spatialcore tiny --out runs/tiny-deep --json runs/tiny-deep.json flux.single_layers=2 seed=1"])
    add_out(p, "output folder (gets reward/ and flux/)", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing non-empty folder")
    add_json(p, "a summary (parameters, paths)")
    add_config_args(p, "flux.single_layers=2 seed=1")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..logs import info
    from ..tiny import TinyConfig, build_tiny

    cfg = load_config(TinyConfig, args.config, args.overrides)
    out = Path(args.out)
    info(f"building tiny checkpoints (seed {cfg.seed}) into {out}", who="tiny")
    try:
        summary = build_tiny(cfg, out, overwrite=args.force)
    except FileExistsError as err:
        info(str(err), who="tiny")
        return 1
    r, f = summary["reward"], summary["flux"]
    info(f"reward: Qwen2.5-VL, {r['parameters']:,} parameters, vocab {r['vocab']} -> {r['path']}", who="tiny")
    info("flux: " + ", ".join(f"{k} {v:,}" for k, v in f["parameters"].items()) + f" parameters -> {f['path']}",
         who="tiny")
    emit_json(args.json, summary)
    return 0
