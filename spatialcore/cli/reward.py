"""``spatialcore reward train|eval|score``: SpatialScore, the reward model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError, load_config
from .common import add_json, add_trainer_args, command, emit_json, group, train_overrides


def add(sub) -> None:
    rsub = group(sub, "reward", help="SpatialScore reward model: train, evaluate, score",
                 description="SpatialScore: a Qwen2.5-VL reward model with a Gaussian head.")
    r = command(rsub, "train", help="train on a pair set (torchrun for several processes)",
                description="Train SpatialScore on a pair folder or a synthetic stream; resumes from the run "
                            "folder's latest checkpoint. Launch with torchrun for DDP / FSDP2.",
                examples=["spatialcore reward train --config configs/reward/tiny_cpu_grid.yaml max_steps=20 "
                          "optim.warmup_steps=5 eval_every=10 data.eval_pairs=16 --out runs/reward-quick",
                          "spatialcore reward train --config configs/reward/tiny_cpu.yaml data.source=runs/pairs-grid "
                          "max_steps=10 optim.warmup_steps=2 eval_every=5 data.eval_pairs=8 data.curriculum=[] "
                          "--out runs/reward-pairs --json runs/reward-pairs/final.json"])
    add_trainer_args(r, result="the final evaluation", example="optim.lr=1e-4 max_steps=500")
    r.set_defaults(func=train)
    r = command(rsub, "eval", help="pairwise accuracy table (overall / 1 / 2-3 perturbations)",
                description="Evaluate a SpatialScore model on a pair set: accuracy overall, with 1 and with 2-3 "
                            "perturbations, per perturbation type, mean margin and calibration.",
                examples=["spatialcore reward eval --model runs/reward-quick/model --data runs/pairs-grid",
                          "spatialcore reward eval --model runs/reward-quick/model --data runs/pairs-grid "
                          "--shuffle-prompts --json runs/reward-quick/control.json",
                          "spatialcore reward eval --oracle --data runs/pairs-grid"])
    who = r.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", metavar="DIR")
    who.add_argument("--oracle", action="store_true",
                     help="score with the pixel oracle instead of a model (fraction of the prompt's relations it "
                          "finds true): the upper bound on synthetic pairs")
    r.add_argument("--data", required=True, metavar="DIR")
    r.add_argument("--split", default="test", choices=["train", "val", "test"])
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--limit", type=int, default=None, help="evaluate at most this many pairs")
    r.add_argument("--strict", action="store_true", help="refuse a pair set with bad records")
    r.add_argument("--quantize", choices=["int8", "float8"], help="torchao inference quantisation")
    r.add_argument("--liger", action="store_true", help="liger-kernel RMSNorm/SwiGLU/RoPE kernels (CUDA)")
    r.add_argument("--compile", action="store_true", help="torch.compile the decoder layers")
    r.add_argument("--shuffle-prompts", action="store_true",
                   help="control: judge each pair against another pair's prompt (a model that reads the "
                        "prompt drops to about 0.5)")
    add_json(r, "the metrics (with calibration bins and the per-type table)")
    r.set_defaults(func=evaluate)
    r = command(rsub, "calibrate", help="fit sigma on pairs the model never trained on (mu untouched)",
                description="Fit the Gaussian head's sigma of a SpatialScore (one trained with or without the "
                            "variance head) on a split of a pair set it never trained on, its mu and backbone held "
                            "fixed, and write the model with variance_head on to --out: sigma learns where mu's "
                            "ranking fails off its training data. Judge it on another split with `reward eval`.",
                examples=["spatialcore reward calibrate --model runs/reward-quick/model --data runs/pairs-grid "
                          "--split val --out runs/reward-quick/calibrated",
                          "spatialcore reward calibrate --model runs/reward-quick/model --data runs/pairs-grid "
                          "--split val --l2 0.01 --out runs/reward-quick/calibrated --force "
                          "--json runs/reward-quick/calibrated.json"])
    r.add_argument("--model", required=True, metavar="DIR")
    r.add_argument("--data", required=True, metavar="DIR")
    r.add_argument("--split", default="val", choices=["train", "val", "test"],
                   help="pairs the model did not train on (default val; keep test for judging)")
    r.add_argument("--out", required=True, metavar="DIR", help="where the calibrated SpatialScore goes")
    r.add_argument("--steps", type=int, default=100, help="L-BFGS iterations over all the pairs' features")
    r.add_argument("--l2", type=float, default=None,
                   help="penalty on the squared sigma weights, the features standardised (default: chosen by 5-fold "
                        "cross-validation over the pairs among 1e-3, 1e-2, 0.1, 1, 10)")
    r.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass of the backbone")
    r.add_argument("--limit", type=int, default=None, help="use at most this many pairs")
    r.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    add_json(r, "pairs used and the pair loss before (sigma 1) and after")
    r.set_defaults(func=calibrate)
    r = command(rsub, "score", help="score images against a prompt, or each against its own",
                description="Print mu and sigma of SpatialScore for each image: against --prompt, or against its "
                            "own prompt from --samples (the samples.jsonl that `sample` and `eval` write, an image "
                            "folder's metadata.jsonl, or a folder holding one).",
                examples=["spatialcore reward score --model runs/reward-quick/model --samples runs/sample-quick",
                          "spatialcore reward score --model runs/reward-quick/model --prompt \"the red circle is "
                          "left of the blue square\" runs/sample-quick/0000_00.png runs/sample-quick/0000_01.png "
                          "--json runs/scores.json"])
    r.add_argument("--model", required=True, metavar="DIR")
    r.add_argument("--prompt", help="one prompt for every IMAGE")
    r.add_argument("--samples", metavar="FILE|FOLDER", help="JSON Lines of {image, prompt} (or file_name, text)")
    r.add_argument("images", nargs="*", metavar="IMAGE")
    add_json(r, "a list of {image, prompt, mu, sigma}")
    r.set_defaults(func=score)


def train(args: argparse.Namespace) -> int:
    from ..paths import require
    from ..trainers.reward import RewardTrainConfig
    from ..trainers.reward import train as run_training

    cfg = load_config(RewardTrainConfig, args.config, train_overrides(args))
    if not cfg.data.streaming:
        require(cfg.data.source, "data.source", "pairs")
    if cfg.init_from:
        require(cfg.init_from, "init_from", "spatialscore")
    else:
        require(cfg.model, "model", "qwen", hub=True)
    metrics = run_training(cfg)
    if metrics:
        emit_json(args.json, {k: v for k, v in metrics.items() if k != "calibration"})
    return 0


def _load_spatialscore(path: str):
    import torch

    from ..paths import require
    from ..reward.model import SpatialScore

    require(path, "--model", "spatialscore")
    model = SpatialScore.from_pretrained(path)
    return model.cuda() if torch.cuda.is_available() else model


def _open_pairs(args: argparse.Namespace, command: str, strict: bool = False):
    """The ``--split`` pairs of ``--data``, or None after one line on stderr (a bad pair set, or no such pairs)."""
    from ..data.pairs import PairSet, PairSetError

    try:
        data = PairSet(args.data, split=args.split, strict=strict)
    except PairSetError as err:
        print(f"spatialcore reward {command}: {err}", file=sys.stderr)
        return None
    if len(data) == 0:
        print(f"spatialcore reward {command}: no '{args.split}' pairs in {args.data}", file=sys.stderr)
        return None
    return data


def evaluate(args: argparse.Namespace) -> int:
    from ..paths import require
    from ..reward.evaluate import breakdowns, oracle_pair_scores, pair_metrics, pair_scores

    if args.oracle:
        used = [flag for flag, on in (("--shuffle-prompts", args.shuffle_prompts), ("--quantize", args.quantize),
                                      ("--liger", args.liger), ("--compile", args.compile)) if on]
        if used:
            raise ConfigError(used[0], "applies to a model, not to --oracle")
    else:
        require(args.model, "--model", "spatialscore")
    require(args.data, "--data", "pairs")
    data = _open_pairs(args, "eval", strict=args.strict)
    if data is None:
        return 1
    if args.oracle:
        try:
            scores = oracle_pair_scores(data, limit=args.limit, progress=True)
        except ValueError as err:  # a prompt outside the synthetic grammar
            raise ConfigError("--oracle", str(err)) from None
        return _print_table(args, pair_metrics(*scores, **breakdowns(data, args.limit)), "pixel oracle")
    model = _load_spatialscore(args.model)
    try:
        if args.quantize:
            model.quantize(args.quantize)
        model.accelerate(liger=args.liger, compile=args.compile)
    except RuntimeError as err:  # float8 / liger on a machine that cannot run them
        print(f"spatialcore reward eval: {err}", file=sys.stderr)
        return 1
    metrics = pair_metrics(*pair_scores(model, data, batch_size=args.batch_size, limit=args.limit, progress=True,
                                        shuffle_prompts=args.shuffle_prompts),
                           **breakdowns(data, args.limit))
    return _print_table(args, metrics, Path(args.model).name)


def calibrate(args: argparse.Namespace) -> int:
    from ..paths import require
    from ..reward.calibrate import calibrate_sigma

    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(flag, f"must be >= 1, got {value}")
    if args.l2 is not None and not args.l2 >= 0:
        raise ConfigError("--l2", f"must be >= 0, got {args.l2}")
    require(args.data, "--data", "pairs")
    out = Path(args.out)
    if out.resolve() == Path(args.model).resolve():
        raise ConfigError("--out", "must differ from --model (the uncalibrated model is kept)")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ConfigError("--out", f"{out} exists and is not empty (--force replaces it)")
    data = _open_pairs(args, "calibrate")
    if data is None:
        return 1
    if args.l2 is None and min(len(data), args.limit or len(data)) < 2:
        raise ConfigError("--l2", "one pair cannot choose the penalty by cross-validation: give --l2")
    model = _load_spatialscore(args.model)
    result = calibrate_sigma(model, data, steps=args.steps, l2=args.l2, batch_size=args.batch_size,
                             limit=args.limit, progress=True)
    model.save_pretrained(out)
    result = {**result, "model": str(args.model), "data": str(args.data), "split": args.split, "out": str(out)}
    if not emit_json(args.json, result):
        print(f"sigma fitted on {result['pairs']} '{args.split}' pairs of {args.data}: pair loss "
              f"{result['loss_before']:.4f} at sigma 1 -> {result['loss_after']:.4f} (l2 {result['l2']:g}"
              f"{' by cross-validation' if result['l2_held_out_loss'] else ''}); mu untouched -> {out}")
    return 0


def _print_table(args: argparse.Namespace, metrics: dict, name: str) -> int:
    from ..reward.evaluate import format_by_size, format_by_type, format_table

    if not emit_json(args.json, metrics):
        print(format_table(metrics, name=name))
        for table in (format_by_type(metrics), format_by_type(metrics, "by_violated", "violated relation"),
                      format_by_size(metrics)):
            if table:
                print("\n" + table)
    return 0


def score(args: argparse.Namespace) -> int:
    from ..data.prompts import read_image_prompts

    if args.samples and (args.images or args.prompt):
        raise ConfigError("--samples", "give either --samples or --prompt with images, not both")
    if args.samples:
        images, prompts = zip(*((str(image), prompt) for image, prompt in read_image_prompts(args.samples,
                                                                                              "--samples")),
                              strict=True)
        images, prompts = list(images), list(prompts)
    else:
        if not args.images or args.prompt is None:
            raise ConfigError("--prompt", "give --prompt and images, or --samples FILE|FOLDER (one prompt per image)")
        missing = [p for p in args.images if not Path(p).is_file()]
        if missing:
            raise ConfigError("IMAGE", f"not found: {', '.join(missing)}")
        images, prompts = list(args.images), [args.prompt] * len(args.images)
    model = _load_spatialscore(args.model)
    mu, sigma = model.score(prompts, images)
    rows = [{"image": p, "prompt": t, "mu": float(m), "sigma": float(s)}
            for p, t, m, s in zip(images, prompts, mu, sigma, strict=True)]
    if not emit_json(args.json, rows):
        for r in rows:
            print(f"{r['mu']:+.4f} ± {r['sigma']:.4f}  {r['image']}" + ("" if not args.samples else f"  {r['prompt']}"))
    return 0
