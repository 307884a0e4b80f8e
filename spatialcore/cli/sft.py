"""``spatialcore sft train``: supervised flow-matching fine-tuning of Flux (the supervised baseline)."""

from __future__ import annotations

import argparse

from ..config import load_config
from .common import (
    add_config_args,
    add_json,
    add_out,
    add_trainer_args,
    command,
    emit_json,
    group,
    train_overrides,
)


def add(sub) -> None:
    ssub = group(sub, "sft", help="supervised flow-matching fine-tuning of Flux (the supervised baseline)",
                 description="Fine-tune a Flux generator on (prompt, image) pairs with the rectified-flow loss.")
    s = command(ssub, "train", help="train the transformer (LoRA or full; optionally the VAE first)",
                description="Flow-matching fine-tuning on the synthetic renderer, a pair set's chosen images or an "
                            "image folder with metadata.jsonl; resumes from the run folder's latest checkpoint; "
                            "writes out/pipeline (FluxPipeline.from_pretrained loads it).",
                examples=["spatialcore sft train --config configs/sft/tiny_cpu_grid_perfect.yaml steps=4 "
                          "max_minutes=0 batch_size=8 eval_every=4 eval_prompts=2 --out runs/sft-quick",
                          "spatialcore sft train --config configs/sft/tiny_cpu_grid_perfect.yaml steps=2 "
                          "max_minutes=0 batch_size=8 eval_every=2 data.source=pairs data.path=runs/pairs-grid "
                          "'grid_prompts=[the red circle is left of the blue square]' policy.lora_rank=4 "
                          "--out runs/sft-quick-lora"])
    add_trainer_args(s, result="the final metrics", example="steps=500 policy.lora_rank=8")
    s.set_defaults(func=train)
    add_text_sides(ssub)


def train(args: argparse.Namespace) -> int:
    from ..paths import require
    from ..trainers.sft import SFTTrainConfig
    from ..trainers.sft import train as run_training

    cfg = load_config(SFTTrainConfig, args.config, train_overrides(args))
    require(cfg.model, "model", "flux", hub=True)
    final = run_training(cfg)
    if final:
        emit_json(args.json, final)
    return 0


def add_text_sides(ssub) -> None:
    s = command(ssub, "text-sides", help="pretrain a miniature generator's T5 on where each object goes",
                description="Train the pipeline's T5 encoder (with a linear head, then discarded) to tell, for every "
                            "object word of a synthetic prompt with one directional relation, its object's side "
                            "(the relation for the subject, its opposite for the other object), and write a copy of "
                            "the pipeline with that T5; fine-tune the transformer on it with `sft train`. The "
                            "miniature stand-in for a language-pretrained text encoder (docs/EXPERIMENTS.md).",
                examples=["spatialcore sft text-sides --model runs/tiny/flux --out runs/tiny-sides/flux steps=20 "
                          "train_prompts=50 eval_prompts=20 log_every=10"])
    add_out(s, "the pipeline copy with the trained T5 (the config's out key)")
    s.add_argument("--model", metavar="DIR", help="the Flux pipeline to start from (the config's model key)")
    s.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")
    add_json(s, "the summary (held-out side accuracy, losses)")
    add_config_args(s, "steps=1500 lr=1e-3")
    s.set_defaults(func=text_sides)


def text_sides(args: argparse.Namespace) -> int:
    from ..logs import info
    from ..paths import require
    from ..trainers.text_sides import TextSidesConfig
    from ..trainers.text_sides import train as run_training

    cfg = load_config(TextSidesConfig, args.config, list(args.overrides) + [f"{k}={v}" for k, v in
                      (("model", args.model), ("out", args.out)) if v])
    cfg.require_paths()
    require(cfg.model, "model", "flux")
    try:
        summary = run_training(cfg, overwrite=args.force)
    except FileExistsError as err:
        info(str(err), who="text-sides")
        return 1
    emit_json(args.json, summary)
    return 0
