"""`spatialcore demo`: the main job end to end on tiny CPU models, with a Markdown report.

Stages run in order and each one reports what it did and how long it took:

1. build the tiny Qwen2.5-VL and Flux checkpoints (reused when the run folder already has
   them for the same config);
2. synthesise a SpatialReward pair set (easy preset), validate it and draw its statistics;
3. sample a group of images per prompt from the tiny Flux pipeline (stock ``FluxPipeline``),
   saved as a PNG grid, and score them with the pixel oracle's continuous spatial reward;
4. group advantages with Top-k filtering over those rewards (``spatialcore.kernels``);
5. run the tiny Qwen2.5-VL backbone (stock processor + model, loaded offline) on every
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
    pairs: int = param(200, min=10, help="synthetic pairs to generate (easy preset)")
    top_k: int = param(1, min=1, help="Top-k filtering: keep the top-k and bottom-k of each group")

    def check(self) -> None:
        if not self.prompts:
            raise ConfigError("prompts", "needs at least one prompt")
        if self.image_size % 16:
            raise ConfigError("image_size", f"{self.image_size} must be a multiple of 16 (VAE x patch packing)")
        if self.top_k > self.group_size:
            raise ConfigError("top_k", f"{self.top_k} exceeds group_size={self.group_size}")


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


def _data_stage(cfg: DemoConfig, out: Path):
    from .config import from_dict
    from .data.pairs import scan_pair_set
    from .data.stats import pair_set_stats, plot_stats
    from .data.synth import DIFFICULTIES, SynthConfig, synth_pair_set

    folder = out / "pairs"
    synth_pair_set(folder, cfg.pairs, cfg.seed, from_dict(SynthConfig, DIFFICULTIES["easy"]), overwrite=True,
                   workers=1)
    records, problems = scan_pair_set(folder)
    stats = pair_set_stats(folder)
    plot_stats(stats, out / "pair_stats.png")
    splits = ", ".join(f"{k} {v}" for k, v in sorted(stats["splits"].items()))
    return folder, (f"{len(records)} valid pairs ({splits}), {len(problems)} problems -> pairs/, "
                    "pair_stats.png")


def _reward_stage(cfg: DemoConfig, images):
    import torch

    from .data.oracle import pixel_score
    from .kernels import ADVANTAGE_PRESETS, group_advantages

    rewards = torch.tensor([[pixel_score(im, p) for im in group] for p, group in zip(cfg.prompts, images, strict=True)])
    top_k = cfg.top_k if 2 * cfg.top_k < cfg.group_size else None
    res = group_advantages(rewards, top_k=top_k, **ADVANTAGE_PRESETS["spatial_rl"])
    return rewards, (f"pixel-oracle reward mean {rewards.mean():.3f} (within-group std {rewards.std(1).mean():.3f}); "
                     f"Top-k kept {int(res.keep.sum())}/{res.keep.numel()} samples, "
                     f"advantage range [{res.advantages.min():.2f}, {res.advantages.max():.2f}]")


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
    stages.run("synthetic pairs", _data_stage, cfg, out)
    images = stages.run("Flux sampling", _sample_stage, cfg, tiny_dir, out)
    stages.run("spatial reward + advantages", _reward_stage, cfg, images)
    stages.run("Qwen2.5-VL backbone", _backbone_stage, cfg, tiny_dir, images)
    total = time.perf_counter() - t0

    lines = ["# spatialcore demo report", "", f"Total time: {total:.1f} s on CPU.", "",
             "| stage | time (s) | result |", "|---|---:|---|"]
    lines += [f"| {name} | {dt:.1f} | {summary} |" for name, dt, summary in stages.rows]
    lines += ["", "Not yet in the demo: training SpatialScore and Spatial-RL (their trainers are not built yet).",
              "", "![samples](samples.png)", "", "![pair statistics](pair_stats.png)", ""]
    report = out / "REPORT.md"
    report.write_text("\n".join(lines))
    info(f"done in {total:.1f} s; report: {report}", who="demo")
    return 0
