"""`spatialcore demo`: the main job end to end on tiny CPU models, with a Markdown report.

Stages run in order and each one reports what it did and how long it took:

1. build the tiny Qwen2.5-VL and Flux checkpoints (reused when the run folder already has
   them for the same config);
2. sample a group of images per prompt from the tiny Flux pipeline (stock ``FluxPipeline``),
   saved as a PNG grid;
3. run the tiny Qwen2.5-VL backbone (stock processor + model, loaded offline) on every
   (prompt, image) pair and take the last prompt token's hidden state, as the reward model does.

``runs/demo/REPORT.md`` lists the stages, their timings and outputs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, param, to_dict
from .logs import info, progress
from .tiny import TinyConfig

DEMO_PROMPTS = (
    "the red circle is to the left of the blue square",
    "a yellow star is above the green triangle",
    "the purple ring is behind the orange cross",
)


@dataclass
class DemoConfig:
    seed: int = param(0, min=0)
    tiny: TinyConfig = field(default_factory=TinyConfig)
    prompts: list[str] = field(default_factory=lambda: list(DEMO_PROMPTS))
    group_size: int = param(4, min=1, max=64, help="images per prompt")
    steps: int = param(8, min=1, max=100, help="Flux sampling steps")
    image_size: int = param(64, min=16, max=512)
    guidance: float = param(3.5, min=0.0)
    threads: int = param(0, min=0, help="torch CPU threads (0: leave torch's default)")

    def check(self) -> None:
        if not self.prompts:
            raise ConfigError("prompts", "needs at least one prompt")
        if self.image_size % 16:
            raise ConfigError("image_size", f"{self.image_size} must be a multiple of 16 (VAE x patch packing)")


class _Stages:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    def run(self, name: str, fn, *args, **kwargs):
        info(f"{name} ...", who="demo")
        t0 = time.perf_counter()
        result, summary = fn(*args, **kwargs)
        dt = time.perf_counter() - t0
        self.rows.append((name, dt, summary))
        info(f"{name}: {summary} ({dt:.1f} s)", who="demo")
        return result


def _tiny_stage(cfg: DemoConfig, out: Path):
    import yaml

    from .tiny import build_tiny

    tiny_dir = out / "tiny"
    wanted = to_dict(cfg.tiny)
    saved = tiny_dir / "tiny.yaml"
    if saved.is_file() and yaml.safe_load(saved.read_text()) == wanted:
        return tiny_dir, f"reused {tiny_dir}"
    summary = build_tiny(cfg.tiny, tiny_dir, overwrite=True)
    n_flux = sum(summary["flux"]["parameters"].values())
    return tiny_dir, (f"Qwen2.5-VL {summary['reward']['parameters']:,} params, "
                      f"Flux {n_flux:,} params -> {tiny_dir}")


def _sample_stage(cfg: DemoConfig, tiny_dir: Path, out: Path):
    import torch
    from diffusers import FluxPipeline
    from diffusers.utils import logging as diffusers_logging

    from .plots import image_grid

    diffusers_logging.disable_progress_bar()

    pipe = FluxPipeline.from_pretrained(tiny_dir / "flux")
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i, prompt in enumerate(progress(cfg.prompts, desc="sample", unit="prompt")):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + i)
        result = pipe(prompt, height=cfg.image_size, width=cfg.image_size, num_inference_steps=cfg.steps,
                      guidance_scale=cfg.guidance, num_images_per_prompt=cfg.group_size, generator=gen,
                      max_sequence_length=cfg.tiny.flux.max_sequence_length)
        images.append(result.images)
    grid = out / "samples.png"
    image_grid(images, [p[:40] for p in cfg.prompts], grid)
    n = sum(len(g) for g in images)
    return images, f"{n} images ({len(cfg.prompts)} prompts x {cfg.group_size}) -> {grid.name}"


def _backbone_stage(cfg: DemoConfig, tiny_dir: Path, images):
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_dir / "reward")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "reward").eval()
    hidden = []
    for prompt, group in zip(cfg.prompts, images, strict=True):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, tokenize=False)
        batch = processor(text=[text] * len(group), images=list(group), return_tensors="pt", padding=True)
        batch.pop("mm_token_type_ids", None)
        with torch.no_grad():
            # The backbone alone: a reward model never computes vocabulary logits.
            h = model.model(**batch).last_hidden_state
        hidden.append(h[:, -1])  # left padding: the last position is the last prompt token
    h = torch.cat(hidden)
    return h, f"{h.shape[0]} (prompt, image) pairs -> last-token hidden states {tuple(h.shape)}"


def run_demo(cfg: DemoConfig, out: Path) -> int:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages = _Stages()
    tiny_dir = stages.run("tiny checkpoints", _tiny_stage, cfg, out)
    images = stages.run("Flux sampling", _sample_stage, cfg, tiny_dir, out)
    stages.run("Qwen2.5-VL backbone", _backbone_stage, cfg, tiny_dir, images)
    total = time.perf_counter() - t0

    lines = ["# spatialcore demo report", "", f"Total time: {total:.1f} s on CPU.", "",
             "| stage | time (s) | result |", "|---|---:|---|"]
    lines += [f"| {name} | {dt:.1f} | {summary} |" for name, dt, summary in stages.rows]
    lines += ["", "![samples](samples.png)", ""]
    report = out / "REPORT.md"
    report.write_text("\n".join(lines))
    info(f"done in {total:.1f} s; report: {report}", who="demo")
    return 0
