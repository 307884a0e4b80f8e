"""``spatialcore sample``: images for prompts from any Flux checkpoint, optionally with a trained policy, as PNGs
and ``samples.jsonl`` (``{"prompt", "seed", "image"}`` per image; what ``reward score --samples`` reads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def sample_to_folder(model: str, prompts: list[str], out: str | Path, *, n: int, seed: int, sampler_cfg,
                     sde: bool = False, lora: str | None = None, dtype: torch.dtype = torch.bfloat16,
                     device: str = "cpu") -> list[dict]:
    """``n`` images per prompt, image ``j`` of prompt ``i`` from noise seed ``seed + i * n + j``; returns the
    rows of ``out/samples.jsonl``."""
    from .logs import info
    from .rl.sampler import FluxSampler, load_pipeline, to_pil

    pipe = load_pipeline(model, dtype=dtype, device=device)
    if lora:
        from .rl.policy import load_policy_weights

        info(f"policy weights: {load_policy_weights(pipe, lora)} from {lora}", who="sample")
    sampler = FluxSampler(pipe, sampler_cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, prompt in enumerate(prompts):
        seeds = [seed + i * n + j for j in range(n)]
        traj = sampler.sample([prompt] * n, seeds, sde=sde)
        for j, im in enumerate(to_pil(traj.images)):
            path = out / f"{i:04d}_{j:02d}.png"
            im.save(path)
            rows.append({"prompt": prompt, "seed": seeds[j], "image": str(path)})
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info(f"{len(rows)} images -> {out}", who="sample")
    return rows
