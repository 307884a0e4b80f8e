"""Supervised fine-tuning of a Flux generator with the rectified-flow loss — the supervised baseline,
and how the tiny generator of the synthetic scenes is pretrained.

    spatialcore sft train --config configs/sft/tiny_cpu.yaml [key=value ...]
    torchrun --nproc_per_node 8 $(which spatialcore) sft train --config configs/sft/flux_dev_lora.yaml

Data (``data.source``): the streaming synthetic renderer (perfect scenes of a preset's train split),
the ``chosen`` images of a pair set (SPEC §5), or a folder of images with ``metadata.jsonl``
(``{"file_name": ..., "prompt": ...}`` per line). Item ``k`` of the run is a pure function of
(config, k): item ``k`` of a step lives on rank ``k % world``, draws its noise and timestep from its
own seed, and a resumed run redraws it identically.

Stages, one step counter:

1. ``vae.steps`` (optional) — the VAE as an autoencoder on the posterior mean (MSE), then its
   ``shift_factor``/``scaling_factor`` measured on ``vae.calibration_images`` latents and written
   into its config;
2. ``steps`` — the transformer (LoRA or full; text encoders frozen) with Flux's flow-matching loss
   as diffusers trains it: latents ``x0 = (vae.encode(img).mode - shift) * scale`` packed 2x2,
   ``u`` from ``compute_density_for_timestep_sampling`` (logit-normal by default), sigma = the
   scheduler's sigma at index ``u x num_train_timesteps``, ``x_t = (1 - sigma) x0 + sigma noise``,
   the transformer at timestep sigma with the constant guidance the sampler uses, target
   ``noise - x0``, mean squared error weighted by ``compute_loss_weighting_for_sd3``.

Every ``eval_every`` steps the (EMA) transformer samples held-out prompts from fixed noise with the
ODE; for synthetic prompts the pixel oracle judges them (objects found, relation accuracy: the same
judge as ``spatialcore eval``). The run ends with ``out/pipeline/`` (a complete Flux pipeline that
``FluxPipeline.from_pretrained`` loads, LoRA folded in) and, for LoRA, ``out/lora/`` (diffusers'
LoRA file for ``load_lora_weights`` on the base model).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..config import ConfigError, param
from ..dist import is_main
from ..gpu import sdpa_for_training
from ..logs import info, progress, step_line
from ..phases import phase
from .run import OptimConfig, PolicyConfig, all_reduce_grads

VAE_PREFIX, TRANSFORMER_PREFIX, EMA_PREFIX = "vae.", "transformer.", "ema."


@dataclass
class SFTDataConfig:
    source: Literal["synthetic", "pairs", "folder"] = "synthetic"
    path: str | None = param(None, help="pair-set folder (its chosen images) or image folder with metadata.jsonl")
    preset: Literal["easy", "medium", "hard", "easy_grid"] = "easy"  # synthetic: the scene preset
    synth: dict[str, Any] = field(default_factory=dict)  # synthetic: SynthConfig overrides (size is image_size)
    split: Literal["train", "val", "test"] = "train"

    def check(self) -> None:
        if self.source != "synthetic" and not self.path:
            raise ConfigError("data.path", f"data.source={self.source} needs a folder")


@dataclass
class VAEStageConfig:
    steps: int = param(0, min=0, help="autoencoder steps before the transformer (0: keep the pipeline's VAE)")
    lr: float = param(1e-3, min=0.0)
    batch_size: int = param(16, min=1)
    calibration_images: int = param(256, min=8, help="images whose latents set shift_factor / scaling_factor")


@dataclass
class SFTTrainConfig:
    model: str = param("runs/tiny/flux", help="Flux pipeline folder or hub id")
    out: str = "runs/sft"
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])  # + tensorboard, wandb (optional packages)
    run: Literal["auto", "resume", "fresh"] = param(
        "auto", help="auto: resume a run of the same config, refuse another's; resume: there must be one; fresh: "
                     "move an existing run aside and start over")
    seed: int = param(0, min=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    export_dtype: Literal["float32", "float16", "bfloat16"] = param(
        "float32", help="dtype of the exported pipeline's weights (float16 halves a committed checkpoint)")
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    vae: VAEStageConfig = field(default_factory=VAEStageConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    image_size: int = param(64, min=16, max=4096)
    guidance: float = param(3.5, min=0.0, help="Flux guidance embedding value (the one the sampler uses)")
    max_sequence_length: int = param(64, min=8, max=512)
    weighting_scheme: Literal["logit_normal", "uniform", "mode"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = param(1.0, min=0.0)
    mode_scale: float = 1.29
    batch_size: int = param(16, min=1, help="global batch (all ranks, all micro-batches)")
    micro_batch: int = param(0, min=0, help="items per forward/backward on a rank (0: all of them)")
    steps: int = param(1000, min=0, help="transformer steps (after vae.steps)")
    log_every: int = param(50, min=1)
    eval_every: int = param(250, min=1)
    eval_prompts: int = param(8, min=1, help="held-out prompts sampled at each evaluation (synthetic data)")
    eval_seeds: int = param(4, min=1, help="fixed noise seeds per held-out prompt")
    grid_prompts: list[str] = field(default_factory=list)  # evaluation prompts for non-synthetic data
    sample_steps: int = param(8, min=1, help="ODE steps of the evaluation samples")
    save_every: int = param(250, min=1)
    max_minutes: float = param(0.0, min=0.0, help="stop after this much training time (0: no limit)")
    threads: int = param(0, min=0)
    stop_after: int = param(0, min=0, help="end the process after this many steps, as if killed (tests)")

    def check(self) -> None:
        from ..logs import check_report_to

        check_report_to(self.report_to)
        self.data.check()
        if self.steps + self.vae.steps == 0:
            raise ConfigError("steps", "nothing to train: steps and vae.steps are both 0")
        if self.data.source != "synthetic" and not self.grid_prompts and self.steps:
            raise ConfigError("grid_prompts", "give evaluation prompts for non-synthetic data")

    @property
    def total_steps(self) -> int:
        return self.vae.steps + self.steps


def item_seed(seed: int, stream: int, k: int) -> int:
    """Seed of item ``k`` of a stream (0: VAE stage, 1: transformer stage, 2: calibration)."""
    return int(np.random.SeedSequence([seed, stream, k]).generate_state(1)[0])


def to_tensor(image, size: int) -> torch.Tensor:
    """A PIL image as ``[3, size, size]`` in [-1, 1] (centre-cropped to a square, resized)."""
    from PIL import Image

    im = image.convert("RGB")
    if im.width != im.height:
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if im.width != size:
        im = im.resize((size, size), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1


class ItemSource:
    """Item ``k`` of stream ``stream`` -> (prompt, PIL image), the same on every rank and after a resume."""

    def __init__(self, cfg: SFTTrainConfig):
        self.cfg = cfg
        d = cfg.data
        if d.source == "synthetic":
            from ..config import from_dict
            from ..data.synth import DIFFICULTIES, SynthConfig

            self.synth = from_dict(SynthConfig, {**DIFFICULTIES[d.preset], **d.synth, "size": cfg.image_size},
                                   "data.synth")
            self.synth.check()
            self.spec = self.synth.spec()
            self.records = None
        else:
            self.records = _records(d.source, Path(d.path), d.split)

    def __len__(self) -> int:
        return len(self.records) if self.records is not None else 0

    def __call__(self, stream: int, k: int):
        if self.records is None:
            from ..data.synth import scene_sample

            prompt, image, _ = scene_sample(self.synth, f"sft-{self.cfg.seed}-{stream}", k, self.cfg.data.split,
                                            spec=self.spec)
            return prompt, image
        from ..data.pairs import load_image

        n = len(self.records)
        perm = np.random.default_rng([self.cfg.seed, stream, k // n]).permutation(n)
        prompt, path = self.records[perm[k % n]]
        return prompt, load_image(path)


def _records(source: str, folder: Path, split: str) -> list[tuple[str, Path]]:
    """(prompt, image path) of a pair set's chosen images in ``split``, or of an image folder."""
    import json

    if not folder.is_dir():
        raise ConfigError("data.path", f"{folder} is not a folder")
    if source == "pairs":
        from ..data.pairs import scan_pair_set

        recs, problems = scan_pair_set(folder, check_images=False)
        out = [(r.prompt, r.chosen) for r in recs if r.split == split]
        if not out:
            why = f" ({problems[0]})" if problems else ""
            raise ConfigError("data.path", f"{folder} has no '{split}' pairs{why}")
        return out
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise ConfigError("data.path", f"{meta} is missing (one {{\"file_name\": ..., \"prompt\": ...}} per line)")
    out = []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            prompt, name = rec.get("prompt", rec.get("text")), rec["file_name"]
        except (ValueError, KeyError):
            raise ConfigError("data.path", f"{meta} line {n}: needs 'file_name' and 'prompt'") from None
        if not isinstance(prompt, str) or not (folder / name).is_file():
            raise ConfigError("data.path", f"{meta} line {n}: no prompt, or {folder / name} does not exist")
        out.append((prompt, folder / name))
    if not out:
        raise ConfigError("data.path", f"{meta} lists no images")
    return out


class SFTTrainer:
    """Flow-matching fine-tuning: ``__init__`` builds data, models and optimizer from the config (and
    resumes from the run folder), ``train_step()`` is one optimizer step of the current stage,
    ``state_dict()`` is what a checkpoint holds, ``run()`` is the loop."""

    def __init__(self, cfg: SFTTrainConfig):
        from ..dist import start_run
        from .run import find_checkpoint, open_metrics, restore, split_batch

        self.cfg = cfg
        self.rank, self.world, self.device = start_run(cfg)
        self.out = Path(cfg.out)
        self.micro, self.accum = split_batch(cfg.batch_size, cfg.micro_batch, self.world)
        if cfg.vae.steps:
            split_batch(cfg.vae.batch_size, 0, self.world, keys=("vae.batch_size", "vae.batch_size"))
        ckpt = find_checkpoint(self.out, who="sft")
        self.items = ItemSource(cfg)
        self._init_models()
        self.step, self.elapsed = 0, 0.0
        self._start_stage()
        if ckpt is not None:
            self.load_state_dict(*restore(ckpt, self.rank, who="sft"))
        self.metrics = open_metrics(self.out, self.step, cfg)
        self.last: dict = {}
        from ..paths import git_commit

        self.commit = git_commit()  # the code the run starts with (the manifest is written at the end)

    # ------------------------------------------------------------------ models

    def _init_models(self) -> None:
        from ..rl.policy import EMA, Policy
        from ..rl.sampler import FluxSampler, SamplerConfig, load_pipeline

        cfg = self.cfg
        self.pipe = load_pipeline(cfg.model, dtype=getattr(torch, cfg.dtype), device=self.device)
        if self.device.type == "cuda":
            info(f"attention: SDPA with {sdpa_for_training(self.device)}", who="sft")
        self.sampler = FluxSampler(self.pipe, SamplerConfig(
            steps=cfg.sample_steps, image_size=cfg.image_size, guidance=cfg.guidance, noise_level=0.0,
            max_sequence_length=cfg.max_sequence_length))
        self.vae = self.pipe.vae
        self.policy = Policy(self.pipe.transformer, lora_rank=cfg.policy.lora_rank, lora_alpha=cfg.policy.lora_alpha)
        if cfg.policy.gradient_checkpointing:
            self.pipe.transformer.enable_gradient_checkpointing()
        self.ema = EMA(self.policy.params, cfg.policy.ema_decay) if cfg.policy.ema_decay > 0 else None
        self.vae_params = {n: p for n, p in self.vae.named_parameters()}
        self.eval_prompts = self._eval_prompts()
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        self.train_sigmas = sched.sigmas[:-1].to(torch.float32) if len(sched.sigmas) > len(sched.timesteps) \
            else sched.sigmas.to(torch.float32)
        if is_main():
            kind = f"LoRA r{cfg.policy.lora_rank}" if cfg.policy.lora_rank else "full"
            src = cfg.data.source + (f" ({cfg.data.preset})" if cfg.data.source == "synthetic" else
                                     f" ({len(self.items)} images)")
            info(f"transformer: {kind} ({self.policy.n_trainable:,} trainable); VAE stage {cfg.vae.steps} steps, "
                 f"transformer {cfg.steps} steps; data {src}; global batch {cfg.batch_size} = {self.world} rank(s) "
                 f"x {self.micro} x {self.accum} accumulation", who="sft")

    def _eval_prompts(self) -> list[str]:
        cfg = self.cfg
        if cfg.grid_prompts:
            return list(cfg.grid_prompts)
        from ..data.synth import split_prompts

        return split_prompts(cfg.data.preset, cfg.data.synth, "test", cfg.eval_prompts, cfg.seed)

    @property
    def stage(self) -> str:
        return "vae" if self.step < self.cfg.vae.steps else "transformer"

    def _start_stage(self) -> None:
        """The optimizer of the current stage (and the trainable flags that go with it)."""
        from .run import make_optimizer

        cfg = self.cfg
        if self.stage == "vae":
            self.vae.requires_grad_(True)
            params, lr = self.vae_params, cfg.vae.lr
        else:
            self.vae.requires_grad_(False)
            params, lr = self.policy.params, cfg.optim.lr
        self.params = params
        self.opt = make_optimizer(cfg.optim.name, [{"params": list(params.values()), "lr": lr}],
                                  weight_decay=cfg.optim.weight_decay)

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {TRANSFORMER_PREFIX + n: p.detach() for n, p in self.policy.params.items()}
        if self.cfg.vae.steps:
            tensors.update({VAE_PREFIX + n: p.detach() for n, p in self.vae_params.items()})
        if self.ema:
            tensors.update({EMA_PREFIX + n: w for n, w in self.ema.weights.items()})
        vc = self.vae.config
        return tensors, {"optimizer": self.opt.state_dict(), "step": self.step, "elapsed": self.elapsed,
                         "vae_factors": [float(vc.shift_factor or 0.0), float(vc.scaling_factor)]}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        want = [TRANSFORMER_PREFIX + n for n in self.policy.params]
        if self.cfg.vae.steps:
            want += [VAE_PREFIX + n for n in self.vae_params]
        missing = [n for n in want if n not in tensors]
        if missing:
            raise ConfigError("out", f"{self.out} holds a checkpoint of another run (it lacks {missing[0]}): "
                                     f"use a new out folder")
        with torch.no_grad():
            for n, p in self.policy.params.items():
                p.copy_(tensors[TRANSFORMER_PREFIX + n])
            if self.cfg.vae.steps:
                for n, p in self.vae_params.items():
                    p.copy_(tensors[VAE_PREFIX + n])
            if self.ema:
                for n in self.policy.params:
                    self.ema.weights[n].copy_(tensors[EMA_PREFIX + n])
        shift, scale = state["vae_factors"]
        self.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        self.step, self.elapsed = state["step"], state["elapsed"]
        self._start_stage()
        self.opt.load_state_dict(state["optimizer"])

    def save(self) -> None:
        from .run import checkpoint

        tensors, state = self.state_dict()
        checkpoint(self.out, self.step, tensors, state)

    # ------------------------------------------------------------------ one step

    def _batch(self, stream: int, ids: list[int]) -> tuple[list[str], torch.Tensor]:
        prompts, images = [], []
        for k in ids:
            p, im = self.items(stream, k)
            prompts.append(p)
            images.append(to_tensor(im, self.cfg.image_size))
        return prompts, torch.stack(images).to(self.device, self.vae.dtype)

    def train_step(self) -> dict:
        """One optimizer step of the current stage over the global batch."""
        t0 = time.perf_counter()
        if self.stage == "vae":
            B, stream, k0 = self.cfg.vae.batch_size, 0, self.step
        else:
            B, stream, k0 = self.cfg.batch_size, 1, self.step - self.cfg.vae.steps
        mine = list(range(k0 * B + self.rank, (k0 + 1) * B, self.world))
        micro = len(mine) if self.stage == "vae" else self.micro
        self.opt.zero_grad(set_to_none=True)
        loss = 0.0
        for s in range(0, len(mine), micro):
            ids = mine[s:s + micro]
            with phase("data"):
                prompts, images = self._batch(stream, ids)
            part = self._vae_loss(images) if self.stage == "vae" else self._flow_loss(prompts, images, ids)
            with phase("backward"):
                (part / B).backward()
            loss += float(part.detach())
        with phase("optimizer"):
            all_reduce_grads(self.params, self.world)
            clip = self.cfg.optim.grad_clip if self.stage == "transformer" else 0.0
            gnorm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), clip or float("inf"))
            if self.stage == "transformer":
                from .run import scheduled_lr

                for g in self.opt.param_groups:
                    g["lr"] = scheduled_lr(self.cfg.optim, self.step - self.cfg.vae.steps, self.cfg.steps)
            self.opt.step()
            if self.stage == "transformer" and self.ema:
                self.ema.update(self.policy.params)
        stage = self.stage
        self.step += 1
        if stage == "vae" and self.step == self.cfg.vae.steps:
            self._calibrate_vae()
            self._start_stage()
        self.elapsed += time.perf_counter() - t0
        from ..dist import mean

        return {"step": self.step, "stage": stage, "loss": mean(loss) * self.world / B, "grad_norm": float(gnorm),
                "lr": self.opt.param_groups[0]["lr"], "elapsed_s": self.elapsed,
                "samples_per_s": B / (time.perf_counter() - t0)}

    def _vae_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Sum over the items of the reconstruction MSE through the posterior mean."""
        lat = self.vae.encode(images).latent_dist.mode()
        rec = self.vae.decode(lat).sample
        return ((rec.float() - images.float()) ** 2).mean(dim=(1, 2, 3)).sum()

    @torch.no_grad()
    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        vc = self.vae.config
        lat = self.vae.encode(images).latent_dist.mode()
        return (lat - (vc.shift_factor or 0.0)) * vc.scaling_factor

    def _flow_loss(self, prompts: list[str], images: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """Sum over the items of Flux's rectified-flow loss (each item's noise and sigma from its seed)."""
        from diffusers.training_utils import (
            compute_density_for_timestep_sampling,
            compute_loss_weighting_for_sd3,
        )

        cfg = self.cfg
        x0 = self._latents(images)
        b, c, h, w = x0.shape
        noise, sigmas = [], []
        for k in ids:
            g = torch.Generator().manual_seed(item_seed(cfg.seed, 1, k))
            u = compute_density_for_timestep_sampling(cfg.weighting_scheme, 1, logit_mean=cfg.logit_mean,
                                                      logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, generator=g)
            idx = min(int(u.item() * len(self.train_sigmas)), len(self.train_sigmas) - 1)
            sigmas.append(self.train_sigmas[idx])
            noise.append(torch.randn(c, h, w, generator=g))
        noise = torch.stack(noise).to(x0)
        sigma = torch.stack(sigmas).to(x0)
        s4 = sigma.view(b, 1, 1, 1)
        noisy = (1 - s4) * x0 + s4 * noise
        pack = self.pipe._pack_latents
        emb, pooled = self.sampler.encode(prompts)
        pred = self.sampler.velocity(pack(noisy, b, c, h, w), sigma, emb, pooled)
        target = pack(noise - x0, b, c, h, w)
        weight = compute_loss_weighting_for_sd3(cfg.weighting_scheme, sigma).float()
        return (weight * ((pred.float() - target.float()) ** 2).mean(dim=(1, 2))).sum()

    @torch.no_grad()
    def _calibrate_vae(self) -> None:
        """Set the VAE's shift/scaling factors so that training latents have mean 0 and std 1 (measured
        on ``vae.calibration_images`` items, split over ranks)."""
        from ..dist import all_reduce_

        n = self.cfg.vae.calibration_images
        s = torch.zeros(3, dtype=torch.float64)
        for start in range(self.rank, n, self.world * 16):
            ids = list(range(start, min(n, start + self.world * 16), self.world))
            _, images = self._batch(2, ids)
            lat = self.vae.encode(images).latent_dist.mode().double()
            s += torch.stack([lat.sum(), (lat * lat).sum(), torch.tensor(float(lat.numel()), dtype=torch.float64)])
        if self.world > 1:
            s = all_reduce_(s)
        m = float(s[0] / s[2])
        std = float((s[1] / s[2] - m * m) ** 0.5)
        self.vae.register_to_config(shift_factor=m, scaling_factor=1.0 / max(std, 1e-6))
        if is_main():
            info(f"VAE calibrated on {n} images: shift_factor {m:.4f}, scaling_factor {1 / max(std, 1e-6):.4f}",
                 who="sft")

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, tag: str | None = None) -> dict:
        """Held-out prompts x ``eval_seeds`` fixed noises, ODE, (EMA) transformer; the pixel oracle's
        objects-found rate and relation accuracy where the prompts follow the synthetic grammar."""
        from ..rl.sampler import to_pil
        from .run import gather_by_index

        cfg = self.cfg
        prompts = [p for p in self.eval_prompts for _ in range(cfg.eval_seeds)]
        seeds = [20_000_003 + i for i in range(len(prompts))]
        mine = list(range(self.rank, len(prompts), self.world))
        with self.policy.swapped(self.ema.weights if self.ema else None):
            traj = self.sampler.sample([prompts[i] for i in mine], [seeds[i] for i in mine], sde=False)
        pil = to_pil(traj.images)
        from ..eval.judge import judge_synthetic

        found, correct = judge_synthetic(pil, [prompts[i] for i in mine])
        res = {}
        if found is not None:
            res["eval_found"] = float(gather_by_index(found, len(prompts), self.rank, self.world).nanmean())
            res["eval_relation_acc"] = float(gather_by_index(correct, len(prompts), self.rank, self.world).nanmean())
        if tag and is_main() and self.world == 1:
            from ..plots import image_grid

            rows = [pil[i * cfg.eval_seeds:(i + 1) * cfg.eval_seeds] for i in range(len(self.eval_prompts))]
            image_grid(rows[:8], [p[:48] for p in self.eval_prompts[:8]], self.out / f"samples_{tag}.png")
            if self.metrics:
                self.metrics.image("samples", self.out / f"samples_{tag}.png", self.step)
        return res

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        from ..dist import shutdown

        cfg = self.cfg
        total = cfg.total_steps
        steps = range(self.step, total)
        bar = progress(steps, desc="sft", unit="step") if is_main() else steps
        timed_out = False
        for _ in bar:
            rec = self.train_step()
            flow_step = self.step - cfg.vae.steps
            if flow_step > 0 and (flow_step % cfg.eval_every == 0 or self.step == total):
                rec.update(self.evaluate(f"step{self.step:06d}"))
            self.last = rec
            if self.metrics:
                self.metrics.write(rec)
                if self.step % cfg.log_every == 0 or "eval_found" in rec or self.step == total:
                    extra = {k: rec[k] for k in ("eval_found", "eval_relation_acc") if k in rec}
                    info(step_line(self.step, total, stage=rec["stage"], loss=rec["loss"],
                                   samples_s=rec["samples_per_s"], **extra), who="sft")
            timed_out = bool(cfg.max_minutes and self.elapsed >= 60 * cfg.max_minutes)
            if self.step % cfg.save_every == 0 or self.step == total or timed_out or self.step == cfg.vae.steps:
                self.save()
            if cfg.stop_after and total > self.step >= cfg.stop_after:
                info(f"stopping at step {self.step} (stop_after)", who="sft")
                shutdown()
                return {}
            if timed_out:
                info(f"partial result: time budget of {cfg.max_minutes} min reached at step {self.step} of {total}",
                     who="sft")
                break
        return self._finish()

    def _finish(self) -> dict:
        from ..dist import shutdown

        final = dict(self.last)
        if self.cfg.steps and "eval_found" not in final and self.step > self.cfg.vae.steps:
            final.update(self.evaluate("final"))
        if is_main():
            self.export(self.out)
            self._manifest(final)
            self.metrics.close()
            plot_run(self.out)
            info(f"done: pipeline -> {self.out / 'pipeline'}", who="sft")
        shutdown()
        return final

    def _manifest(self, final: dict) -> None:
        """``out/pipeline/spatialcore_run.json``: how the pipeline was made (command, resolved config, seed,
        commit, training time) and its last held-out evaluation."""
        import json
        import sys

        import yaml

        from ..config import to_dict

        # a base model built by `spatialcore tiny` carries its build config one folder up
        tiny = Path(self.cfg.model).parent / "tiny.yaml"
        record = {"command": "spatialcore " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["sft"] else None,
                  "config": to_dict(self.cfg), "seed": self.cfg.seed, "commit": self.commit,
                  "base_model_tiny_config": yaml.safe_load(tiny.read_text()) if tiny.is_file() else None,
                  "steps": self.step, "training_seconds": round(self.elapsed, 1),
                  "eval": {k: final[k] for k in ("eval_found", "eval_relation_acc") if k in final},
                  "eval_samples": len(self.eval_prompts) * self.cfg.eval_seeds}
        (self.out / "pipeline" / "spatialcore_run.json").write_text(json.dumps(record, indent=2) + "\n")

    def export(self, out: Path) -> None:
        """``out/pipeline`` (complete Flux pipeline, LoRA folded in, EMA weights if any) and, for LoRA,
        ``out/lora`` (diffusers' LoRA file)."""
        weights = self.ema.weights if self.ema else None
        if self.policy.lora_rank:
            self.policy.save(out / "lora", weights)
        export_pipeline(self.pipe, self.policy, weights, out / "pipeline", self.cfg.export_dtype)


def export_pipeline(pipe, policy, weights: dict[str, torch.Tensor] | None, out: Path, export_dtype: str) -> None:
    """Write ``pipe`` with ``weights`` (or the policy's own) in its transformer, a LoRA folded in, as a
    complete pipeline folder ``out`` in ``export_dtype`` (atomically)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from ..atomic import atomic_dir
    from ..rl.policy import merged_state_dict

    with policy.swapped(weights):
        tr = pipe.transformer
        if policy.lora_rank:
            state = merged_state_dict(tr)
        else:
            state = {k: v.detach().cpu() for k, v in tr.state_dict().items()}
        plain = FluxTransformer2DModel.from_config(tr.config)
        plain.load_state_dict(state)
    p = pipe
    pipe = FluxPipeline(scheduler=p.scheduler, vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer,
                        text_encoder_2=p.text_encoder_2, tokenizer_2=p.tokenizer_2, transformer=plain.to(tr.dtype))
    if export_dtype != "float32":
        pipe = copy.deepcopy(pipe).to(getattr(torch, export_dtype))
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp)

def train(cfg: SFTTrainConfig) -> dict:
    """Build an :class:`SFTTrainer` from ``cfg`` and run it (resuming from ``cfg.out``)."""
    cfg.check()
    return SFTTrainer(cfg).run()


def plot_run(out: Path) -> None:
    from ..logs import read_metrics
    from ..plots import curves

    recs = read_metrics(out / "metrics.jsonl")
    curves({k: [(r["step"], r["loss"]) for r in recs if r.get("stage") == k] for k in ("vae", "transformer")},
           out / "loss.png", xlabel="step", ylabel="loss")
    ev = [r for r in recs if "eval_found" in r]
    if ev:
        curves({"objects found": [(r["elapsed_s"] / 60, r["eval_found"]) for r in ev],
                "relation accuracy": [(r["elapsed_s"] / 60, r["eval_relation_acc"]) for r in ev]},
               out / "eval_vs_minutes.png", xlabel="training minutes", ylabel="held-out rate (pixel oracle)")
