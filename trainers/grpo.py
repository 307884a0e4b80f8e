"""Spatial-RL trainer: GRPO with Top-k filtering on a Flux generator, one readable loop.

    spatialcore grpo train --config configs/grpo/tiny_cpu.yaml [key=value ...]
    torchrun --nproc_per_node 8 $(which spatialcore) grpo train --config configs/grpo/flux_dev_spatial.yaml

Per iteration:

1. **sample** ``prompts_per_iter`` prompts x ``group_size`` images. Sample n of the iteration lives on
   rank ``n % world`` and draws its noise from its own seed (a function of run seed, iteration and
   n), so trajectories do not depend on the number of ranks and a resumed run redraws them;
   SDE steps in the window go through ``kernels.sde_step_logprob`` and their log-probs are kept;
2. **score** the decoded images with the reward (in-process SpatialScore or the pixel oracle) and
   all-gather the rewards, so every rank sees the whole ``[P, G]`` matrix;
3. **advantages** with ``kernels.group_advantages`` (Spatial-RL preset: keep the top-K and bottom-K
   of each group, statistics over the kept); only kept samples go on;
4. **train** on a subsample of the window's timesteps: recompute each kept transition's log-prob
   under the current policy, ``kernels.flow_grpo_loss`` (optional KL to the reference policy = the
   adapter disabled), gradients summed over ranks and normalised by the global kept count, clip,
   AdamW, EMA of the trainable weights.

Every ``eval_every`` iterations the (EMA) policy samples the held-out prompts from fixed noise
with the deterministic ODE and the mean reward is logged (plus the hard pixel oracle where the
prompts follow the synthetic grammar). Checkpoints are atomic; a run started again with the same
config resumes from the latest one and ends with the same weights and metrics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..config import ConfigError, param
from ..logs import MetricsFile, info, progress, step_line
from ..profiling.ranges import phase
from ..sampler import SamplerConfig

TIME_KEYS = ("t_sample", "t_score", "t_train", "samples_per_s", "elapsed_s", "gpu_mem_gib")


@dataclass
class GRPOTrainConfig:
    model: str = param("runs/tiny/flux", help="Flux pipeline folder or hub id")
    out: str = "runs/grpo"
    seed: int = param(0, min=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    # Training prompts: an explicit list, or drawn from the synthetic generator
    # (prompt_stream: easy|medium|hard, with synth overrides) from its train split.
    prompts: list[str] = field(default_factory=lambda: ["the red circle is to the left of the blue square"])
    eval_prompts: list[str] = field(default_factory=list)
    prompt_stream: str | None = None
    stream: dict[str, Any] = field(default_factory=dict)
    n_stream_prompts: int = param(64, min=1, help="prompts drawn per split from the stream")
    # Curriculum: the first warmup_iterations draw only from warmup_prompts (e.g. one relation
    # word, so a spatial feature exists before the prompt has to decide its sign).
    warmup_prompts: list[str] = field(default_factory=list)
    warmup_iterations: int = param(0, min=0)
    # Common random numbers: sample j of every group of an iteration starts from the same noise, so
    # groups of different prompts differ only through the prompt (the prompt-independent part of
    # their gradients cancels sample by sample instead of on average).
    common_noise: bool = False
    reward: Literal["oracle", "spatialscore"] = "oracle"
    reward_model: str | None = None
    reward_quantize: Literal["none", "int8", "float8"] = "none"
    reward_liger: bool = False  # liger-kernel RMSNorm/SwiGLU/RoPE in the reward backbone (CUDA)
    reward_compile: bool = False  # torch.compile of the reward backbone's decoder layers
    reward_tau: float = param(60.0, min=1.0, help="oracle: soft colour assignment temperature")
    reward_form: Literal["moment", "centroid"] = "moment"  # oracle: colour-mass moments or centroids
    reward_batch: int = param(32, min=1)
    group_size: int = param(16, min=2, max=1024, help="G: images per prompt")
    prompts_per_iter: int = param(2, min=1)
    top_k: int = param(4, min=0, help="keep the top-K and bottom-K per group (0: keep all)")
    advantage: Literal["spatial_rl", "flow_grpo", "dancegrpo", "trl", "verl"] = "spatial_rl"
    clip_range: float = param(1e-4, min=0.0)
    kl_beta: float = param(0.0, min=0.0)
    lora_rank: int = param(8, min=0, help="0: full fine-tuning")
    lora_alpha: float = param(8.0, min=0.0)
    lr: float = param(1e-2, min=0.0)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: lr -> min_lr_ratio * lr over `iterations`
    min_lr_ratio: float = param(0.1, min=0.0, max=1.0)
    weight_decay: float = param(0.0, min=0.0)
    grad_clip: float = param(1.0, min=0.0)
    train_timesteps: int = param(0, min=0, help="window steps trained per iteration (0: all)")
    inner_epochs: int = param(1, min=1)
    micro_batch: int = param(0, min=0, help="kept samples per forward/backward (0: all)")
    sample_batch: int = param(0, min=0, help="samples per sampler call (0: all of this rank's)")
    ema_decay: float = param(0.0, min=0.0, max=1.0, help="0: no EMA")
    gradient_checkpointing: bool = False
    iterations: int = param(300, min=1)
    max_minutes: float = param(0.0, min=0.0, help="stop after this much training time (0: no limit)")
    log_every: int = param(10, min=1, help="one log line every this many iterations")
    eval_every: int = param(25, min=1)
    eval_seeds: int = param(8, min=1, help="fixed noise seeds per held-out prompt")
    save_every: int = param(50, min=1)
    save_grids: bool = True
    max_bad_iterations: int = param(3, min=1, help="stop after this many iterations in a row with no finite reward")
    threads: int = param(0, min=0)
    stop_after: int = param(0, min=0, help="end the process after this many iterations, as if killed (tests)")

    def check(self) -> None:
        self.sampler.check()
        if not self.prompts and not self.prompt_stream:
            raise ConfigError("prompts", "give training prompts or a prompt_stream")
        if self.prompts and self.prompt_stream:
            raise ConfigError("prompt_stream", "give either prompts or a prompt_stream, not both (prompts: [])")
        if self.prompt_stream and self.prompt_stream not in ("easy", "medium", "hard"):
            raise ConfigError("prompt_stream", f"unknown preset {self.prompt_stream!r} (easy, medium, hard)")
        if self.top_k and 2 * self.top_k > self.group_size:
            raise ConfigError("top_k", f"2 x top_k = {2 * self.top_k} exceeds group_size={self.group_size}")
        if self.reward == "spatialscore" and not self.reward_model:
            raise ConfigError("reward_model", "reward=spatialscore needs a SpatialScore folder")
        if self.sampler.noise_level <= 0:
            raise ConfigError("sampler.noise_level", "GRPO needs stochastic (SDE) steps: noise_level > 0")
        start, end = self.sampler.window()
        if self.warmup_iterations and not self.warmup_prompts:
            raise ConfigError("warmup_prompts", "warmup_iterations > 0 needs warmup_prompts")
        if self.train_timesteps > end - start:
            raise ConfigError("train_timesteps", f"{self.train_timesteps} exceeds the SDE window ({end - start} steps)")


# ----------------------------------------------------------------------------- pieces


def sample_seed(seed: int, iteration: int, n: int) -> int:
    """Noise seed of sample ``n`` of ``iteration`` (same on every rank and after a resume)."""
    return int(np.random.SeedSequence([seed, iteration, n]).generate_state(1)[0])


def lr_at(cfg: GRPOTrainConfig, iteration: int) -> float:
    if cfg.lr_schedule == "constant":
        return cfg.lr
    t = min(1.0, iteration / max(1, cfg.iterations - 1))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def iteration_seeds(cfg: GRPOTrainConfig, iteration: int, groups: np.ndarray, samples: list[int]) -> list[int]:
    """Noise seed of each of ``samples`` (indices into the iteration's P x G samples). With
    ``common_noise`` the k-th group of each prompt shares its noise with the k-th group of every other
    prompt (repeated groups of one prompt still differ)."""
    G = cfg.group_size
    if not cfg.common_noise:
        return [sample_seed(cfg.seed, iteration, n) for n in samples]
    occurrence = [int((groups[:g] == groups[g]).sum()) for g in range(len(groups))]
    return [sample_seed(cfg.seed, iteration, occurrence[n // G] * G + n % G) for n in samples]


def iteration_plan(cfg: GRPOTrainConfig, n_prompts: int, iteration: int, window: int) -> tuple[np.ndarray, list[int]]:
    """(prompt index per group ``[P]``, trained window steps) for one iteration."""
    rng = np.random.default_rng([cfg.seed, iteration, 7])
    groups = rng.choice(n_prompts, cfg.prompts_per_iter, replace=n_prompts < cfg.prompts_per_iter)
    k = cfg.train_timesteps or window
    steps = sorted(rng.choice(window, k, replace=False).tolist())
    return groups, steps


def synth_prompts(preset: str, overrides: dict, split: str, n: int, seed: int) -> list[str]:
    """Up to ``n`` distinct prompts of the synthetic generator's ``split``."""
    from ..config import from_dict
    from ..data.synth import DIFFICULTIES, SynthConfig, make_pair

    cfg = from_dict(SynthConfig, {**DIFFICULTIES[preset], "size": 32, **overrides}, "stream")
    spec = cfg.spec()
    out: dict[str, None] = {}
    for i in range(200 * n):
        rec = make_pair(cfg, f"prompts-{seed}", i, spec).record
        if rec["split"] == split:
            out[rec["prompt"]] = None
            if len(out) == n:
                break
    if not out:
        raise ConfigError("prompt_stream", f"the stream has no '{split}' prompts")
    return list(out)


def gather_by_index(values: torch.Tensor, n_total: int, rank: int, world: int) -> torch.Tensor:
    """All-gather per-rank values of samples ``rank, rank + world, ...`` into the full ``[n_total]``."""
    if world == 1:
        return values
    per = math.ceil(n_total / world)
    buf = torch.full((per,), float("nan"), dtype=torch.float32)
    buf[: values.numel()] = values.float().cpu()
    parts = [torch.empty_like(buf) for _ in range(world)]
    torch.distributed.all_gather(parts, buf)
    full = torch.empty(n_total)
    for r, part in enumerate(parts):
        idx = torch.arange(r, n_total, world)
        full[idx] = part[: idx.numel()]
    return full


def policy_gradient(sampler, policy, traj_latents: torch.Tensor, old_logp: torch.Tensor, emb: torch.Tensor,
                    pooled: torch.Tensor, adv: torch.Tensor, steps: list[int], sigmas: torch.Tensor, *,
                    n_kept_global: int, clip_range: float, kl_beta: float, on_policy: bool, micro_batch: int
                    ) -> dict[str, float]:
    """Accumulate the GRPO gradient of this rank's *kept* samples (``[Bk, ...]`` inputs) into ``.grad``.

    The loss is the mean over all ranks' kept samples and the trained steps: each micro-batch's
    mean loss is weighted by its share of the global kept count. ``on_policy``: the policy has not
    changed since sampling, so the old log-prob is the recomputed one (ratio exactly 1) and the
    stored one only measures drift.
    """
    from ..kernels import flow_grpo_loss

    Bk = traj_latents.shape[0]
    stats = {"clip_fraction": 0.0, "approx_kl": 0.0, "kl": 0.0, "logp_drift": 0.0, "loss": 0.0}
    if Bk == 0:
        return stats
    mb = micro_batch or Bk
    T = len(steps)
    for s in range(0, Bk, mb):
        sl = slice(s, min(Bk, s + mb))
        w = (sl.stop - sl.start) / n_kept_global / T
        keep = torch.ones(sl.stop - sl.start, dtype=torch.bool, device=adv.device)
        for j in steps:
            lp, mean, std = sampler.step_logprob(traj_latents[sl], j, sigmas, emb[sl], pooled[sl])
            stored = old_logp[sl, j]
            stats["logp_drift"] = max(stats["logp_drift"], float((lp.detach() - stored).abs().max()))
            old = lp.detach() if on_policy else stored
            kl_args = {}
            if kl_beta > 0:
                with torch.no_grad(), policy.reference() as ref:
                    _, mean_ref, _ = sampler.step_logprob(traj_latents[sl], j, sigmas, emb[sl], pooled[sl], ref)
                kl_args = {"kl_mean_new": mean, "kl_mean_ref": mean_ref, "kl_std": std, "kl_beta": kl_beta}
            res = flow_grpo_loss(lp, old, adv[sl], keep, clip_range, **kl_args)
            with phase("backward"):
                (res.loss * w).backward()
            stats["loss"] += float(res.loss.detach()) * w
            stats["clip_fraction"] += float(res.clip_fraction) * w
            stats["approx_kl"] += float(res.approx_kl) * w
            stats["kl"] += float(res.kl) * w if res.kl is not None else 0.0
    return stats


def all_reduce_grads(params: dict[str, torch.Tensor], world: int) -> None:
    """Sum gradients over ranks (each rank already weighted its share of the global mean)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
    if world > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
    for p, g in zip(params.values(), grads, strict=True):
        p.grad = g


# ----------------------------------------------------------------------------- the loop


def train(cfg: GRPOTrainConfig) -> dict:
    from ..checkpoint import (
        all_rng_states,
        latest_checkpoint,
        load_checkpoint,
        save_checkpoint,
        set_rng_state,
    )
    from ..dist import barrier, is_main, shutdown, start_run
    from ..kernels import ADVANTAGE_PRESETS, group_advantages
    from ..policy import EMA, Policy
    from ..rewards import make_reward
    from ..sampler import FluxSampler, load_pipeline

    cfg.check()
    rank, world, device = start_run(cfg)
    out = Path(cfg.out)

    # ---- prompts (before any model: a bad prompt source fails fast)
    if cfg.prompt_stream:
        train_prompts = synth_prompts(cfg.prompt_stream, cfg.stream, "train", cfg.n_stream_prompts, cfg.seed)
        eval_prompts = cfg.eval_prompts or synth_prompts(cfg.prompt_stream, cfg.stream, "test",
                                                         max(1, cfg.n_stream_prompts // 8), cfg.seed)
    else:
        train_prompts, eval_prompts = list(cfg.prompts), list(cfg.eval_prompts or cfg.prompts)

    # ---- models
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    pipe = load_pipeline(cfg.model, dtype=dtype, device=device)
    policy = Policy(pipe.transformer, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                    need_reference=cfg.kl_beta > 0)
    if cfg.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    sampler = FluxSampler(pipe, cfg.sampler)
    reward_fn = make_reward(cfg.reward, model=cfg.reward_model, device=device, quantize=cfg.reward_quantize,
                            tau=cfg.reward_tau, form=cfg.reward_form, batch_size=cfg.reward_batch,
                            liger=cfg.reward_liger, compile=cfg.reward_compile)
    oracle_ok = _parses(eval_prompts)
    params = policy.params
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    preset = dict(ADVANTAGE_PRESETS[cfg.advantage])
    preset.pop("top_k", None)
    w0, w1 = cfg.sampler.window()
    if is_main():
        info(f"policy: {'LoRA r' + str(cfg.lora_rank) if cfg.lora_rank else 'full'} "
             f"({policy.n_trainable:,} trainable), reward {cfg.reward}, G={cfg.group_size} x "
             f"P={cfg.prompts_per_iter}, top_k={cfg.top_k or 'off'}, SDE window [{w0}, {w1}) of "
             f"{cfg.sampler.steps}, {world} rank(s), {len(train_prompts)} train / {len(eval_prompts)} eval prompts",
             who="grpo")

    # ---- resume
    it, elapsed, bad_streak = 0, 0.0, 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        tensors, state = load_checkpoint(ckpt)
        with torch.no_grad():
            for n, p in params.items():
                if n not in tensors:
                    raise RuntimeError(f"checkpoint {ckpt} lacks {n}: was the config changed?")
                p.copy_(tensors[n])
            if ema:
                for n in params:
                    ema.weights[n].copy_(tensors[f"ema.{n}"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        it, elapsed, bad_streak = state["step"], state["elapsed"], state["bad_streak"]
        info(f"resumed from {ckpt} at iteration {it}", who="grpo")
    if is_main():
        _truncate_metrics(out / "metrics.jsonl", it)
    metrics = MetricsFile(out / "metrics.jsonl") if is_main() else None

    def evaluate(tag: str | None = None) -> dict:
        prompts = [p for p in eval_prompts for _ in range(cfg.eval_seeds)]
        seeds = [10_000_019 + i for i in range(len(prompts))]  # fixed, disjoint from training draws
        mine = list(range(rank, len(prompts), world))
        with torch.no_grad(), policy.swapped(ema.weights if ema else None):
            traj = sampler.sample([prompts[i] for i in mine], [seeds[i] for i in mine], sde=False)
        r = gather_by_index(reward_fn(traj.images, [prompts[i] for i in mine]).cpu(), len(prompts), rank, world)
        res = {"eval_reward": float(r.nanmean())}
        if oracle_ok and cfg.reward != "oracle":
            o = gather_by_index(_oracle(traj.images, [prompts[i] for i in mine], cfg), len(prompts), rank, world)
            res["eval_oracle"] = float(o.nanmean())
        if oracle_ok:
            from ..rewards import oracle_hard

            _, acc = oracle_hard(traj.images, [prompts[i] for i in mine])
            res["eval_oracle_acc"] = float(gather_by_index(acc, len(prompts), rank, world).nanmean())
        if tag and cfg.save_grids and is_main() and world == 1:
            _grid(traj.images, eval_prompts, cfg.eval_seeds, out / f"samples_{tag}.png")
        return res

    def checkpoint() -> None:
        states = all_rng_states()
        if is_main():
            tensors = {n: p.detach() for n, p in params.items()}
            if ema:
                tensors.update({f"ema.{n}": w for n, w in ema.weights.items()})
            save_checkpoint(out, it, tensors, {"optimizer": opt.state_dict(), "rng": states, "step": it,
                                               "elapsed": elapsed, "bad_streak": bad_streak})
        barrier()

    if it == 0:
        first = evaluate("before")
        if metrics:
            metrics.write({"step": 0, "elapsed_s": 0.0, **first})
            info(step_line(0, cfg.iterations, **first), who="grpo")

    n_total = cfg.prompts_per_iter * cfg.group_size
    mine = list(range(rank, n_total, world))
    bar = progress(range(it, cfg.iterations), desc="grpo", unit="it") if is_main() else range(it, cfg.iterations)
    last: dict = {}
    for _ in bar:
        t0 = time.perf_counter()
        pool = cfg.warmup_prompts if it < cfg.warmup_iterations else train_prompts
        groups, steps = iteration_plan(cfg, len(pool), it, w1 - w0)
        prompts = [pool[groups[n // cfg.group_size]] for n in mine]
        seeds = iteration_seeds(cfg, it, groups, mine)

        # 1. sample
        chunk = cfg.sample_batch or max(1, len(mine))
        with phase("sample"):
            trajs = [sampler.sample(prompts[s:s + chunk], seeds[s:s + chunk]) for s in range(0, len(mine), chunk)]
        latents = torch.cat([t.latents for t in trajs])
        old_logp = torch.cat([t.log_probs for t in trajs])
        images = torch.cat([t.images for t in trajs])
        emb, pooled = torch.cat([t.prompt_embeds for t in trajs]), torch.cat([t.pooled for t in trajs])
        sigmas = trajs[0].sigmas
        t1 = time.perf_counter()

        # 2. score (rewards of all ranks, so group statistics are global)
        with torch.no_grad(), phase("score"):
            local_r = reward_fn(images, prompts).float().cpu()
        rewards = gather_by_index(local_r, n_total, rank, world).view(cfg.prompts_per_iter, cfg.group_size)
        t2 = time.perf_counter()
        n_bad = int((~torch.isfinite(rewards)).sum())
        bad_streak = bad_streak + 1 if n_bad == rewards.numel() else 0
        if bad_streak >= cfg.max_bad_iterations:
            raise FloatingPointError(f"{bad_streak} iterations in a row without a finite reward (last at "
                                     f"iteration {it}): check the reward model and the sampler's dtype")

        # 3. advantages with Top-k filtering
        with phase("advantages"):
            res = group_advantages(rewards, top_k=cfg.top_k or None, **preset)
        adv_all, keep_all = res.advantages.reshape(-1), res.keep.reshape(-1)
        n_kept = int(keep_all.sum())
        kept_local = [i for i, n in enumerate(mine) if keep_all[n]]

        for group in opt.param_groups:  # a pure function of the iteration: nothing to checkpoint
            group["lr"] = lr_at(cfg, it)

        # 4. train on the kept samples only
        stats: dict[str, float] = {}
        if n_kept:
            idx = torch.tensor(kept_local, dtype=torch.long, device=latents.device)
            adv_local = adv_all[[mine[i] for i in kept_local]].to(device) if kept_local else \
                torch.zeros(0, device=device)
            for epoch in range(cfg.inner_epochs):
                opt.zero_grad(set_to_none=True)
                stats = policy_gradient(sampler, policy, latents[idx], old_logp[idx], emb[idx], pooled[idx],
                                        adv_local, steps, sigmas, n_kept_global=n_kept, clip_range=cfg.clip_range,
                                        kl_beta=cfg.kl_beta, on_policy=epoch == 0, micro_batch=cfg.micro_batch)
                with phase("optimizer"):
                    all_reduce_grads(params, world)
                    gnorm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip or float("inf"))
                    opt.step()
                stats["grad_norm"] = float(gnorm)
            if ema:
                ema.update(params)
        stats = _reduce_stats(stats, world)
        t3 = time.perf_counter()
        it += 1
        elapsed += t3 - t0

        finite = rewards[torch.isfinite(rewards)]
        rec = {"step": it, "reward_mean": float(finite.mean()) if finite.numel() else float("nan"),
               "reward_std": float(res.std.nanmean()),  # over the statistics set (kept samples for Spatial-RL)
               "reward_std_group": _group_std(rewards), "kept_fraction": n_kept / n_total,
               "zero_std_fraction": float((res.std <= 0).float().mean()), "nonfinite": n_bad,
               "group_mean": res.mean.tolist(), "group_std": res.std.tolist(),
               "group_prompts": [pool[g] for g in groups], **stats,
               "t_sample": t1 - t0, "t_score": t2 - t1, "t_train": t3 - t2,
               "samples_per_s": n_total / (t3 - t0), "elapsed_s": elapsed, "lr": lr_at(cfg, it - 1)}
        if device.type == "cuda":
            rec["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            rec.update(evaluate())
        last = rec
        if metrics:
            metrics.write(rec)
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"reward {rec['reward_mean']:.3f} kept {rec['kept_fraction']:.2f}")
            if "eval_reward" in rec or it % cfg.log_every == 0:
                extra = {"eval_reward": rec["eval_reward"]} if "eval_reward" in rec else {}
                mem = {"gpu_mem_gib": rec["gpu_mem_gib"]} if "gpu_mem_gib" in rec else {}
                info(step_line(it, cfg.iterations, reward=rec["reward_mean"], std=rec["reward_std_group"],
                               **extra, kept=rec["kept_fraction"], clip=rec.get("clip_fraction", 0.0),
                               approx_kl=rec.get("approx_kl", 0.0), samples_s=rec["samples_per_s"], **mem),
                     who="grpo")
        timed_out = cfg.max_minutes and elapsed >= 60 * cfg.max_minutes
        if it % cfg.save_every == 0 or it == cfg.iterations or timed_out:
            checkpoint()
        if cfg.stop_after and it >= cfg.stop_after and it < cfg.iterations:
            info(f"stopping at iteration {it} (stop_after)", who="grpo")
            shutdown()
            return {}
        if timed_out:
            info(f"time budget of {cfg.max_minutes} min reached at iteration {it}", who="grpo")
            break
    if "eval_reward" not in last:  # stopped by the time budget between evaluations
        ev = evaluate()
        last.update(ev)
        if metrics:
            metrics.write({"step": it, "elapsed_s": elapsed, **ev})
    final = {**last, **evaluate("after")} if cfg.save_grids else last
    if is_main():
        policy.save(out / "policy", ema.weights if ema else None)
        metrics.close()
        plot_run(out)
        info(f"done: policy -> {out / 'policy'}", who="grpo")
    shutdown()
    return final


def _group_std(rewards: torch.Tensor) -> float:
    """Mean over groups of the (biased) std of all finite rewards in the group."""
    stds = []
    for row in rewards:
        r = row[torch.isfinite(row)]
        if r.numel() >= 2:
            stds.append(float(r.std(unbiased=False)))
    return float(np.mean(stds)) if stds else float("nan")


def _parses(prompts: list[str]) -> bool:
    from ..data.scene import parse_prompt

    return all(parse_prompt(p) for p in prompts)


def _oracle(images, prompts, cfg) -> torch.Tensor:
    from ..rewards import oracle_reward

    return oracle_reward(images, prompts, tau=cfg.reward_tau, form=cfg.reward_form).cpu()


def _reduce_stats(stats: dict[str, float], world: int) -> dict[str, float]:
    if world == 1 or not stats:
        return stats
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)  # each rank's share is already weighted by its kept count
    out = dict(zip(keys, t.tolist(), strict=True))
    out["logp_drift"] = out["logp_drift"] / world
    out["grad_norm"] = stats["grad_norm"]  # the same on every rank (clipped after the all-reduce)
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from (a killed run wrote them)."""
    if not path.is_file():
        return
    from ..logs import read_metrics

    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    with MetricsFile(path, append=False) as m:
        for r in keep:
            m.write(r)


def _grid(images: torch.Tensor, prompts: list[str], per_prompt: int, path: Path) -> None:
    from ..plots import image_grid
    from ..sampler import to_pil

    pil = to_pil(images)
    rows = [pil[i * per_prompt:(i + 1) * per_prompt] for i in range(len(prompts))]
    image_grid(rows[:8], [p[:48] for p in prompts[:8]], path)


def plot_run(out: Path) -> None:
    from ..logs import read_metrics
    from ..plots import curves

    recs = read_metrics(out / "metrics.jsonl")
    train = [(r["step"], r["reward_mean"]) for r in recs if "reward_mean" in r]
    ev = [(r["step"], r["eval_reward"]) for r in recs if "eval_reward" in r]
    curves({"train (sampled)": train, "held-out (fixed noise, ODE)": ev}, out / "reward.png", xlabel="iteration",
           ylabel="reward")
    ev_t = [(r["elapsed_s"], r["eval_reward"]) for r in recs if "eval_reward" in r]
    curves({"held-out (fixed noise, ODE)": ev_t}, out / "reward_vs_time.png", xlabel="training seconds",
           ylabel="reward")


def compare_runs(runs: dict[str, Path], path: Path, *, key: str = "eval_reward") -> Path:
    """One PNG with the held-out reward of several runs against iterations and training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..logs import read_metrics

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110, sharey=True)
    for label, folder in runs.items():
        recs = [r for r in read_metrics(Path(folder) / "metrics.jsonl") if key in r]
        if not recs:
            raise ValueError(f"{folder} has no '{key}' records")
        axes[0].plot([r["step"] for r in recs], [r[key] for r in recs], label=label)
        axes[1].plot([r["elapsed_s"] for r in recs], [r[key] for r in recs], label=label)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("training seconds")
    axes[0].set_ylabel(key.replace("_", " "))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
