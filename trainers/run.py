"""Run-folder plumbing shared by the trainers: resume, atomic checkpoints, metrics that hold every
step once, and the errors that stop a run.

A run folder holds ``config.yaml``, ``metrics.jsonl`` and ``checkpoints/``. A run started again
with the same ``out`` resumes from the newest complete checkpoint (``spatialcore.checkpoint``):
records the killed process wrote after that checkpoint are dropped from ``metrics.jsonl`` so that
the resumed run writes each step exactly once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import TrainingError
from ..logs import MetricsFile, info, read_metrics

__all__ = ["TrainingError", "checkpoint", "find_checkpoint", "make_optimizer", "open_metrics", "restore", "split_batch"]


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


def open_metrics(out: Path, step: int) -> MetricsFile | None:
    """Rank 0's metrics file, holding only the records of steps ``<= step`` (none for a fresh run)."""
    from ..dist import is_main

    if not is_main():
        return None
    path = out / "metrics.jsonl"
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step] if step and path.is_file() else []
    with MetricsFile(path, append=False) as m:
        for r in keep:
            m.write(r)
    return MetricsFile(path)


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
