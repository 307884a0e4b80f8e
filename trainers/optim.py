"""The optimizer section every trainer reads, the optimizers it names, and the one learning-rate schedule.

    factor(step) = (step + 1) / w                                   step < w  (linear warm-up, w = warmup_steps)
                 = 1                                                 schedule: constant
                 = m + (1 - m) * (1 + cos(pi * min(1, t))) / 2,      schedule: cosine, t = (step - w) / (T - w)
    lr of a parameter group at step = its base rate * factor(step)  (0-based step of T, m = min_lr_ratio)

The rate is a pure function of the step, so a checkpoint holds no scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import param


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = param(1e-2, min=0.0)
    schedule: Literal["constant", "cosine"] = param(
        "constant", help="after the warm-up: constant, or a cosine from lr to min_lr_ratio x lr over the run")
    warmup_steps: int = param(0, min=0, help="linear warm-up from lr / warmup_steps to lr")
    min_lr_ratio: float = param(0.1, min=0.0, max=1.0)
    weight_decay: float = param(0.0, min=0.0)
    grad_clip: float = param(1.0, min=0.0, help="max global gradient norm (0: no clipping)")


def lr_factor(o: OptimConfig, step: int, total: int) -> float:
    """The schedule's multiplier of every base rate at (0-based) ``step`` of ``total`` (module docstring)."""
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    t = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(o: OptimConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW, or plain SGD (no momentum: the update is -lr x gradient, what equivalence tests compare), over
    parameter groups that each give their base rate as ``lr`` (kept as ``base_lr`` for the schedule)."""
    groups = [{**g, "base_lr": g["lr"]} for g in groups]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=o.weight_decay)


def set_lr(opt: torch.optim.Optimizer, o: OptimConfig, step: int, total: int) -> float:
    """Set every group's rate for (0-based) ``step``; returns the first group's."""
    factor = lr_factor(o, step, total)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor
    return opt.param_groups[0]["lr"]
