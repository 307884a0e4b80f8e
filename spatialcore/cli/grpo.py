"""``spatialcore grpo train|compare``: Spatial-RL, GRPO with Top-k filtering on Flux."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ConfigError, load_config
from .common import add_out, add_trainer_args, command, emit_json, group, train_overrides


def add(sub) -> None:
    gsub = group(sub, "grpo", help="Spatial-RL: GRPO with Top-k filtering on Flux",
                 description="Spatial-RL: online GRPO with Top-k filtering on a Flux generator.")
    g = command(gsub, "train", help="train a LoRA (or full) policy (torchrun for several processes)",
                description="GRPO on Flux with SDE sampling, group advantages with Top-k filtering and the "
                            "Flow-GRPO clipped loss; resumes from the run folder's latest checkpoint.",
                examples=["spatialcore grpo train --config configs/grpo/tiny_cpu_grid_oracle.yaml iterations=2 "
                          "group_size=4 top_k=1 eval_seeds=2 eval_every=2 --out runs/grpo-quick",
                          "spatialcore grpo train --config configs/grpo/tiny_cpu_grid_oracle.yaml iterations=2 "
                          "group_size=4 top_k=null eval_seeds=2 eval_every=2 --out runs/grpo-quick-all "
                          "--json runs/grpo-quick-all/final.json",
                          "spatialcore grpo train --config configs/grpo/tiny_cpu_grid.yaml "
                          "reward.spatialscore.model=runs/reward-quick/model iterations=1 group_size=4 top_k=1 "
                          "eval_seeds=1 eval_every=1 --out runs/grpo-quick-ss"])
    add_trainer_args(g, result="the final metrics", example="optim.lr=1e-4 top_k=null")
    g.set_defaults(func=train)
    g = command(gsub, "compare", help="plot held-out reward of several runs per sample and per second",
                description="One PNG comparing runs (e.g. Top-k vs its ablation, GRPO vs NFT) against generated "
                            "samples and training wall-clock seconds; runs given the same LABEL are seeds of one "
                            "recipe (one colour). --gain also tabulates the samples and seconds each run took to "
                            "first gain that much over its step-0 evaluation (beside the PNG as .md).",
                examples=["spatialcore grpo compare top-k=runs/grpo-quick all=runs/grpo-quick-all "
                          "--out runs/compare.png",
                          "spatialcore grpo compare runs/grpo-quick runs/grpo-quick-all --key eval_relation_acc "
                          "--gain 0.1 --out runs/compare-relation.png"])
    g.add_argument("runs", nargs="+", metavar="[LABEL=]RUN_DIR")
    add_out(g, "the PNG to write", required=True)
    g.add_argument("--key", default="eval_reward", help="metric to plot (default eval_reward)")
    g.add_argument("--gain", type=float, default=None,
                   help="also tabulate samples and seconds to the step-0 value + GAIN (e.g. 0.1: +10 points)")
    g.set_defaults(func=compare)


def train(args: argparse.Namespace) -> int:
    from ..paths import require
    from ..trainers.grpo import GRPOTrainConfig
    from ..trainers.grpo import train as run_training

    cfg = load_config(GRPOTrainConfig, args.config, train_overrides(args))
    require(cfg.model, "model", "flux", hub=True)
    if "spatialscore" in cfg.reward.parts():
        require(cfg.reward.spatialscore.model, "reward.spatialscore.model", "spatialscore")
    final = run_training(cfg)
    if final:
        emit_json(args.json, {k: v for k, v in final.items() if not isinstance(v, list)})
    return 0


def compare(args: argparse.Namespace) -> int:
    from ..plots import compare_runs

    runs: dict[str, list[Path]] = {}
    for item in args.runs:
        label, _, folder = item.rpartition("=")
        folder = Path(folder)
        if not (folder / "metrics.jsonl").is_file():
            raise ConfigError(item, f"{folder} has no metrics.jsonl (expected a grpo run folder)")
        runs.setdefault(label or folder.name, []).append(folder)
    try:
        png, table = compare_runs(runs, Path(args.out), key=args.key, gain=args.gain)
    except ValueError as err:  # a run without that metric, a config, or a step-0 evaluation
        raise ConfigError("--key" if "records" in str(err) else "runs", str(err)) from None
    print(png)
    if table:
        print(table, end="")
    return 0
