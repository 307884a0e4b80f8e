"""Does the relation word move the layout? A generator that cannot draw "left of" on command cannot be taught it
by any reward; this measures how much it can.

For each prompt ``p`` of the synthetic grammar with one directional relation, ``flip(p)`` is the same prompt with
the relation's opposite in the same phrasing ("is to the left of" -> "is to the right of", "floats above" ->
"lies beneath"). From the same noise seed ``s`` the generator draws ``x(p, s)`` and ``x(flip(p), s)``; from
another seed ``s'`` it draws ``x(p, s')``. Reported over all (prompt, seed):

    pixel_ratio   = mean |x(p, s) - x(flip(p), s)|  /  mean |x(p, s) - x(p, s')|     (the relation word's pull on the
                    pixels, in units of what a new noise seed moves; ~0: the prompt's relation is ignored)
    both_correct  = share of (p, s) where the judge calls both x(p, s) and x(flip(p), s) correct (the relation drawn
                    on command from one noise: a generator that draws one fixed layout per seed scores at most
                    the share of seeds it can serve both ways, 0 for a perfect "ignore the prompt" model)
    accuracy      = the judge's relation accuracy over all x(p, s) and x(flip(p), s)

``by_axis`` gives the same numbers over the horizontal (left of / right of) and the vertical (above / below)
prompts apart (None where a side has no prompt): a generator can follow one axis's words and ignore the other's.
"""

from __future__ import annotations

import torch

from ..data.captions import find_relation, flip_relation


@torch.no_grad()
def relation_sensitivity(sampler, prompts: list[str], seeds: list[int], *, batch: int = 16) -> dict:
    """The numbers of the module docstring for ``prompts`` (those with one directional relation) x ``seeds``
    (at least two), sampled with the deterministic ODE."""
    from ..rl.sampler import to_pil
    from .judge import judge_synthetic

    if len(seeds) < 2:
        raise ValueError("relation sensitivity needs at least two seeds (a new seed is the unit)")
    pairs = [(p, q) for p in prompts if (q := flip_relation(p)) is not None]
    if not pairs:
        raise ValueError("no prompt with exactly one directional relation to flip")
    jobs = [(p, s) for p, _ in pairs for s in seeds] + [(q, s) for _, q in pairs for s in seeds]
    images = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        images.append(sampler.sample([p for p, _ in chunk], [s for _, s in chunk], sde=False).images.float().cpu())
    x = torch.cat(images).view(2, len(pairs), len(seeds), *images[0].shape[1:])  # [flip?, prompt, seed, 3, H, W]
    _, correct = judge_synthetic(to_pil(x.flatten(0, 2)), [p for p, _ in jobs])
    correct = correct.view(2, len(pairs), len(seeds))
    horizontal = torch.tensor([find_relation(p)[1] in ("left of", "right of") for p, _ in pairs])
    return {**_numbers(x, correct), "seeds": len(seeds),
            "by_axis": {name: _numbers(x[:, rows], correct[:, rows]) if rows.any() else None
                        for name, rows in (("horizontal", horizontal), ("vertical", ~horizontal))}}


def _numbers(x: torch.Tensor, correct: torch.Tensor) -> dict:
    """pixel_ratio, both_correct, accuracy (module docstring) of images ``x`` [2, prompt, seed, 3, H, W] and the
    judge's verdicts ``correct`` [2, prompt, seed]."""
    d_rel = (x[0] - x[1]).abs().mean()
    d_seed = (x[0] - x[0].roll(1, dims=1)).abs().mean()  # each seed against the next one, same prompt
    return {"pixel_ratio": float(d_rel / d_seed), "both_correct": float((correct[0] * correct[1]).mean()),
            "accuracy": float(correct.mean()), "pairs": x.shape[1]}
