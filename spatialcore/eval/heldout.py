"""Held-out samples during training: every evaluation of a generator trainer draws the same images.

Sample ``i`` of ``prompts x per_prompt`` is prompt ``i // per_prompt`` from the fixed noise seed ``seed + i``
with the deterministic ODE, and lives on rank ``i % world`` (so the numbers do not depend on the number of
ranks); a rank draws its share in chunks of ``batch`` (0: at once), so the memory an evaluation needs is
bounded by the batch, not by the number of prompts. The judge is the one of ``spatialcore eval``: the pixel
oracle finds the named objects and GenEval's position rule decides the relations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class HeldOut:
    """This rank's held-out samples: ``images [b, 3, H, W]`` in [0, 1] for ``prompts`` (b of them), out of
    ``n`` over all ranks."""

    images: torch.Tensor
    prompts: list[str]
    n: int
    rank: int
    world: int

    def mean(self, values: torch.Tensor) -> float:
        """The mean over all ranks' samples of per-sample ``values`` of this rank's (NaN left out)."""
        from ..dist import gather_by_index

        return float(gather_by_index(values, self.n, self.rank, self.world).nanmean())

    def judged(self) -> dict[str, float]:
        """``eval_found`` (every named object found) and ``eval_relation_acc`` (found and every relation holds),
        or {} when the prompts are not of the synthetic grammar."""
        from ..rl.sampler import to_pil
        from .judge import judge_synthetic

        found, correct = judge_synthetic(to_pil(self.images), self.prompts)
        if found is None:
            return {}
        return {"eval_found": self.mean(found), "eval_relation_acc": self.mean(correct)}

    def grid(self, prompts: list[str], per_prompt: int, path: Path) -> Path | None:
        """A PNG of the first 8 prompts' samples, a row each (one rank only: the images are all here)."""
        from ..plots import image_grid
        from ..rl.sampler import to_pil

        if self.world != 1:
            return None
        pil = to_pil(self.images)
        rows = [pil[i * per_prompt:(i + 1) * per_prompt] for i in range(len(prompts))]
        image_grid(rows[:8], [p[:48] for p in prompts[:8]], path)
        return path


@torch.no_grad()
def sample_held_out(sampler, prompts: list[str], per_prompt: int, *, seed: int, rank: int = 0, world: int = 1,
                    batch: int = 0, lockstep: bool = False) -> HeldOut:
    """This rank's share of ``prompts x per_prompt`` samples (module docstring) from ``sampler`` (a
    :class:`~spatialcore.rl.sampler.FluxSampler` with the weights to evaluate already in place). ``lockstep``: every
    rank makes the same number of sampler calls (a sharded model's ranks gather its blocks together); a rank whose
    share is short draws a throw-away sample for each call it lacks."""
    everyone = [p for p in prompts for _ in range(per_prompt)]
    mine = list(range(rank, len(everyone), world))
    my_prompts = [everyone[i] for i in mine]
    my_seeds = [seed + i for i in mine]
    most = math.ceil(len(everyone) / world)  # rank 0's share, the largest
    chunk = batch or max(1, most if lockstep else len(mine))
    images = [sampler.sample(my_prompts[s:s + chunk], my_seeds[s:s + chunk], sde=False).images
              for s in range(0, len(mine), chunk)]
    if lockstep:
        for _ in range(math.ceil(most / chunk) - len(images)):
            sampler.sample(everyone[:1], [seed], sde=False, decode=False)
    return HeldOut(torch.cat(images) if images else torch.empty(0, 3, 1, 1), my_prompts, len(everyone), rank, world)
