"""``spatialcore data synth|judged|validate|stats``: synthetic spatial pairs, pairs of a generator's judged samples,
and checks of any pair set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError, load_config
from .common import add_config_args, add_json, add_out, command, emit_json, group


def add(sub) -> None:
    dsub = group(sub, "data", help="synthetic spatial pairs: make, validate, summarise",
                 description="Synthetic SpatialReward pairs and pair-set tools.")
    d = command(dsub, "synth", help="render a synthetic pair set",
                description="Render N (perfect, perturbed) image pairs with prompts into DIR (pairs.jsonl + "
                            "images/), deterministically from --seed.",
                examples=["spatialcore data synth --difficulty easy_grid --pairs 40 --out runs/pairs-grid",
                          "spatialcore data synth --difficulty hard --pairs 20 --size 96 --out runs/pairs-hard "
                          "max_violations=2 p_single=0.5"])
    add_out(d, "pair-set folder", required=True)
    d.add_argument("--pairs", type=int, required=True, metavar="N")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--size", type=int, default=None, metavar="PX", help="image side (overrides the preset)")
    d.add_argument("--difficulty", choices=["easy", "medium", "hard", "easy_grid"], default="hard",
                   help="preset: easy (fixed object pair, one relation), medium (two objects, one relation, "
                        "split by object pair), hard (3-6 objects, 2-9 relations; default), easy_grid (the tiny "
                        "generator's world: easy at 32 px on white, centres on a 4 x 4 grid)")
    d.add_argument("--workers", type=int, default=None, help="render processes (default: CPU count)")
    d.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    add_config_args(d, "max_violations=2 p_sizes=0")
    d.set_defaults(func=synth)
    d = command(dsub, "judged", help="pair a generator's samples judged by `spatialcore eval`",
                description="A pair set from `spatialcore eval` folders: within one folder and one prompt, every "
                            "sample the judge found correct (chosen) with every one it did not (rejected). Each "
                            "folder's pairs go to the split it is listed under; give folders of distinct prompts "
                            "per split. For `reward calibrate` and `reward eval` on the images Spatial-RL scores.",
                examples=["spatialcore data judged --out runs/pairs-judged --val runs/eval-base --test runs/eval-policy",
                          "spatialcore data judged --out runs/pairs-judged --test runs/eval-base runs/eval-policy "
                          "--per-prompt 1 --force"])
    add_out(d, "pair-set folder", required=True)
    for split in ("train", "val", "test"):
        d.add_argument(f"--{split}", nargs="+", default=[], metavar="EVAL_DIR",
                       help=f"`spatialcore eval` folders whose pairs form the {split} split")
    d.add_argument("--per-prompt", type=int, default=None, metavar="N",
                   help="at most N pairs per prompt and folder, drawn by --seed (default: every combination)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    d.set_defaults(func=judged)
    d = command(dsub, "validate", help="check every record of a pair set",
                description="Check pairs.jsonl and its images; print 'line N: reason' per problem and a summary. "
                            "Exit 0 when clean (warnings allowed), 1 otherwise.",
                examples=["spatialcore data validate runs/pairs-grid"])
    d.add_argument("dir", metavar="DIR")
    d.add_argument("--no-images", action="store_true", help="skip decoding the images")
    d.set_defaults(func=validate)
    d = command(dsub, "stats", help="summarise a pair set (printed and as a PNG)",
                description="Counts per split, relations per prompt, perturbation types and counts, prompt length; "
                            "printed and drawn as a PNG.",
                examples=["spatialcore data stats runs/pairs-grid",
                          "spatialcore data stats runs/pairs-grid --png runs/grid-stats.png --json runs/grid-stats.json"])
    d.add_argument("dir", metavar="DIR")
    d.add_argument("--png", metavar="FILE", help="figure path (default DIR/stats.png)")
    add_json(d, "the statistics")
    d.set_defaults(func=stats)


def synth(args: argparse.Namespace) -> int:
    import time

    from ..data.synth import DIFFICULTIES, SynthConfig, synth_pair_set
    from ..logs import info

    overrides = [*args.overrides, *([f"size={args.size}"] if args.size is not None else [])]
    cfg = load_config(SynthConfig, args.config, overrides, base=DIFFICULTIES[args.difficulty])
    if args.pairs < 1:
        raise ConfigError("--pairs", f"must be >= 1, got {args.pairs}")
    t0 = time.perf_counter()
    try:
        counts = synth_pair_set(args.out, args.pairs, args.seed, cfg, workers=args.workers, overwrite=args.force)
    except FileExistsError as err:
        info(str(err), who="data synth")
        return 1
    dt = time.perf_counter() - t0
    info(f"{args.pairs} pairs ({', '.join(f'{k} {v}' for k, v in counts.items())}) at {cfg.size}px in {dt:.1f} s "
         f"({args.pairs / dt:.0f} pairs/s) -> {args.out}", who="data synth")
    return 0


def judged(args: argparse.Namespace) -> int:
    from ..data.judged import pair_set_from_evals
    from ..logs import info

    splits = {s: getattr(args, s) for s in ("train", "val", "test") if getattr(args, s)}
    if not splits:
        raise ConfigError("--test", "give at least one evaluation folder (--train, --val or --test)")
    if args.per_prompt is not None and args.per_prompt < 1:
        raise ConfigError("--per-prompt", f"must be >= 1, got {args.per_prompt}")
    try:
        counts = pair_set_from_evals(args.out, splits, per_prompt=args.per_prompt, seed=args.seed,
                                     overwrite=args.force)
    except FileExistsError as err:
        info(str(err), who="data judged")
        return 1
    info(f"{sum(counts.values())} pairs ({', '.join(f'{k} {v}' for k, v in counts.items())}) -> {args.out}",
         who="data judged")
    return 0


def validate(args: argparse.Namespace) -> int:
    from ..data.pairs import scan_pair_set

    records, problems = scan_pair_set(args.dir, check_images=not args.no_images)
    for p in problems:
        print(p)
    errors = [p for p in problems if p.severity == "error"]
    n_warn = len(problems) - len(errors)
    bad_lines = len({p.line for p in errors})
    print(f"{len(records)} good record(s), {bad_lines} bad record(s), {len(errors)} error(s), {n_warn} warning(s)")
    return 1 if errors else 0


def stats(args: argparse.Namespace) -> int:
    from ..data.stats import format_stats, pair_set_stats, plot_stats

    result = pair_set_stats(args.dir)
    if result["pairs"] == 0:
        print(f"no valid pairs in {args.dir} (see `spatialcore data validate {args.dir}`)", file=sys.stderr)
        return 1
    png = Path(args.png) if args.png else Path(args.dir) / "stats.png"
    plot_stats(result, png)
    if not emit_json(args.json, {k: v for k, v in result.items() if not k.startswith("_")}):
        print(format_stats(result))
        print(f"figure: {png}")
    return 0
