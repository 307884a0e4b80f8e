"""``spatialcore eval``: spatial evaluation of a generator by an independent judge."""

from __future__ import annotations

import argparse

from ..config import ConfigError
from .common import add_json, add_out, command, device_of, emit_json


def add(sub) -> None:
    p = command(sub, "eval", help="spatial evaluation of a generator (detector + GenEval's position rule)",
                description="Sample N images per prompt with fixed seeds from a Flux checkpoint (+ policy), judge "
                            "each with a detector and GenEval's position rule, and report objects found, relation "
                            "accuracy, a per-relation table and (with --reward-model) SpatialScore: eval.json, "
                            "eval.md, grid.png, samples.jsonl in --out.",
                examples=["spatialcore eval --model assets/tiny_generator --prompts synthetic:easy_grid --n-prompts 4 "
                          "-n 2 --out runs/eval-base",
                          "spatialcore eval --model assets/tiny_generator --lora runs/grpo-quick/policy --prompts "
                          "synthetic:easy_grid --n-prompts 4 -n 2 --reward-model runs/reward-quick/model "
                          "--out runs/eval-policy --json runs/eval-policy.json"])
    p.add_argument("--model", required=True, metavar="DIR|HUB_ID", help="Flux pipeline (e.g. runs/sft_tiny/pipeline)")
    p.add_argument("--lora", metavar="DIR", help="policy folder written by grpo train (out/policy)")
    p.add_argument("--prompts", default=None, metavar="SOURCE",
                   help="synthetic:easy|medium|hard|easy_grid (held-out test prompts), GenEval metadata .jsonl, or a "
                        "text file of synthetic-grammar prompts (default: the generator's training preset, else "
                        "synthetic:easy)")
    p.add_argument("--n-prompts", type=int, default=64, help="prompts taken from the source (default 64)")
    p.add_argument("-n", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="noise seeds derive from it (and the synthetic prompts)")
    # Unset, these four come from the generator's spatialcore_run.json (sft train writes one), else the defaults.
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: as trained, else 12)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: as trained, else 32)")
    p.add_argument("--guidance", type=float, default=None, help="default: as trained, else 3.5")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens, longer prompts are refused (default: as trained, else 64)")
    p.add_argument("--detector", default="oracle", metavar="oracle|DIR|HUB_ID",
                   help="the pixel oracle (synthetic scenes) or a zero-shot detector (OWLv2, Grounding DINO)")
    p.add_argument("--threshold", type=float, default=0.1, help="zero-shot detector score threshold")
    p.add_argument("--reward-model", metavar="DIR", help="SpatialScore folder: also report mean mu and sigma")
    p.add_argument("--batch", type=int, default=16, help="images per sampler call")
    p.add_argument("--relation-sensitivity", action="store_true",
                   help="also draw every prompt with its relation flipped from the same seeds: how much the relation "
                        "word moves the layout (synthetic prompts)")
    add_out(p, "where eval.json, eval.md, grid.png, images/ and samples.jsonl go", required=True)
    add_json(p, "the summary")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval.report import EvalSettings, run_eval, trained_settings
    from ..logs import info
    from ..paths import require, require_policy

    require(args.model, "--model", "flux", hub=True)
    require_policy(args.lora, "--lora")
    require(args.reward_model, "--reward-model", "spatialscore")
    for key, value, low in (("-n", args.n, 1), ("--n-prompts", args.n_prompts, 1), ("--steps", args.steps or 1, 1)):
        if value < low:
            raise ConfigError(key, f"must be >= {low}, got {value}")
    # Unset sampling options come from the generator's own training run when it has one, else the defaults.
    given = {k: getattr(args, k) for k in ("prompts", "steps", "size", "guidance", "max_sequence_length")}
    trained = {k: v for k, v in trained_settings(args.model).items() if given[k] is None}
    if trained:
        info("from the generator's spatialcore_run.json: " + ", ".join(f"{k}={v}" for k, v in trained.items()),
             who="eval")
    chosen = {k: v for k, v in given.items() if v is not None}
    settings = EvalSettings(**{**trained, **chosen}, n_prompts=args.n_prompts, per_prompt=args.n, seed=args.seed,
                            detector=args.detector, threshold=args.threshold, batch=args.batch,
                            relation_sensitivity=args.relation_sensitivity)
    summary = run_eval(args.model, args.out, settings, lora=args.lora, reward_model=args.reward_model,
                       device=device_of(args.device), dtype=args.dtype)
    emit_json(args.json, summary)
    return 0
