"""DiffusionNFT's objective (Zheng et al., arXiv 2509.16117; NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``):
online RL on the forward process, a config choice of the Spatial-RL trainer (``objective: nft``). Sampling,
rewards, group advantages, Top-k, evaluation and the run folder are the trainer's; this module is the step.

Per iteration, with the *old* policy theta_old (an exponential moving average of the trained weights):

1. sample ``prompts_per_iter x group_size`` images with the deterministic ODE under theta_old; keep the clean
   latents x0 (no trajectory, no log-probs: any solver would do);
2. rewards -> group advantages A (the trainer's preset and Top-k) -> optimality r = 1/2 + 1/2 clip(A / c, -1, 1),
   c = ``nft.adv_clip_max``;
3. for each kept sample and each of its trained timesteps t (``train_timesteps`` of the sampler's schedule, a random
   subset per sample; 0: all), fresh noise e, x_t = (1 - t) x0 + t e, and with v = velocity(x_t, t):

       v+ = beta v_theta + (1 - beta) sg(v_old)              (implicit positive policy)
       v- = (1 + beta) sg(v_old) - beta v_theta              (implicit negative policy)
       x0+- = x_t - t v+-
       L+- = mean((x0+- - x0)^2) / sg(max(mean|x0+- - x0|, 1e-5))     (adaptive weighting, per sample)
       loss = (c / beta) (r L+ + (1 - r) L-) + kl_beta mean((v_theta - v_ref)^2)

   averaged over all ranks' kept samples and their trained timesteps (v_ref: the base model, the adapter
   disabled or a frozen copy); one optimizer step;
4. theta_old <- d theta_old + (1 - d) theta, d = 0 before ``old_flat`` steps, then min((step - old_flat) x
   old_uprate, old_uphold) (their ``decay_type`` 1: flat 0, uprate 0.001, uphold 0.5).

Their defaults for SD3.5: beta 1 (0.1 for OCR and multi-reward), c = 5, kl_beta 1e-4, 10 sampling steps and 9 of
them trained per sample, AdamW 3e-4, LoRA r32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import param
from ..gpu import value_of
from ..phases import phase


@dataclass
class NFTConfig:
    beta: float = param(1.0, min=1e-6, help="mixing of the implicit positive / negative policies (their default 1; "
                                            "0.1 for OCR and several rewards)")
    adv_clip_max: float = param(5.0, min=1e-6, help="c: r = 1/2 + 1/2 clip(A / c, -1, 1); the loss is scaled by c")
    kl_beta: float = param(1e-4, min=0.0, help="weight of mean((v_theta - v_base)^2), the base model's velocity")
    old_flat: int = param(0, min=0, help="iterations during which the old policy follows the trained one exactly")
    old_uprate: float = param(0.001, min=0.0, help="the old policy's decay grows by this much per iteration")
    old_uphold: float = param(0.5, min=0.0, max=1.0, help="the old policy's decay stops growing here")

    def decay(self, step: int) -> float:
        """d of the old policy's update after (1-based) optimizer step ``step``."""
        return 0.0 if step < self.old_flat else min((step - self.old_flat) * self.old_uprate, self.old_uphold)


def optimality(advantages: torch.Tensor, clip_max: float) -> torch.Tensor:
    """r = 1/2 + 1/2 clip(A / c, -1, 1) in [0, 1]."""
    return 0.5 + 0.5 * (advantages / clip_max).clamp(-1.0, 1.0)


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             r: torch.Tensor, *, beta: float, clip_max: float, v_ref: torch.Tensor | None = None,
             kl_beta: float = 0.0) -> torch.Tensor:
    """Per-sample DiffusionNFT loss ``[B]`` (module docstring, step 3) of velocities ``[B, ...]`` at noisy latents
    ``x_t`` of clean latents ``x0``, timesteps ``t [B]`` and optimalities ``r [B]``; float32."""
    dims = tuple(range(1, x0.ndim))
    tt = t.float().view(-1, *[1] * (x0.ndim - 1))
    v_theta, v_old, x_t, x0 = v_theta.float(), v_old.float().detach(), x_t.float(), x0.float()

    def weighted(v: torch.Tensor) -> torch.Tensor:
        err = x_t - tt * v - x0
        with torch.no_grad():
            w = err.double().abs().mean(dims, keepdim=True).clamp(min=1e-5)
        return ((err ** 2) / w).mean(dims).float()

    positive = weighted(beta * v_theta + (1 - beta) * v_old)
    negative = weighted((1 + beta) * v_old - beta * v_theta)
    loss = (clip_max / beta) * (r * positive + (1 - r) * negative)
    if v_ref is not None and kl_beta > 0:
        loss = loss + kl_beta * ((v_theta - v_ref.float().detach()) ** 2).mean(dims)
    return loss


def noise_seed(seed: int, iteration: int, n: int) -> int:
    """Seed of sample ``n``'s training noise and timesteps in ``iteration`` (the same on every rank and after a resume)."""
    return int(np.random.SeedSequence([seed, iteration, n, 2]).generate_state(1)[0])


class NFTObjective:
    """The Spatial-RL trainer's step under ``objective: nft``: sampling with the old policy, the forward-process
    loss, the old policy's update; its state is the old policy's weights."""

    SDE = False  # samples with the deterministic ODE: only the clean latents are trained on

    def __init__(self, trainer):
        self.trainer, self.cfg = trainer, trainer.cfg.nft
        self.old = {n: p.detach().clone() for n, p in trainer.params.items()}

    def sampling_weights(self) -> dict[str, torch.Tensor]:
        return self.old

    def accumulate(self, traj, adv: torch.Tensor, keep: torch.Tensor, n_kept: int, iteration: int, epoch: int,
                   steps: list[int]) -> dict[str, float]:
        """Gradient of this rank's kept samples' loss, weighted by their share of the global kept count."""
        tr, cfg = self.trainer, self.cfg
        sampler, policy = tr.sampler, tr.policy
        idx = keep.nonzero().squeeze(1)
        stats = {"loss": 0.0, "r_mean": 0.0}
        if idx.numel() == 0:
            return stats
        schedule = sampler.sigmas[:-1]  # the sampler's timesteps (t = sigma), pure noise first
        K = tr.cfg.train_timesteps or len(schedule)
        # every kept sample's own K timesteps and noises, from its global index (the same on any rank count)
        ts, noise = [], []
        for row in idx.tolist():
            g = torch.Generator().manual_seed(noise_seed(tr.cfg.seed, iteration, tr.mine[row]))
            ts.append(torch.randperm(len(schedule), generator=g)[:K])
            noise.append(torch.randn(K, *traj.final.shape[1:], generator=g))
        # one forward per micro-batch of (sample, timestep) pairs: all of a sample's timesteps share a forward,
        # the same terms as one forward per timestep, in fewer and larger matrix products
        pair_rows, pair_t = idx.repeat_interleave(K), schedule[torch.stack(ts).flatten()]
        noise = torch.stack(noise).flatten(0, 1).to(traj.final)
        r_all = optimality(adv.float(), cfg.adv_clip_max)
        mb = tr.cfg.micro_batch or pair_rows.numel()
        for s in range(0, pair_rows.numel(), mb):
            rows = pair_rows[s:s + mb]
            x0, emb, pooled, r = traj.final[rows], traj.prompt_embeds[rows], traj.pooled[rows], r_all[rows]
            t = pair_t[s:s + mb].to(x0)
            tt = t.view(-1, *[1] * (x0.ndim - 1))
            x_t = (1 - tt) * x0 + tt * noise[s:s + mb]
            with torch.no_grad():
                with policy.swapped(self.old):
                    v_old = sampler.velocity(x_t, t, emb, pooled)
                v_ref = None
                if cfg.kl_beta > 0:
                    with policy.reference() as ref:
                        v_ref = sampler.velocity(x_t, t, emb, pooled, ref)
            v = sampler.velocity(x_t, t, emb, pooled)
            w = rows.numel() / n_kept / K  # each pair's share of the mean over all ranks' kept pairs
            loss = nft_loss(v, v_old, x_t, x0, t, r, beta=cfg.beta, clip_max=cfg.adv_clip_max, v_ref=v_ref,
                            kl_beta=cfg.kl_beta).mean()
            with phase("backward"):
                (loss * w).backward()
            stats["loss"] += value_of(loss.detach()) * w
        stats["r_mean"] = value_of(r_all[idx].sum()) / n_kept  # this rank's share of the mean over kept samples
        return stats

    def after_update(self, step: int) -> None:
        """theta_old <- d theta_old + (1 - d) theta after optimizer step ``step`` (1-based)."""
        d = self.cfg.decay(step)
        with torch.no_grad():
            for n, p in self.trainer.params.items():
                self.old[n].mul_(d).add_(p.detach(), alpha=1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"old.{n}": w for n, w in self.old.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n in self.old:
                self.old[n].copy_(tensors[f"old.{n}"])
