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
   of each group, statistics over the kept); non-finite rewards and (by default) zero-std groups
   get ``keep=False``; only kept samples go on;
4. **update** on a subsample of the window's timesteps: recompute each kept transition's log-prob
   under the current policy, ``kernels.flow_grpo_loss`` (optional KL to the reference policy = the
   adapter disabled), gradients summed over ranks and normalised by the global kept count, clip,
   AdamW (or SGD), EMA of the trainable weights.

Conventions (each a config key; Flow-GRPO's is the default so its hyper-parameters carry over):
``advantage: flow_grpo`` is its batch-std normalisation (``flow_grpo_per_prompt``: per-group std);
``kl_convention: flow_grpo`` divides the KL by sigma_t^2 (``exact``: by the step variance, 1/|dt|
times more); ``sampler.cps_logprob: flow_grpo`` is its CPS log-prob; ``drop_zero_std: true`` drops
zero-std groups from the loss and its denominator; ``top_k: null`` is the preset's own choice.

Every ``eval_every`` iterations the (EMA) policy samples the held-out prompts from fixed noise
with the deterministic ODE and the mean reward is logged (plus the hard pixel oracle where the
prompts follow the synthetic grammar). Checkpoints are atomic; a run started again with the same
config resumes from the newest complete one and ends with the same weights and metrics.
"""

from __future__ import annotations

import json
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
from ..rl.sampler import SamplerConfig, Trajectory
from .run import OptimConfig, PolicyConfig, all_reduce_grads, gather_by_index

TIME_KEYS = ("t_sample", "t_score", "t_train", "samples_per_s", "elapsed_s", "gpu_mem_gib")


@dataclass
class OracleRewardConfig:
    tau: float = param(60.0, min=1.0, help="soft colour assignment temperature")
    # colour-mass moments or centroids for the directions, or the evaluation judge's verdict (1 / 0 / -1)
    form: Literal["moment", "centroid", "judge"] = "moment"


@dataclass
class PythonRewardConfig:
    function: str | None = param(None, help="module:function or path/file.py:function, called as fn(images, prompts) "
                                            "with images [B, 3, H, W] in [0, 1]; returns B rewards (NaN: not scored)")


@dataclass
class SpatialScoreRewardConfig:
    model: str | None = param(None, help="SpatialScore folder (`spatialcore reward train` writes one)")
    quantize: Literal["none", "int8", "float8"] = "none"
    liger: bool = False  # liger-kernel RMSNorm/SwiGLU/RoPE in the backbone (CUDA)
    compile: bool = False  # torch.compile of the backbone's decoder layers
    # Uncertainty-aware rewards from the Gaussian head (mu, sigma): the reward is mu, or the lower
    # confidence bound mu - sigma_weight x sigma; Top-k may rank a group by that bound while the
    # advantages use the reward (an uncertain sample ranks lower at both ends: pessimism).
    form: Literal["mu", "lcb"] = param("mu", help="RL reward: mu, or mu - sigma_weight x sigma (lcb)")
    sigma_weight: float = param(1.0, min=0.0, help="lambda of the lower confidence bound mu - lambda x sigma")
    topk_by: Literal["reward", "lcb"] = param("reward", help="rank Top-k by the reward or by mu - lambda x sigma")


@dataclass
class RewardFnConfig:
    """The reward GRPO optimises: ``name`` picks the function, its own keys sit under its name."""

    name: Literal["oracle", "spatialscore", "python", "weighted"] = "oracle"
    batch: int = param(32, min=1, help="images per reward call")
    oracle: OracleRewardConfig = field(default_factory=OracleRewardConfig)
    spatialscore: SpatialScoreRewardConfig = field(default_factory=SpatialScoreRewardConfig)
    python: PythonRewardConfig = field(default_factory=PythonRewardConfig)
    # name: weighted -> the sum of weight x reward over these (each logged on its own), e.g.
    # {spatialscore: 1.0, python: 0.5}; each part's own keys stay in its section
    weights: dict[str, float] = field(default_factory=dict)

    def parts(self) -> list[str]:
        return list(self.weights) if self.name == "weighted" else [self.name]

    def check(self) -> None:
        if self.name == "weighted":
            bad = [k for k in self.weights if k not in ("oracle", "spatialscore", "python")]
            if bad or not self.weights:
                raise ConfigError("reward.weights", f"unknown parts {bad} (oracle, spatialscore, python)" if bad
                                  else "reward.name=weighted needs weights, e.g. {spatialscore: 1.0, python: 0.5}")
        elif self.weights:
            raise ConfigError("reward.weights", f"weights are for reward.name=weighted (got {self.name})")
        if "spatialscore" in self.parts() and not self.spatialscore.model:
            raise ConfigError("spatialscore.model", "reward.name=spatialscore needs a SpatialScore folder")
        if "python" in self.parts() and not self.python.function:
            raise ConfigError("reward.python.function", "give the reward as module:function or path/file.py:function")
        s = self.spatialscore
        if self.name != "spatialscore" and (s.form != "mu" or s.topk_by != "reward"):
            raise ConfigError("spatialscore.form" if s.form != "mu" else "spatialscore.topk_by",
                              f"sigma-aware rewards need reward.name=spatialscore (got {self.name}: no sigma)")


def _check_sigma_aware(r: RewardFnConfig) -> None:
    """A sigma-aware reward needs a SpatialScore that predicts sigma: one trained with ``variance_head: false`` has
    sigma = 0, and its lower bound would silently be mu."""
    s = r.spatialscore
    if "spatialscore" not in r.parts() or (s.form == "mu" and s.topk_by == "reward"):
        return
    meta = Path(s.model) / "spatialscore.json"
    if meta.is_file() and not json.loads(meta.read_text()).get("variance_head", True):
        key = "reward.spatialscore.form" if s.form != "mu" else "reward.spatialscore.topk_by"
        raise ConfigError(key, f"{s.model} was trained without a variance head (variance_head: false): its sigma is "
                               "0 and mu - lambda x sigma would be mu; train one with variance_head=true")


@dataclass
class GRPOTrainConfig:
    # keys of the flat layout this config had before its sections
    RENAMED = {**{f"reward_{k}": f"reward.spatialscore.{k}" for k in ("model", "quantize", "liger", "compile")},
               **{f"reward_{k}": f"reward.oracle.{k}" for k in ("tau", "form")}, "reward_batch": "reward.batch",
               **{k: f"policy.{k}" for k in ("lora_rank", "lora_alpha", "ema_decay", "gradient_checkpointing",
                                               "export_merged")},
               "optimizer": "optim.name", "lr_schedule": "optim.schedule",
               **{k: f"optim.{k}" for k in ("lr", "min_lr_ratio", "weight_decay", "grad_clip")}}

    model: str = param("runs/tiny/flux", help="Flux pipeline folder or hub id")
    out: str = "runs/grpo"
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])  # + tensorboard, wandb (optional packages)
    run: Literal["auto", "resume", "fresh"] = param(
        "auto", help="auto: resume a run of the same config, refuse another's; resume: there must be one; fresh: "
                     "move an existing run aside and start over")
    seed: int = param(0, min=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    reward: RewardFnConfig = field(default_factory=RewardFnConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Training prompts: an explicit list, or drawn from the synthetic generator
    # (prompt_stream: easy|medium|hard, with synth overrides) from its train split.
    prompts: list[str] = field(default_factory=lambda: ["the red circle is to the left of the blue square"])
    eval_prompts: list[str] = field(default_factory=list)
    prompt_stream: str | None = None
    # or a file: one prompt per line, or JSON Lines with a "prompt" field (eval_prompts_file likewise)
    prompts_file: str | None = None
    eval_prompts_file: str | None = None
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
    # DanceGRPO's shared initialisation: the G samples of a group start from the same initial latent and
    # differ only by the SDE noise, so a group's reward differences come from the policy's own stochastic
    # steps (what the log-prob gradient can credit), not from where each sample started.
    init_noise: Literal["per_sample", "per_group"] = "per_sample"
    group_size: int = param(16, min=2, max=1024, help="G: images per prompt")
    prompts_per_iter: int = param(2, min=1)
    top_k: int | None = param(None, min=0, help="keep the top-K and bottom-K per group (0: keep all; null: the "
                                                "advantage preset's choice, G/4 for spatial_rl and dancegrpo)")
    advantage: Literal["spatial_rl", "flow_grpo", "flow_grpo_per_prompt", "dancegrpo", "trl", "verl"] = "spatial_rl"
    drop_zero_std: bool = True  # groups whose rewards are all equal leave the loss and its denominator
    clip_range: float = param(1e-4, min=0.0)
    kl_beta: float = param(0.0, min=0.0)
    kl_convention: Literal["flow_grpo", "exact"] = "flow_grpo"  # KL / sigma_t^2 (Flow-GRPO) or / step variance
    train_timesteps: int = param(0, min=0, help="window steps trained per iteration (0: all)")
    inner_epochs: int = param(1, min=1)
    micro_batch: int = param(0, min=0, help="kept samples per forward/backward (0: all)")
    sample_batch: int = param(0, min=0, help="samples per sampler call (0: all of this rank's)")
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
        from ..logs import check_report_to

        check_report_to(self.report_to)
        self.sampler.check()
        sources = [k for k in ("prompts", "prompt_stream", "prompts_file") if getattr(self, k)]
        if not sources:
            raise ConfigError("prompts", "give training prompts, a prompts_file or a prompt_stream")
        if len(sources) > 1:
            raise ConfigError(sources[1], f"give one prompt source, not {' and '.join(sources)} (prompts: [])")
        if self.eval_prompts and self.eval_prompts_file:
            raise ConfigError("eval_prompts_file", "give eval_prompts or eval_prompts_file, not both")
        from ..data.synth import DIFFICULTIES

        if self.prompt_stream and self.prompt_stream not in DIFFICULTIES:
            raise ConfigError("prompt_stream", f"unknown preset {self.prompt_stream!r} ({', '.join(DIFFICULTIES)})")
        top_k = self.resolved_top_k()
        if top_k and 2 * top_k > self.group_size:
            raise ConfigError("top_k", f"2 x top_k = {2 * top_k} exceeds group_size={self.group_size}")
        if self.sampler.noise_level <= 0:
            raise ConfigError("sampler.noise_level", "GRPO needs stochastic (SDE) steps: noise_level > 0")
        start, end = self.sampler.window()
        if self.warmup_iterations and not self.warmup_prompts:
            raise ConfigError("warmup_prompts", "warmup_iterations > 0 needs warmup_prompts")
        if self.train_timesteps > end - start:
            raise ConfigError("train_timesteps", f"{self.train_timesteps} exceeds the SDE window ({end - start} steps)")

    def resolved_top_k(self) -> int:
        """K of the Top-k filter (0: keep every sample): the config's, else the preset's default."""
        if self.top_k is not None:
            return self.top_k
        return self.group_size // 4 if self.advantage in ("spatial_rl", "dancegrpo") else 0


# ----------------------------------------------------------------------------- pieces


def sample_seed(seed: int, iteration: int, n: int) -> int:
    """Noise seed of sample ``n`` of ``iteration`` (same on every rank and after a resume)."""
    return int(np.random.SeedSequence([seed, iteration, n]).generate_state(1)[0])


def lr_at(cfg: GRPOTrainConfig, iteration: int) -> float:
    from .run import scheduled_lr

    return scheduled_lr(cfg.optim, iteration, cfg.iterations)


def iteration_seeds(cfg: GRPOTrainConfig, iteration: int, groups: np.ndarray, samples: list[int]) -> list[int]:
    """Noise seed of each of ``samples`` (indices into the iteration's P x G samples). With
    ``common_noise`` the k-th group of each prompt shares its noise with the k-th group of every other
    prompt (repeated groups of one prompt still differ)."""
    G = cfg.group_size
    if not cfg.common_noise:
        return [sample_seed(cfg.seed, iteration, n) for n in samples]
    occurrence = [int((groups[:g] == groups[g]).sum()) for g in range(len(groups))]
    return [sample_seed(cfg.seed, iteration, occurrence[n // G] * G + n % G) for n in samples]


def init_seeds(cfg: GRPOTrainConfig, iteration: int, groups: np.ndarray, samples: list[int]) -> list[int] | None:
    """Initial-latent seed of each of ``samples`` with ``init_noise: per_group`` (one per group; with
    ``common_noise`` shared by the k-th group of every prompt), else None (each sample's own seed)."""
    if cfg.init_noise == "per_sample":
        return None
    G = cfg.group_size
    key = [int((groups[:g] == groups[g]).sum()) if cfg.common_noise else g for g in range(len(groups))]
    return [int(np.random.SeedSequence([cfg.seed, iteration, key[n // G], 1]).generate_state(1)[0]) for n in samples]


def iteration_plan(cfg: GRPOTrainConfig, n_prompts: int, iteration: int, window: int) -> tuple[np.ndarray, list[int]]:
    """(prompt index per group ``[P]``, trained window steps) for one iteration."""
    rng = np.random.default_rng([cfg.seed, iteration, 7])
    groups = rng.choice(n_prompts, cfg.prompts_per_iter, replace=n_prompts < cfg.prompts_per_iter)
    k = cfg.train_timesteps or window
    steps = sorted(rng.choice(window, k, replace=False).tolist())
    return groups, steps


def policy_gradient(sampler, policy, traj_latents: torch.Tensor, old_logp: torch.Tensor, emb: torch.Tensor,
                    pooled: torch.Tensor, adv: torch.Tensor, keep: torch.Tensor, steps: list[int],
                    sigmas: torch.Tensor, *, n_kept_global: int, clip_range: float, kl_beta: float,
                    on_policy: bool, micro_batch: int, kl_convention: str = "flow_grpo") -> dict[str, float]:
    """Accumulate the GRPO gradient of this rank's samples (``[B, ...]`` inputs, ``keep [B]`` bool)
    into ``.grad``. Only kept rows are forwarded; the others cost nothing.

    The loss is the mean over all ranks' kept samples and the trained steps: each micro-batch's
    mean loss is weighted by its share of the global kept count. ``on_policy``: the policy has not
    changed since sampling, so the old log-prob is the recomputed one (ratio exactly 1) and the
    stored one only measures drift.
    """
    from ..kernels import flow_grpo_loss, kl_std

    idx = keep.nonzero().squeeze(1)
    Bk = idx.numel()
    stats = {"clip_fraction": 0.0, "approx_kl": 0.0, "kl": 0.0, "logp_drift": 0.0, "loss": 0.0}
    if Bk == 0:
        return stats
    mb = micro_batch or Bk
    T = len(steps)
    cps = sampler.cfg.sde_type == "cps"
    for s in range(0, Bk, mb):
        rows = idx[s:s + mb]
        lat, e, pool, a = traj_latents[rows], emb[rows], pooled[rows], adv[rows]
        w = rows.numel() / n_kept_global / T
        ones = torch.ones(rows.numel(), dtype=torch.bool, device=adv.device)
        for j in steps:
            lp, mean, std = sampler.step_logprob(lat, j, sigmas, e, pool)
            stored = old_logp[rows, j]
            stats["logp_drift"] = max(stats["logp_drift"], float((lp.detach() - stored).abs().max()))
            old = lp.detach() if on_policy else stored
            kl_args = {}
            if kl_beta > 0:
                with torch.no_grad(), policy.reference() as ref:
                    _, mean_ref, _ = sampler.step_logprob(lat, j, sigmas, e, pool, ref)
                s_kl = kl_std(std, sigmas[j], sigmas[j + 1], convention=kl_convention, cps=cps)
                kl_args = {"kl_mean_new": mean, "kl_mean_ref": mean_ref, "kl_std": s_kl, "kl_beta": kl_beta}
            res = flow_grpo_loss(lp, old, a, ones, clip_range, **kl_args)
            with phase("backward"):
                (res.loss * w).backward()
            stats["loss"] += float(res.loss.detach()) * w
            stats["clip_fraction"] += float(res.clip_fraction) * w
            stats["approx_kl"] += float(res.approx_kl) * w
            stats["kl"] += float(res.kl) * w if res.kl is not None else 0.0
    return stats


# ----------------------------------------------------------------------------- the trainer


class GRPOTrainer:
    """Spatial-RL: ``__init__`` builds prompts, models, optimizer from the config (and resumes from
    the run folder), ``train_step()`` is one iteration (sample -> score -> advantages -> update),
    ``state_dict()`` is what a checkpoint holds, ``run()`` is the loop."""

    def __init__(self, cfg: GRPOTrainConfig):
        from ..dist import start_run
        from .run import find_checkpoint, open_metrics, restore

        self.cfg = cfg
        self.rank, self.world, self.device = start_run(cfg)
        self.out = Path(cfg.out)
        self.n_total = cfg.prompts_per_iter * cfg.group_size
        if self.n_total % self.world:
            raise ConfigError("prompts_per_iter", f"prompts_per_iter x group_size = {self.n_total} samples per "
                                                  f"iteration cannot be split evenly over {self.world} ranks")
        self.mine = list(range(self.rank, self.n_total, self.world))  # sample n lives on rank n % world
        ckpt = find_checkpoint(self.out, who="grpo")
        self._init_prompts()
        self._init_models()
        self.it, self.elapsed, self.bad_streak = 0, 0.0, 0
        if ckpt is not None:
            self.load_state_dict(*restore(ckpt, self.rank, who="grpo"))
        self.metrics = open_metrics(self.out, self.it, cfg)
        self.last: dict = {}

    def _init_prompts(self) -> None:
        """Prompts before any model: a bad prompt source fails fast."""
        from ..data.prompts import read_prompts

        cfg = self.cfg
        held_out = list(cfg.eval_prompts) or (read_prompts(cfg.eval_prompts_file, "eval_prompts_file")
                                              if cfg.eval_prompts_file else [])
        if cfg.prompt_stream:
            from ..data.synth import split_prompts

            self.train_prompts = split_prompts(cfg.prompt_stream, cfg.stream, "train", cfg.n_stream_prompts, cfg.seed)
            self.eval_prompts = held_out or split_prompts(cfg.prompt_stream, cfg.stream, "test",
                                                          max(1, cfg.n_stream_prompts // 8), cfg.seed)
        else:
            train = read_prompts(cfg.prompts_file, "prompts_file") if cfg.prompts_file else list(cfg.prompts)
            self.train_prompts, self.eval_prompts = train, held_out or train
        self.oracle_ok = _parses(self.eval_prompts)

    def _init_models(self) -> None:
        from ..kernels import ADVANTAGE_PRESETS
        from ..rl.policy import EMA, Policy
        from ..rl.reward_fns import make_reward
        from ..rl.sampler import FluxSampler, load_pipeline
        from .run import make_optimizer

        cfg = self.cfg
        _check_sigma_aware(cfg.reward)
        dtype = getattr(torch, cfg.dtype)
        pipe = load_pipeline(cfg.model, dtype=dtype, device=self.device)
        if self.device.type == "cuda":
            info(f"attention: SDPA with {sdpa_for_training(self.device)}", who="grpo")
        self.policy = Policy(pipe.transformer, lora_rank=cfg.policy.lora_rank, lora_alpha=cfg.policy.lora_alpha,
                             need_reference=cfg.kl_beta > 0)
        if cfg.policy.gradient_checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        self.sampler = FluxSampler(pipe, cfg.sampler)
        r, s = cfg.reward, cfg.reward.spatialscore

        def part(name: str):
            return make_reward(name, model=s.model, device=self.device, quantize=s.quantize, tau=r.oracle.tau,
                               form=r.oracle.form, batch_size=r.batch, liger=s.liger, compile=s.compile,
                               score_form=s.form, sigma_weight=s.sigma_weight, function=r.python.function)

        if r.name == "weighted":
            from ..rl.reward_fns import WeightedReward

            self.reward_fn = WeightedReward({k: (w, part(k)) for k, w in r.weights.items()})
        else:
            self.reward_fn = part(r.name)
        self.params = self.policy.params
        self.opt = make_optimizer(cfg.optim.name, [{"params": list(self.params.values()), "lr": cfg.optim.lr}],
                                  weight_decay=cfg.optim.weight_decay)
        self.ema = EMA(self.params, cfg.policy.ema_decay) if cfg.policy.ema_decay > 0 else None
        self.preset = dict(ADVANTAGE_PRESETS[cfg.advantage])
        self.top_k = cfg.resolved_top_k()
        self.lcb_topk = bool(self.top_k) and r.name == "spatialscore" and s.topk_by == "lcb"
        self.window = cfg.sampler.window()
        if is_main():
            w0, w1 = self.window
            info(f"policy: {'LoRA r' + str(cfg.policy.lora_rank) if cfg.policy.lora_rank else 'full'} "
                 f"({self.policy.n_trainable:,} trainable), reward {cfg.reward.name}, G={cfg.group_size} x "
                 f"P={cfg.prompts_per_iter}, top_k={self.top_k or 'off'}, advantage {cfg.advantage}, SDE window "
                 f"[{w0}, {w1}) of {cfg.sampler.steps}, {self.world} rank(s) x {len(self.mine)} samples, "
                 f"{len(self.train_prompts)} train / {len(self.eval_prompts)} eval prompts", who="grpo")

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {n: p.detach() for n, p in self.params.items()}
        if self.ema:
            tensors.update({f"ema.{n}": w for n, w in self.ema.weights.items()})
        return tensors, {"optimizer": self.opt.state_dict(), "step": self.it, "elapsed": self.elapsed,
                         "bad_streak": self.bad_streak}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        missing = [n for n in self.params if n not in tensors]
        if missing:
            raise ConfigError("out", f"{self.out} holds a checkpoint of another policy (it lacks {missing[0]}): "
                                     f"use a new out folder")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[n])
            if self.ema:
                for n in self.params:
                    self.ema.weights[n].copy_(tensors[f"ema.{n}"])
        self.opt.load_state_dict(state["optimizer"])
        self.it, self.elapsed, self.bad_streak = state["step"], state["elapsed"], state["bad_streak"]

    def save(self) -> None:
        from .run import checkpoint

        tensors, state = self.state_dict()
        checkpoint(self.out, self.it, tensors, state)

    # ------------------------------------------------------------------ one iteration

    def train_step(self) -> dict:
        """One iteration: sample -> score -> advantages -> update (kept samples only)."""
        from ..rl.reward_fns import lower_bound

        cfg, t0 = self.cfg, time.perf_counter()
        pool = cfg.warmup_prompts if self.it < cfg.warmup_iterations else self.train_prompts
        groups, steps = iteration_plan(cfg, len(pool), self.it, self.window[1] - self.window[0])
        prompts = [pool[groups[n // cfg.group_size]] for n in self.mine]
        seeds = iteration_seeds(cfg, self.it, groups, self.mine)

        with phase("sample"):
            traj = self._sample(prompts, seeds, init_seeds(cfg, self.it, groups, self.mine))
        t1 = time.perf_counter()

        shape = (cfg.prompts_per_iter, cfg.group_size)
        with torch.no_grad(), phase("score"):  # rewards of all ranks: group statistics are global
            rank_key = None
            if self.lcb_topk:
                mu, sigma = self.reward_fn.scores(traj.images, prompts)
                local = self.reward_fn.reward(mu, sigma).float().cpu()
                rank_key = gather_by_index(lower_bound(mu, sigma, cfg.reward.spatialscore.sigma_weight).float().cpu(),
                                           self.n_total, self.rank, self.world).view(shape)
            else:
                local = self.reward_fn(traj.images, prompts).float().cpu()
        rewards = gather_by_index(local, self.n_total, self.rank, self.world).view(shape)
        parts = {f"reward_{k}_mean": float(gather_by_index(v.float().cpu(), self.n_total, self.rank, self.world).nanmean())
                 for k, v in getattr(self.reward_fn, "last", {}).items()}
        n_bad = self._check_rewards(rewards)
        t2 = time.perf_counter()

        with phase("advantages"):
            res = ranked_advantages(rewards, rank_key, self.top_k, drop_zero_std=cfg.drop_zero_std, **self.preset)
        n_kept = int(res.keep.sum())

        stats = self._update(traj, res.advantages.reshape(-1), res.keep.reshape(-1), steps, n_kept)
        t3 = time.perf_counter()
        self.it += 1
        self.elapsed += t3 - t0
        return {"step": self.it, **_reward_record(rewards, res, n_kept, n_bad), **parts, "group_prompts":
                [pool[g] for g in groups], **stats, "t_sample": t1 - t0, "t_score": t2 - t1, "t_train": t3 - t2,
                "samples_per_s": self.n_total / (t3 - t0), "elapsed_s": self.elapsed, "lr": lr_at(cfg, self.it - 1)}

    def _sample(self, prompts: list[str], seeds: list[int], inits: list[int] | None) -> Trajectory:
        chunk = self.cfg.sample_batch or max(1, len(prompts))
        return Trajectory.cat([self.sampler.sample(prompts[s:s + chunk], seeds[s:s + chunk],
                                                   init_seeds=inits[s:s + chunk] if inits else None)
                               for s in range(0, len(prompts), chunk)])

    def _check_rewards(self, rewards: torch.Tensor) -> int:
        """Count non-finite rewards (they get keep=False); stop after ``max_bad_iterations`` iterations
        in a row without a single finite reward."""
        from .run import TrainingError

        n_bad = int((~torch.isfinite(rewards)).sum())
        self.bad_streak = self.bad_streak + 1 if n_bad == rewards.numel() else 0
        if n_bad and is_main():
            info(f"iteration {self.it + 1}: {n_bad} of {rewards.numel()} rewards are not finite (excluded)", who="grpo")
        if self.bad_streak >= self.cfg.max_bad_iterations:
            raise TrainingError(f"{self.bad_streak} iterations in a row without a finite reward (iterations "
                                f"{self.it + 2 - self.bad_streak}-{self.it + 1}); the last checkpoint is intact: "
                                f"check the reward model and the sampler's dtype")
        return n_bad

    def _update(self, traj: Trajectory, adv_all: torch.Tensor, keep_all: torch.Tensor, steps: list[int],
                n_kept: int) -> dict[str, float]:
        """Policy-gradient step(s) on the kept samples (``inner_epochs``), then the EMA."""
        cfg = self.cfg
        for group in self.opt.param_groups:  # a pure function of the iteration: nothing to checkpoint
            group["lr"] = lr_at(cfg, self.it)
        stats: dict[str, float] = {}
        if n_kept:
            adv = adv_all[self.mine].to(self.device)
            keep = keep_all[self.mine].to(self.device)
            for epoch in range(cfg.inner_epochs):
                self.opt.zero_grad(set_to_none=True)
                stats = policy_gradient(self.sampler, self.policy, traj.latents, traj.log_probs, traj.prompt_embeds,
                                        traj.pooled, adv, keep, steps, traj.sigmas, n_kept_global=n_kept,
                                        clip_range=cfg.clip_range, kl_beta=cfg.kl_beta, on_policy=epoch == 0,
                                        micro_batch=cfg.micro_batch, kl_convention=cfg.kl_convention)
                with phase("optimizer"):
                    all_reduce_grads(self.params, self.world)
                    gnorm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.optim.grad_clip or float("inf"))
                    self.opt.step()
                stats["grad_norm"] = float(gnorm)
            if self.ema:
                self.ema.update(self.params)
        return _reduce_stats(stats, self.world)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, tag: str | None = None) -> dict:
        """Held-out prompts x ``eval_seeds`` fixed noises, deterministic ODE, (EMA) policy."""
        from ..rl.reward_fns import oracle_hard

        cfg, rank, world = self.cfg, self.rank, self.world
        prompts = [p for p in self.eval_prompts for _ in range(cfg.eval_seeds)]
        seeds = [10_000_019 + i for i in range(len(prompts))]  # fixed, disjoint from training draws
        mine = list(range(rank, len(prompts), world))
        my_prompts = [prompts[i] for i in mine]
        with torch.no_grad(), self.policy.swapped(self.ema.weights if self.ema else None):
            traj = self.sampler.sample(my_prompts, [seeds[i] for i in mine], sde=False)
        r = gather_by_index(self.reward_fn(traj.images, my_prompts), len(prompts), rank, world)
        res = {"eval_reward": float(r.nanmean())}
        if self.oracle_ok and cfg.reward.name != "oracle":
            o = gather_by_index(_oracle(traj.images, my_prompts, cfg), len(prompts), rank, world)
            res["eval_oracle"] = float(o.nanmean())
        if self.oracle_ok:
            from ..eval.judge import judge_synthetic
            from ..rl.sampler import to_pil

            _, acc = oracle_hard(traj.images, my_prompts)
            res["eval_oracle_acc"] = float(gather_by_index(acc, len(prompts), rank, world).nanmean())
            # the judge of `spatialcore eval`: both objects found, and GenEval's position rule
            found, correct = judge_synthetic(to_pil(traj.images), my_prompts)
            if found is not None:
                res["eval_found"] = float(gather_by_index(found, len(prompts), rank, world).nanmean())
                res["eval_relation_acc"] = float(gather_by_index(correct, len(prompts), rank, world).nanmean())
        if tag and cfg.save_grids and is_main() and world == 1:
            _grid(traj.images, self.eval_prompts, cfg.eval_seeds, self.out / f"samples_{tag}.png")
            if self.metrics:
                self.metrics.image(f"samples/{tag}", self.out / f"samples_{tag}.png", self.it)
        return res

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        """Train to ``iterations`` (or ``stop_after`` / ``max_minutes``), then save the policy."""
        from ..dist import shutdown

        cfg = self.cfg
        if self.it == 0:
            first = self.evaluate("before")
            if self.metrics:
                self.metrics.write({"step": 0, "elapsed_s": 0.0, **first})
                info(step_line(0, cfg.iterations, **first), who="grpo")
        its = range(self.it, cfg.iterations)
        bar = progress(its, desc="grpo", unit="it") if is_main() else its
        timed_out = False
        for _ in bar:
            rec = self.train_step()
            if self.it % cfg.eval_every == 0 or self.it == cfg.iterations:
                rec.update(self.evaluate())
            self.last = rec
            self._log(rec, bar)
            timed_out = bool(cfg.max_minutes and self.elapsed >= 60 * cfg.max_minutes)
            if (self.it % cfg.save_every == 0 or self.it == cfg.iterations or timed_out) and not self.bad_streak:
                self.save()
            if cfg.stop_after and cfg.iterations > self.it >= cfg.stop_after:
                info(f"stopping at iteration {self.it} (stop_after)", who="grpo")
                shutdown()
                return {}
            if timed_out:
                info(f"time budget of {cfg.max_minutes} min reached at iteration {self.it}", who="grpo")
                break
        return self._finish(timed_out)

    def _log(self, rec: dict, bar) -> None:
        if self.device.type == "cuda":
            rec["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if not self.metrics:
            return
        self.metrics.write(rec)
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"reward {rec['reward_mean']:.3f} kept {rec['kept_fraction']:.2f}")
        if "eval_reward" in rec or self.it % self.cfg.log_every == 0:
            extra = {k: rec[k] for k in ("eval_reward", "nonfinite", "gpu_mem_gib") if rec.get(k)}
            info(step_line(self.it, self.cfg.iterations, reward=rec["reward_mean"], std=rec["reward_std_group"],
                           kept=rec["kept_fraction"], clip=rec.get("clip_fraction", 0.0),
                           approx_kl=rec.get("approx_kl", 0.0), samples_s=rec["samples_per_s"], **extra), who="grpo")

    def _finish(self, timed_out: bool) -> dict:
        from ..dist import shutdown

        if timed_out and "eval_reward" not in self.last:  # stopped by the time budget between evaluations
            ev = self.evaluate()
            self.last.update(ev)
            if self.metrics:
                self.metrics.write({"step": self.it, "elapsed_s": self.elapsed, **ev})
        final = {**self.last, **self.evaluate("after")} if self.cfg.save_grids or not self.last else self.last
        if is_main():
            self.policy.save(self.out / "policy", self.ema.weights if self.ema else None, merged=self.cfg.policy.export_merged)
            self.metrics.close()
            plot_run(self.out)
            info(f"done: policy -> {self.out / 'policy'}", who="grpo")
        shutdown()
        return final


def train(cfg: GRPOTrainConfig) -> dict:
    """Build a :class:`GRPOTrainer` from ``cfg`` and run it (resuming from ``cfg.out``)."""
    cfg.check()
    return GRPOTrainer(cfg).run()


def topk_mask(key: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[P, G]`` bool: the ``top_k`` highest and ``top_k`` lowest finite entries of each row of ``key``
    (ties in index order, as the advantage kernel breaks them)."""
    valid = torch.isfinite(key)
    order = torch.sort(torch.where(valid, key, float("-inf")), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(key.shape[1]).expand_as(order))
    n_valid = valid.sum(1, keepdim=True)
    return valid & ((rank < top_k) | (rank >= n_valid - top_k))


def ranked_advantages(rewards: torch.Tensor, rank_key: torch.Tensor | None, top_k: int, **kwargs):
    """Group advantages of ``rewards [P, G]`` with Top-k: ranked by the rewards themselves (the fused
    kernel's own filter), or by ``rank_key`` (e.g. SpatialScore's lower confidence bound). In the
    second case the samples outside the key's Top-k leave as non-finite rewards do: no statistics, no
    advantage, ``keep=False``; the kept ones get their advantage from their reward."""
    from ..kernels import group_advantages

    if rank_key is None or not top_k:
        return group_advantages(rewards, top_k=top_k or None, **kwargs)
    keep = topk_mask(rank_key, top_k) & torch.isfinite(rewards)
    if kwargs.get("stats_over", "kept") == "kept":
        return group_advantages(torch.where(keep, rewards, float("nan")), top_k=None, **kwargs)
    res = group_advantages(rewards, top_k=None, **kwargs)  # statistics over the whole group, then the filter
    res.keep = res.keep & keep
    res.advantages = torch.where(res.keep, res.advantages, torch.zeros_like(res.advantages))
    return res


def _reward_record(rewards: torch.Tensor, res, n_kept: int, n_bad: int) -> dict:
    """The iteration's reward numbers (NaN-free where a finite number exists)."""
    finite = rewards[torch.isfinite(rewards)]
    return {"reward_mean": float(finite.mean()) if finite.numel() else float("nan"),
            "reward_std": float(res.std.nanmean()),  # over the statistics set (kept samples for Spatial-RL)
            "reward_std_group": _group_std(rewards), "kept_fraction": n_kept / rewards.numel(),
            "zero_std_fraction": float((res.std <= 0).float().mean()), "nonfinite": n_bad,
            "group_mean": res.mean.tolist(), "group_std": res.std.tolist()}


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
    from ..rl.reward_fns import oracle_reward

    return oracle_reward(images, prompts, tau=cfg.reward.oracle.tau, form=cfg.reward.oracle.form).cpu()


def _reduce_stats(stats: dict[str, float], world: int) -> dict[str, float]:
    from ..dist import all_reduce_

    if world == 1 or not stats:
        return stats
    keys = sorted(stats)
    t = all_reduce_(torch.tensor([stats[k] for k in keys], dtype=torch.float64))  # shares already weighted
    out = dict(zip(keys, t.tolist(), strict=True))
    out["logp_drift"] = out["logp_drift"] / world
    out["grad_norm"] = stats["grad_norm"]  # the same on every rank (clipped after the all-reduce)
    return out


def _grid(images: torch.Tensor, prompts: list[str], per_prompt: int, path: Path) -> None:
    from ..plots import image_grid
    from ..rl.sampler import to_pil

    pil = to_pil(images)
    rows = [pil[i * per_prompt:(i + 1) * per_prompt] for i in range(len(prompts))]
    image_grid(rows[:8], [p[:48] for p in prompts[:8]], path)


def plot_run(out: Path) -> None:
    from ..logs import read_metrics
    from ..plots import curves

    recs = read_metrics(out / "metrics.jsonl")
    train = [(r["step"], r["reward_mean"]) for r in recs if r.get("reward_mean") is not None]
    ev = [(r["step"], r["eval_reward"]) for r in recs if r.get("eval_reward") is not None]
    curves({"train (sampled)": train, "held-out (fixed noise, ODE)": ev}, out / "reward.png", xlabel="iteration",
           ylabel="reward")
    ev_t = [(r["elapsed_s"], r["eval_reward"]) for r in recs if r.get("eval_reward") is not None]
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
