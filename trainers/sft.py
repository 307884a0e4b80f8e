"""Supervised fine-tuning of a Flux generator with the rectified-flow loss — the supervised baseline,
and how the tiny generator of the synthetic scenes is pretrained.

    spatialcore sft train --config configs/sft/tiny_cpu.yaml [key=value ...]
    torchrun --nproc_per_node 8 $(which spatialcore) sft train --config configs/sft/flux_dev_lora.yaml

Data (``data``, ``spatialcore.data.captioned``): the streaming synthetic renderer, the ``chosen`` images of a
pair set, or an image folder with ``metadata.jsonl``. Item ``k`` of a step lives on rank ``k % world``, draws
its noise and timestep from its own seed, and a resumed run redraws it identically. The loop is
``trainer.Trainer``.

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

Every ``eval_every`` transformer steps the (EMA) transformer samples held-out prompts from fixed noise with the
ODE (``eval.heldout``); for synthetic prompts the pixel oracle judges them (objects found, relation accuracy: the same
judge as ``spatialcore eval``). The run ends with ``out/pipeline/`` (a complete Flux pipeline that
``FluxPipeline.from_pretrained`` loads, LoRA folded in) and, for LoRA, ``out/lora/`` (diffusers'
LoRA file for ``load_lora_weights`` on the base model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from ..config import ConfigError, param
from ..data.captioned import CaptionedDataConfig, CaptionedItems, to_tensor
from ..dist import all_reduce_grads, is_main
from ..gpu import sdpa_for_training
from ..logs import info
from ..phases import phase
from ..rl.policy import PolicyConfig, swapped_weights
from .optim import OptimConfig
from .trainer import RunConfig, Trainer

VAE_PREFIX, TRANSFORMER_PREFIX, EMA_PREFIX = "vae.", "transformer.", "ema."


@dataclass
class VAEStageConfig:
    steps: int = param(0, min=0, help="autoencoder steps before the transformer (0: keep the pipeline's VAE)")
    lr: float = param(1e-3, min=0.0)
    batch_size: int = param(16, min=1)
    calibration_images: int = param(256, min=8, help="images whose latents set shift_factor / scaling_factor")


@dataclass
class SFTTrainConfig(RunConfig):
    KIND: ClassVar[str] = "sft"
    RENAMED: ClassVar[dict[str, str]] = {"export_dtype": "policy.export_dtype"}

    data: CaptionedDataConfig = field(default_factory=CaptionedDataConfig)
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
    steps: int = param(1000, min=0, help="transformer steps (after vae.steps)")
    eval_prompts: int = param(8, min=1, help="held-out prompts sampled at each evaluation (synthetic data)")
    eval_seeds: int = param(4, min=1, help="fixed noise seeds per held-out prompt")
    grid_prompts: list[str] = field(default_factory=list)  # evaluation prompts for non-synthetic data
    sample_steps: int = param(8, min=1, help="ODE steps of the evaluation samples")
    sample_batch: int = param(0, min=0, help="samples per sampler call in evaluation (0: all of this rank's at once)")
    text_encoders: Literal["frozen", "trainable"] = param(
        "frozen", help="trainable: CLIP and T5 train with the transformer (its optimizer, its EMA; a text path that can "
                       "learn word order), exported with the pipeline")

    def check(self) -> None:
        super().check()
        self.data.check()
        if self.steps + self.vae.steps == 0:
            raise ConfigError("steps", "nothing to train: steps and vae.steps are both 0")
        if self.data.source != "synthetic" and not self.grid_prompts and self.steps:
            raise ConfigError("grid_prompts", "give evaluation prompts for non-synthetic data")
        if self.optim.warmup_steps >= max(1, self.steps):
            raise ConfigError("optim.warmup_steps", f"{self.optim.warmup_steps} must be < steps={self.steps}")

    @property
    def total_steps(self) -> int:
        return self.vae.steps + self.steps


def item_seed(seed: int, stream: int, k: int) -> int:
    """Seed of item ``k`` of a stream (0: VAE stage, 1: transformer stage, 2: calibration)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, stream, k]).generate_state(1)[0])


class SFTTrainer(Trainer):
    """Flow-matching fine-tuning: ``train_step()`` is one optimizer step of the current stage (VAE, then the
    transformer); the evaluation samples held-out prompts every ``eval_every`` transformer steps."""

    def plan(self) -> None:
        from ..dist import split_batch

        cfg = self.cfg
        self.micro, self.accum = split_batch(cfg.batch_size, cfg.micro_batch, self.world)
        if cfg.vae.steps:
            split_batch(cfg.vae.batch_size, 0, self.world, keys=("vae.batch_size", "vae.batch_size"))

    @property
    def total_steps(self) -> int:
        return self.cfg.total_steps

    def build(self) -> None:
        from ..paths import git_commit

        cfg = self.cfg
        self.items = CaptionedItems(cfg.data, image_size=cfg.image_size, seed=cfg.seed)
        self._init_models()
        self._start_stage(self.stage)
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
        self.text_params = {}
        if cfg.text_encoders == "trainable":
            self.sampler.cfg.text_cache = 0  # embeddings change every step
            for name in ("text_encoder", "text_encoder_2"):
                module = getattr(self.pipe, name).requires_grad_(True)
                self.text_params.update({f"{name}.{n}": q for n, q in module.named_parameters()})
        self.trained = {**self.policy.params, **self.text_params}  # what the transformer stage optimises
        self.ema = EMA(self.trained, cfg.policy.ema_decay) if cfg.policy.ema_decay > 0 else None
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

    def _start_stage(self, stage: str) -> None:
        """The optimizer of ``stage`` (and the trainable flags that go with it)."""
        from .optim import make_optimizer

        cfg = self.cfg
        if stage == "vae":
            self.vae.requires_grad_(True)
            params, lr = self.vae_params, cfg.vae.lr
        else:
            self.vae.requires_grad_(False)
            params, lr = self.trained, cfg.optim.lr
        self.params = params
        self.opt = make_optimizer(cfg.optim, [{"params": list(params.values()), "lr": lr}])

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {TRANSFORMER_PREFIX + n: p.detach() for n, p in self.policy.params.items()}
        tensors.update({n: p.detach() for n, p in self.text_params.items()})
        if self.cfg.vae.steps:
            tensors.update({VAE_PREFIX + n: p.detach() for n, p in self.vae_params.items()})
        if self.ema:
            tensors.update({EMA_PREFIX + n: w for n, w in self.ema.weights.items()})
        vc = self.vae.config
        return tensors, {"optimizer": self.opt.state_dict(),
                         "vae_factors": [float(vc.shift_factor or 0.0), float(vc.scaling_factor)]}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        want = [TRANSFORMER_PREFIX + n for n in self.policy.params] + list(self.text_params)
        if self.cfg.vae.steps:
            want += [VAE_PREFIX + n for n in self.vae_params]
        missing = [n for n in want if n not in tensors]
        if missing:
            raise ConfigError("out", f"{self.out} holds a checkpoint of another run (it lacks {missing[0]}): "
                                     f"use a new out folder")
        with torch.no_grad():
            for n, p in self.policy.params.items():
                p.copy_(tensors[TRANSFORMER_PREFIX + n])
            for n, p in self.text_params.items():
                p.copy_(tensors[n])
            if self.cfg.vae.steps:
                for n, p in self.vae_params.items():
                    p.copy_(tensors[VAE_PREFIX + n])
            if self.ema:
                for n in self.trained:
                    self.ema.weights[n].copy_(tensors[EMA_PREFIX + n])
        shift, scale = state["vae_factors"]
        self.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        self._start_stage(self.stage)
        self.opt.load_state_dict(state["optimizer"])

    def save_due(self) -> bool:
        return self.step == self.cfg.vae.steps  # the VAE stage's end: its weights and measured factors

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
        from ..dist import mean
        from .optim import set_lr

        cfg, t0, stage = self.cfg, time.perf_counter(), self.stage
        if stage == "vae":
            B, stream, k0 = cfg.vae.batch_size, 0, self.step
        else:
            B, stream, k0 = cfg.batch_size, 1, self.step - cfg.vae.steps
        mine = list(range(k0 * B + self.rank, (k0 + 1) * B, self.world))
        micro = len(mine) if stage == "vae" else self.micro
        self.opt.zero_grad(set_to_none=True)
        loss = 0.0
        for s in range(0, len(mine), micro):
            ids = mine[s:s + micro]
            with phase("data"):
                prompts, images = self._batch(stream, ids)
            part = self._vae_loss(images) if stage == "vae" else self._flow_loss(prompts, images, ids)
            with phase("backward"):
                (part / B).backward()
            loss += float(part.detach())
        with phase("optimizer"):
            all_reduce_grads(self.params, self.world)
            clip = cfg.optim.grad_clip if stage == "transformer" else 0.0
            gnorm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), clip or float("inf"))
            if stage == "transformer":
                set_lr(self.opt, cfg.optim, self.step - cfg.vae.steps, cfg.steps)
            self.opt.step()
            if stage == "transformer" and self.ema:
                self.ema.update(self.trained)
        if stage == "vae" and self.step + 1 == cfg.vae.steps:
            self._calibrate_vae()
            self._start_stage("transformer")
        return {"stage": stage, "loss": mean(loss) * self.world / B, "grad_norm": float(gnorm),
                "lr": self.opt.param_groups[0]["lr"], "samples_per_s": B / (time.perf_counter() - t0)}

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
        emb, pooled = self.sampler.text_features(prompts) if self.text_params else self.sampler.encode(prompts)
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

    def eval_due(self) -> bool:
        flow_step = self.step - self.cfg.vae.steps
        return flow_step > 0 and (flow_step % self.cfg.eval_every == 0 or self.step == self.total_steps)

    def evaluate(self, tag: str | None = None) -> dict:
        """Held-out prompts x ``eval_seeds`` fixed noises, ODE, (EMA) transformer; the pixel oracle's
        objects-found rate and relation accuracy where the prompts follow the synthetic grammar. Nothing before
        the transformer has trained."""
        from ..eval.heldout import sample_held_out

        cfg = self.cfg
        if self.step <= cfg.vae.steps:
            return {}
        with swapped_weights(self.trained, self.ema.weights if self.ema else None):
            h = sample_held_out(self.sampler, self.eval_prompts, cfg.eval_seeds, seed=20_000_003, rank=self.rank,
                                world=self.world, batch=cfg.sample_batch)
        res = h.judged()
        if is_main():
            png = h.grid(self.eval_prompts, cfg.eval_seeds, self.out / f"samples_{tag or f'step{self.step:06d}'}.png")
            if png and self.metrics:
                self.metrics.image("samples", png, self.step)
        return res

    # ------------------------------------------------------------------ the result

    def export(self, final: dict) -> str:
        """``out/pipeline`` (complete Flux pipeline, LoRA folded in, EMA weights if any, with its manifest) and,
        for LoRA, ``out/lora`` (diffusers' LoRA file)."""
        from ..rl.policy import resolve_export_dtype, save_pipeline

        if not is_main():
            return ""
        p = self.cfg.policy
        weights = self.ema.weights if self.ema else None
        dtype = resolve_export_dtype(p.export_dtype, self.cfg.model, self.cfg.dtype)
        if self.policy.lora_rank:  # the transformer's adapter (trained text encoders are in the pipeline only)
            self.policy.save(self.out / "lora", weights, dtype=dtype)
        with swapped_weights(self.text_params, weights):
            save_pipeline(self.pipe, self.policy, weights, self.out / "pipeline", dtype)
        self._manifest(final)
        d = str(dtype).removeprefix("torch.")
        return (f"pipeline -> {self.out / 'pipeline'} ({d}; with stock diffusers: "
                f"FluxPipeline.from_pretrained('{self.out / 'pipeline'}', dtype=torch.{d}))")

    def _manifest(self, final: dict) -> None:
        """``out/pipeline/spatialcore_run.json``: how the pipeline was made (command, resolved config, seed,
        commit, training time) and its last held-out evaluation."""
        import json
        import sys

        import yaml

        from ..config import to_dict

        # a base model built by `spatialcore tiny` carries its build config one folder up
        tiny = Path(self.cfg.model).parent / "tiny.yaml" if not self.cfg.model.startswith("random:") else Path("-")
        record = {"command": "spatialcore " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["sft"] else None,
                  "config": to_dict(self.cfg), "seed": self.cfg.seed, "commit": self.commit,
                  "base_model_tiny_config": yaml.safe_load(tiny.read_text()) if tiny.is_file() else None,
                  "steps": self.step, "training_seconds": round(self.elapsed, 1),
                  "eval": {k: final[k] for k in ("eval_found", "eval_relation_acc") if k in final},
                  "eval_samples": len(self.eval_prompts) * self.cfg.eval_seeds,
                  "made_from": self._lineage()}
        (self.out / "pipeline" / "spatialcore_run.json").write_text(json.dumps(record, indent=2) + "\n")

    def _lineage(self) -> dict | None:
        """How the input pipeline was made, when it says so: its own ``spatialcore_run.json`` (an earlier
        ``sft train``, itself with ``made_from``) and ``text_sides.json`` (``sft text-sides``), so a pipeline
        built in several runs carries the whole chain."""
        import json

        src = Path(self.cfg.model)
        found = {name: json.loads((src / f"{name}.json").read_text())
                 for name in ("spatialcore_run", "text_sides") if (src / f"{name}.json").is_file()}
        return found or None

    def plot(self) -> None:
        from ..logs import read_metrics
        from ..plots import curves

        recs = read_metrics(self.out / "metrics.jsonl")
        curves({k: [(r["step"], r["loss"]) for r in recs if r.get("stage") == k] for k in ("vae", "transformer")},
               self.out / "loss.png", xlabel="step", ylabel="loss")
        ev = [r for r in recs if "eval_found" in r]
        if ev:
            curves({"objects found": [(r["elapsed_s"] / 60, r["eval_found"]) for r in ev],
                    "relation accuracy": [(r["elapsed_s"] / 60, r["eval_relation_acc"]) for r in ev]},
                   self.out / "eval_vs_minutes.png", xlabel="training minutes", ylabel="held-out rate (pixel oracle)")

    def log_fields(self, rec: dict) -> dict:
        if "loss" not in rec:
            return {k: v for k, v in rec.items() if k.startswith("eval_")}
        extra = {k: rec[k] for k in ("eval_found", "eval_relation_acc") if k in rec}
        return dict(stage=rec["stage"], loss=rec["loss"], samples_s=rec["samples_per_s"], **extra)

    def postfix(self, rec: dict) -> str:
        return f"{rec['stage']} loss {rec['loss']:.4f}"


def train(cfg: SFTTrainConfig) -> dict:
    """Build an :class:`SFTTrainer` from ``cfg`` and run it (resuming from ``cfg.out``)."""
    cfg.check()
    return SFTTrainer(cfg).run()
