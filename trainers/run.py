"""Run-folder plumbing shared by the trainers: resume, atomic checkpoints, metrics that hold every
step once, and the errors that stop a run.

A run folder holds ``config.yaml``, ``metrics.jsonl`` and ``checkpoints/``. A run started again
with the same ``out`` resumes from the newest complete checkpoint (``spatialcore.checkpoint``):
records the killed process wrote after that checkpoint are dropped from ``metrics.jsonl`` so that
the resumed run writes each step exactly once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..config import param
from ..errors import TrainingError
from ..logs import MetricsFile, Reporter, info, read_metrics

__all__ = ["OptimConfig", "PolicyConfig", "TrainingError", "all_reduce_grads", "checkpoint", "gather_by_index", "scheduled_lr", "find_checkpoint", "make_optimizer", "open_metrics", "restore", "split_batch"]


def find_checkpoint(out: Path, *, who: str) -> Path | None:
    """The newest complete checkpoint of ``out`` (None for a fresh run), looked up before any model is
    built so that a torn run folder fails fast; passed-over torn checkpoints are logged."""
    from ..checkpoint import resume_checkpoint

    return resume_checkpoint(out, log=lambda msg: info(msg, who=who))


def restore(path: Path, rank: int, *, who: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of checkpoint ``path``, with the RNG state of ``rank`` restored."""
    from ..checkpoint import load_checkpoint, set_rng_state

    tensors, state = load_checkpoint(path)
    set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    info(f"resumed from step {state['step']} ({path})", who=who)
    return tensors, state


def checkpoint(out: Path, step: int, tensors: dict[str, torch.Tensor] | None, state: dict | None) -> None:
    """Write an atomic checkpoint on rank 0 (``tensors``/``state`` may be None on other ranks), with
    every rank's RNG state; a collective: all ranks call it."""
    from ..checkpoint import all_rng_states, save_checkpoint
    from ..dist import barrier, is_main

    states = all_rng_states()
    if is_main():
        save_checkpoint(out, step, tensors, {**state, "rng": states, "step": step})
    barrier()


def open_metrics(out: Path, step: int, cfg=None) -> Reporter | None:
    """Rank 0's reporter: ``metrics.jsonl`` holding only the records of steps ``<= step`` (none for a fresh
    run), plus the integrations ``cfg.report_to`` names."""
    from ..config import to_dict
    from ..dist import is_main

    if not is_main():
        return None
    path = out / "metrics.jsonl"
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step] if step and path.is_file() else []
    with MetricsFile(path, append=False) as m:
        for r in keep:
            m.write(r)
    report_to = getattr(cfg, "report_to", ["jsonl"]) if cfg is not None else ["jsonl"]
    return Reporter(path, report_to=report_to, step=step, config=to_dict(cfg) if cfg is not None else None)


def split_batch(global_batch: int, micro_batch: int, world: int, *, keys: tuple[str, str] = ("batch_size",
                                                                                              "micro_batch")
                ) -> tuple[int, int]:
    """(micro-batch per rank, accumulation steps) for a global batch over ``world`` ranks; raises a
    ConfigError naming the keys when the global batch does not divide (before any model is built)."""
    from ..config import ConfigError

    if global_batch % world:
        raise ConfigError(keys[0], f"{keys[0]}={global_batch} cannot be split evenly over {world} ranks")
    per_rank = global_batch // world
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(keys[1], f"{keys[1]}={micro} does not divide the {per_rank} items per rank "
                                   f"({keys[0]}={global_batch} over {world} ranks)")
    return micro, per_rank // micro


def make_optimizer(kind: str, groups: list[dict], *, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, or plain SGD (no momentum: the update is -lr x gradient, what equivalence tests compare)."""
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=weight_decay)


def all_reduce_grads(params: dict[str, torch.Tensor], world: int) -> None:
    """Sum gradients over ranks (each rank already weighted its share of the global mean)."""
    from ..dist import all_reduce_

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
    if world > 1:
        flat = all_reduce_(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
    for p, g in zip(params.values(), grads, strict=True):
        p.grad = g


@dataclass
class PolicyConfig:
    lora_rank: int = param(8, min=0, help="0: full fine-tuning")
    lora_alpha: float = param(8.0, min=0.0)
    ema_decay: float = param(0.0, min=0.0, max=1.0, help="0: no EMA")
    gradient_checkpointing: bool = False
    export_merged: bool = False  # LoRA: also write policy/transformer with the adapter folded in


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = param(1e-2, min=0.0)
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: lr -> min_lr_ratio * lr over the run
    min_lr_ratio: float = param(0.1, min=0.0, max=1.0)
    weight_decay: float = param(0.0, min=0.0)
    grad_clip: float = param(1.0, min=0.0, help="max global gradient norm (0: no clipping)")


def scheduled_lr(o: OptimConfig, step: int, total: int) -> float:
    """Learning rate of (0-based) ``step`` of ``total``: constant, or cosine from ``lr`` to ``min_lr_ratio x lr``."""
    if o.schedule == "constant":
        return o.lr
    t = min(1.0, step / max(1, total - 1))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def gather_by_index(values: torch.Tensor, n_total: int, rank: int, world: int) -> torch.Tensor:
    """All-gather per-rank values of samples ``rank, rank + world, ...`` into the full ``[n_total]``
    (CPU float32: a host-side collective, served by gloo also in a CUDA run)."""
    from ..dist import all_gather

    if world == 1:
        return values.float().cpu()
    per = math.ceil(n_total / world)
    buf = torch.full((per,), float("nan"), dtype=torch.float32)
    buf[: values.numel()] = values.float().cpu()
    full = torch.empty(n_total)
    for r, part in enumerate(all_gather(buf)):
        idx = torch.arange(r, n_total, world)
        full[idx] = part[: idx.numel()]
    return full
