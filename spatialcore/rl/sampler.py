"""Flux sampling with recorded trajectories and per-step log-probabilities (SPEC §3.2).

``FluxSampler`` wraps the parts of a stock ``FluxPipeline`` (tiny or FLUX.1-dev) and runs its own
loop so that every stochastic step goes through ``kernels.sde_step_logprob``:

    sigmas  = the pipeline's schedule (FlowMatchEulerDiscreteScheduler, resolution-dependent shift)
    step i  = SDE (Flow-GRPO or CPS) when i is in the SDE window, deterministic Euler elsewhere
    record  = latents at every window step, the window's log-probs, sigmas

Noise is drawn per sample from ``torch.Generator(seed)`` with a caller-given seed per sample, so a
sample is a pure function of (weights, prompt, seed): the distributed trainer can put a group's
samples on any rank and a resumed run redraws identical trajectories. Guidance is Flux's
guidance embedding (CFG-free, one transformer call per step). Images are decoded on the device.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..config import ConfigError, param
from ..kernels import ode_step, sde_step_logprob
from ..phases import phase


@dataclass
class SamplerConfig:
    steps: int = param(8, min=1, max=1000, help="denoising steps")
    image_size: int = param(64, min=16, max=4096)
    guidance: float = param(3.5, min=0.0, help="Flux guidance embedding (CFG-free)")
    noise_level: float = param(0.7, min=0.0, help="a: SDE noise level (Flow-GRPO 0.7)")
    sde_type: Literal["sde", "cps"] = "sde"
    # CPS only: the log-prob of a CPS step. flow_grpo: Flow-GRPO's -mean((x' - mean)^2) (no variance
    # scaling: its clip ranges carry over); gaussian: the exact transition density.
    cps_logprob: Literal["flow_grpo", "gaussian"] = "flow_grpo"
    # SDE on steps [window_start, window_start + window_size); ODE elsewhere. 0: every step
    # (the last step excluded for CPS, which has no density at sigma = 0).
    window_start: int = param(0, min=0)
    window_size: int = param(0, min=0)
    max_sequence_length: int = param(64, min=8, max=512)
    compile: Literal["none", "regional", "full"] = "none"
    text_cache: int = param(256, min=0, help="prompts whose text embeddings stay on the device, least recently used "
                                            "evicted (FLUX.1-dev: ~4 MiB each; 0: encode every call)")

    def check(self) -> None:
        start, end = self.window()
        if end > self.steps:
            raise ConfigError("window_size", f"window [{start}, {end}) exceeds steps={self.steps}")
        if self.sde_type == "cps" and end == self.steps:
            raise ConfigError("window_size", "CPS has no density at the last step (sigma_next = 0); end the "
                                             "window before it")
        if end <= start and self.noise_level > 0:
            raise ConfigError("window_size", "empty SDE window")

    def logprob(self) -> str:
        """The kernel's ``logprob`` argument for this sampler's steps."""
        return "mse" if self.sde_type == "cps" and self.cps_logprob == "flow_grpo" else "gaussian"

    def window(self) -> tuple[int, int]:
        if self.window_size:
            return self.window_start, self.window_start + self.window_size
        return self.window_start, self.steps - (1 if self.sde_type == "cps" else 0)


@dataclass
class Trajectory:
    """One batch of sampled trajectories (all tensors on the sampler's device).

    latents: ``[B, S+1, L, C]`` packed latents at window steps w0..w0+S (input of the first SDE
        step through output of the last); log_probs: ``[B, S]`` float32; sigmas: ``[S+1]`` the window's
        sigmas; final: ``[B, L, C]`` latents after the last step; images: ``[B, 3, H, W]`` in [0, 1].
    """
    latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    final: torch.Tensor
    images: torch.Tensor | None
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor

    @classmethod
    def cat(cls, parts: list[Trajectory]) -> Trajectory:
        """Several sampler calls' trajectories as one batch (same window and schedule)."""
        if len(parts) == 1:
            return parts[0]
        images = None if parts[0].images is None else torch.cat([t.images for t in parts])
        return cls(torch.cat([t.latents for t in parts]), torch.cat([t.log_probs for t in parts]), parts[0].sigmas,
                   torch.cat([t.final for t in parts]), images, torch.cat([t.prompt_embeds for t in parts]),
                   torch.cat([t.pooled for t in parts]))


def load_pipeline(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A Flux pipeline folder or hub id, or ``random:SHAPE`` (``spatialcore.shapes``: the real architecture with
    random weights, built on ``device``)."""
    from diffusers import FluxPipeline
    from diffusers.utils import logging as diffusers_logging

    from ..shapes import random_flux_pipeline, random_shape

    diffusers_logging.disable_progress_bar()
    shape = random_shape(path)
    if shape:
        from ..logs import info

        info(f"{path}: the {shape} architecture with random weights (nothing it draws means anything)", who="flux")
        pipe = random_flux_pipeline(shape, device=device, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe = FluxPipeline.from_pretrained(path, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class FluxSampler:
    def __init__(self, pipe, cfg: SamplerConfig):
        cfg.check()
        self.pipe, self.cfg = pipe, cfg
        self.transformer = pipe.transformer
        self.device = self.transformer.device
        self.dtype = self.transformer.dtype
        self.vae_scale = pipe.vae_scale_factor
        self.latent_hw = 2 * (cfg.image_size // (self.vae_scale * 2))
        if self.latent_hw * self.vae_scale != cfg.image_size:
            raise ConfigError("image_size", f"{cfg.image_size} must be a multiple of {2 * self.vae_scale}")
        self.channels = self.transformer.config.in_channels // 4
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.sigmas = self._schedule()
        self.img_ids = pipe._prepare_latent_image_ids(1, self.latent_hw // 2, self.latent_hw // 2, self.device,
                                                      self.dtype)
        self.seq_len = (self.latent_hw // 2) ** 2  # image tokens after 2x2 packing
        for p in list(pipe.vae.parameters()) + list(pipe.text_encoder.parameters()) + \
                list(pipe.text_encoder_2.parameters()):
            p.requires_grad_(False)
        if cfg.compile != "none":
            compile_transformer(self.transformer, cfg.compile)

    # ------------------------------------------------------------------ pieces

    def _schedule(self) -> torch.Tensor:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        sched = self.pipe.scheduler
        n = self.cfg.steps
        sig = np.linspace(1.0, 1 / n, n)
        mu = calculate_shift((self.latent_hw // 2) ** 2, sched.config.get("base_image_seq_len", 256),
                             sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                             sched.config.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=sig, mu=mu, device="cpu")
        return sched.sigmas.to(torch.float32).clone()  # [steps + 1], last is 0

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [B, L, D], pooled [B, Dp]); frozen encoders. The embeddings of the last
        ``text_cache`` distinct prompts stay on the device (a bounded cache: a run's memory does not grow with
        the number of prompts it has seen)."""
        known = {p: self._text_cache[p] for p in dict.fromkeys(prompts) if p in self._text_cache}
        todo = [p for p in dict.fromkeys(prompts) if p not in known]
        if todo:
            emb, pooled = self.text_features(todo)
            known.update({p: (emb[i], pooled[i]) for i, p in enumerate(todo)})
        for p, value in known.items():  # most recently used last
            self._text_cache[p] = value
            self._text_cache.move_to_end(p)
        while len(self._text_cache) > self.cfg.text_cache:
            self._text_cache.popitem(last=False)
        return torch.stack([known[p][0] for p in prompts]), torch.stack([known[p][1] for p in prompts])

    def text_features(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled) of ``prompts`` straight from the text encoders: no cache, and differentiable
        when the encoders train (``sft train text_encoders=trainable``)."""
        random_text = getattr(self.pipe, "random_text", None)  # a random:flux.1-dev pipeline's stand-in encoders
        if random_text is not None:
            return random_text(prompts, self.cfg.max_sequence_length, self.device, self.dtype)
        self._check_length(prompts)
        emb, pooled, _ = self.pipe.encode_prompt(prompts, prompt_2=None, device=self.device,
                                                 max_sequence_length=self.cfg.max_sequence_length)
        return emb.to(self.dtype), pooled.to(self.dtype)

    def _check_length(self, prompts: list[str]) -> None:
        """A prompt longer than ``max_sequence_length`` T5 tokens would be cut silently: refuse it."""
        tok = self.pipe.tokenizer_2
        limit = self.cfg.max_sequence_length
        for p in prompts:
            n = len(tok(p).input_ids)
            if n > limit:
                raise ConfigError("max_sequence_length", f"a prompt has {n} T5 tokens, more than max_sequence_length="
                                                         f"{limit} (it would be truncated): {p[:60]!r}...")

    def velocity(self, x: torch.Tensor, sigma: float | torch.Tensor, emb: torch.Tensor, pooled: torch.Tensor,
                 transformer: torch.nn.Module | None = None) -> torch.Tensor:
        """Velocity for packed latents ``x [B, L, C]`` at ``sigma`` (the pipeline's t / 1000) from the
        sampler's transformer, or from ``transformer`` (e.g. a frozen reference copy)."""
        B = x.shape[0]
        model = transformer or self.transformer
        if B == 1:
            # A single row takes the BLAS matrix-vector path in the conditioning linears (timestep, guidance and
            # pooled-text embedders, every block's modulation), whose summation order differs from the
            # matrix-matrix kernel of any larger batch: those linears see two identical rows, so a sample's
            # numbers (and a recomputed log-prob) never depend on the size of the batch it is in. The image and
            # text tokens are not duplicated (their linears have L rows either way).
            with conditioning_rows_padded(model):
                return self._forward(model, x, sigma, emb, pooled)
        return self._forward(model, x, sigma, emb, pooled)

    def _forward(self, model, x, sigma, emb, pooled) -> torch.Tensor:
        B = x.shape[0]
        t = sigma if torch.is_tensor(sigma) else torch.tensor(float(sigma))
        t = t.to(device=x.device, dtype=x.dtype).expand(B)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((B,), self.cfg.guidance, device=x.device, dtype=torch.float32)
        txt_ids = torch.zeros(emb.shape[1], 3, device=x.device, dtype=x.dtype)
        return model(hidden_states=x, timestep=t, guidance=guidance, pooled_projections=pooled,
                     encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=self.img_ids, return_dict=False)[0]

    def noise(self, seeds: list[int], init_seeds: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial latents ``[B, L, C]`` and per-step SDE noise ``[B, steps, L, C]``, one generator per sample;
        with ``init_seeds`` the initial latents come from those seeds instead (e.g. one per group)."""
        C, h = self.channels, self.latent_hw
        x0, eps = [], []
        for n, s in enumerate(seeds):
            g = torch.Generator().manual_seed(int(s))
            gi = g if init_seeds is None else torch.Generator().manual_seed(int(init_seeds[n]))
            x = torch.randn(1, C, h, h, generator=gi)
            x0.append(self.pipe._pack_latents(x, 1, C, h, h)[0])
            eps.append(torch.randn(self.cfg.steps, self.seq_len, 4 * C, generator=g))
        return (torch.stack(x0).to(self.device, self.dtype), torch.stack(eps).to(self.device, self.dtype))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents -> images ``[B, 3, H, W]`` float32 in [0, 1], on the device (no PIL)."""
        with phase("decode"):
            return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        x = self.pipe._unpack_latents(latents, self.cfg.image_size, self.cfg.image_size, self.vae_scale)
        x = x / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(x.to(vae.dtype), return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ the loop

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], *, decode: bool = True, sde: bool = True,
               init_seeds: list[int] | None = None) -> Trajectory:
        """Sample one image per (prompt, seed). ``sde=False`` runs the deterministic ODE everywhere
        (fixed-noise evaluation); ``init_seeds`` draws the initial latents from other seeds than the SDE noise."""
        if len(prompts) != len(seeds) or (init_seeds is not None and len(init_seeds) != len(seeds)):
            raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
        cfg = self.cfg
        emb, pooled = self.encode(prompts)
        x, eps = self.noise(seeds, init_seeds)
        w0, w1 = cfg.window()
        stochastic = sde and cfg.noise_level > 0
        kept, logps = [], []
        sig = self.sigmas.tolist()
        for i in range(cfg.steps):
            v = self.velocity(x, sig[i], emb, pooled)
            if stochastic and w0 <= i < w1:
                kept.append(x)
                x, lp, _, _ = sde_step_logprob(x, v, sig[i], sig[i + 1], cfg.noise_level, noise=eps[:, i],
                                               sigma_max=sig[1], cps=cfg.sde_type == "cps", logprob=cfg.logprob())
                logps.append(lp)
            else:
                x = ode_step(x, v, sig[i], sig[i + 1])
            if stochastic and i == w1 - 1:
                kept.append(x)
        B = x.shape[0]
        if kept:
            latents, log_probs = torch.stack(kept, 1), torch.stack(logps, 1)
            sigmas = self.sigmas[w0:w1 + 1]
        else:
            latents = x.new_zeros(B, 0, *x.shape[1:])
            log_probs, sigmas = torch.zeros(B, 0, device=x.device), self.sigmas[:0]
        images = self.decode(x) if decode else None
        return Trajectory(latents, log_probs, sigmas, x, images, emb, pooled)

    def step_logprob(self, traj_latents: torch.Tensor, j: int, sigmas: torch.Tensor, emb: torch.Tensor,
                     pooled: torch.Tensor, transformer: torch.nn.Module | None = None):
        """Recompute window step ``j`` under the current weights: ``(log_prob [B], mean fp32, std [B])``
        of the recorded transition latents[:, j] -> latents[:, j + 1] (differentiable w.r.t. the weights)."""
        x, x_next = traj_latents[:, j], traj_latents[:, j + 1]
        s, sn = float(sigmas[j]), float(sigmas[j + 1])
        v = self.velocity(x, s, emb, pooled, transformer)
        _, lp, mean, std = sde_step_logprob(x, v, s, sn, self.cfg.noise_level, prev_sample=x_next,
                                            sigma_max=float(self.sigmas[1]), cps=self.cfg.sde_type == "cps",
                                            logprob=self.cfg.logprob())
        return lp, mean, std


_ROW_PAD = {"on": False}  # inside FluxSampler.velocity of a single row (conditioning_rows_padded)


def _pad_rows(module, args):
    x = args[0] if args else None
    if _ROW_PAD["on"] and torch.is_tensor(x) and x.dim() == 2 and x.shape[0] == 1:
        return (torch.cat([x, x]), *args[1:])
    return None


def _unpad_rows(module, args, out):
    if _ROW_PAD["on"] and torch.is_tensor(out) and out.dim() == 2 and out.shape[0] == 2:
        return out[:1]
    return None


@contextlib.contextmanager
def conditioning_rows_padded(model: torch.nn.Module):
    """While active, every ``nn.Linear`` of ``model`` that gets a one-row matrix (the conditioning path of a batch
    of one: in a Flux transformer every other linear sees ``[B, L, D]`` tokens) computes it as two identical rows
    and returns the first: the matrix-matrix kernel, whose numbers do not depend on the row count, instead of the
    matrix-vector one. The hooks are added once per linear and do nothing outside this context."""
    for m in model.modules():  # every call: an adapter added since has new linears
        if isinstance(m, torch.nn.Linear) and not getattr(m, "_sc_row_padding", False):
            m.register_forward_pre_hook(_pad_rows)
            m.register_forward_hook(_unpad_rows)
            m._sc_row_padding = True
    _ROW_PAD["on"] = True
    try:
        yield
    finally:
        _ROW_PAD["on"] = False


def compile_transformer(transformer, mode: str, *, cuda_graphs: bool = False) -> None:
    """``regional``: compile each repeated block once (fast cold start, same kernels for all blocks);
    ``full``: the whole forward (``cuda_graphs``: replayed as CUDA graphs, torch.compile's
    "reduce-overhead" mode)."""
    if mode == "regional":
        for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
            for block in blocks:
                block.compile(dynamic=False)
    elif mode == "full":
        transformer.compile(dynamic=False, mode="reduce-overhead" if cuda_graphs else None)
    else:
        raise ValueError(f"compile must be 'none', 'regional' or 'full', got {mode!r}")


def to_pil(images: torch.Tensor):
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
