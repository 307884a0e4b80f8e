"""``spatialcore sft train``: supervised flow-matching fine-tuning of Flux (the supervised baseline)."""

from __future__ import annotations

import argparse

from ..config import load_config
from .common import add_trainer_args, command, emit_json, group, train_overrides


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
