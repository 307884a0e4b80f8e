"""Spatial-RL trainer: GRPO with Top-k filtering on a Flux generator (the loop is ``trainer.Trainer``).

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
zero-std groups from the loss and its denominator; ``top_k: preset`` is the preset's own K (``null``: every sample).

Before the first iteration and every ``eval_every`` iterations the (EMA) policy samples the held-out prompts
from fixed noise with the deterministic ODE (``eval.heldout``) and the mean reward is logged, with the judge of
``spatialcore eval`` where the prompts follow the synthetic grammar. The run ends with ``out/policy``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from ..config import ConfigError, param
from ..dist import all_reduce_grads, gather_by_index, is_main
from ..gpu import PhasePeaks, sdpa_for_training, value_of
from ..logs import info
from ..phases import phase
from ..rl.policy import PolicyConfig
from ..rl.sampler import SamplerConfig, Trajectory
from .nft import NFTConfig, NFTObjective
from .optim import OptimConfig
from .trainer import RunConfig, Trainer


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
    """A sigma-aware reward needs a SpatialScore that predicts sigma: one trained without a variance head has
    sigma = 0, and its lower bound would silently be mu."""
    from ..reward.model import read_meta

    s = r.spatialscore
    if "spatialscore" not in r.parts() or (s.form == "mu" and s.topk_by == "reward"):
        return
    try:
        has_sigma = read_meta(s.model)["variance_head"]
    except FileNotFoundError:
        return  # the command line names a folder that is not a SpatialScore
    if not has_sigma:
        key = "reward.spatialscore.form" if s.form != "mu" else "reward.spatialscore.topk_by"
        raise ConfigError(key, f"{s.model} was trained without a variance head (spatialscore.variance_head: false): "
                               "its sigma is 0 and mu - lambda x sigma would be mu; train one with "
                               "spatialscore.variance_head=true")


@dataclass
class GRPOTrainConfig(RunConfig):
    KIND: ClassVar[str] = "grpo"
    # keys of the flat layout this config had before its sections
    RENAMED: ClassVar[dict[str, str]] = {**{f"reward_{k}": f"reward.spatialscore.{k}" for k in ("model", "quantize", "liger", "compile")},
               **{f"reward_{k}": f"reward.oracle.{k}" for k in ("tau", "form")}, "reward_batch": "reward.batch",
               **{k: f"policy.{k}" for k in ("lora_rank", "lora_alpha", "ema_decay", "gradient_checkpointing",
                                               "export_merged")},
               "optimizer": "optim.name", "lr_schedule": "optim.schedule",
               **{k: f"optim.{k}" for k in ("lr", "min_lr_ratio", "weight_decay", "grad_clip")}}

    parallel: Literal["ddp", "fsdp2"] = param(
        "ddp", help="under torchrun: ddp, every rank holds the whole policy and the gradients are summed; fsdp2, the "
                    "policy transformer (with its EMA, full fine-tuning's reference copy, gradients and optimizer "
                    "state) sharded per block over the ranks: full fine-tuning of FLUX.1-dev")
    objective: Literal["grpo", "nft"] = param(
        "grpo", help="grpo: Flow-GRPO's clipped policy gradient on the SDE steps' log-probs; nft: DiffusionNFT's "
                     "forward-process loss on the clean samples of an old policy (nft.*)")
    nft: NFTConfig = field(default_factory=NFTConfig)
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
    top_k: int | Literal["preset"] | None = param(
        "preset", help="keep the top-K and bottom-K of each group (null: every sample; preset: the advantage preset's "
                       "K, G // 4 for spatial_rl and dancegrpo, every sample for the others)")
    advantage: Literal["spatial_rl", "flow_grpo", "flow_grpo_per_prompt", "dancegrpo", "trl", "verl"] = "spatial_rl"
    drop_zero_std: bool = True  # groups whose rewards are all equal leave the loss and its denominator
    clip_range: float = param(1e-4, min=0.0)
    kl_beta: float = param(0.0, min=0.0)
    kl_convention: Literal["flow_grpo", "exact"] = "flow_grpo"  # KL / sigma_t^2 (Flow-GRPO) or / step variance
    train_timesteps: int = param(0, min=0, help="window steps trained per iteration (0: all)")
    inner_epochs: int = param(1, min=1)
    sample_batch: int = param(0, min=0, help="samples per sampler call, in training and evaluation (0: all of this "
                                             "rank's at once)")
    iterations: int = param(300, min=1)
    eval_seeds: int = param(8, min=1, help="fixed noise seeds per held-out prompt")
    save_grids: bool = True
    max_bad_iterations: int = param(3, min=1, help="stop after this many iterations in a row with no finite reward")

    def check(self) -> None:
        super().check()
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
        if self.top_k == 0 or (isinstance(self.top_k, int) and self.top_k < 0):
            raise ConfigError("top_k", f"{self.top_k} is not a K: write top_k: null to keep every sample")
        top_k = self.resolved_top_k()
        if top_k and 2 * top_k > self.group_size:
            raise ConfigError("top_k", f"2 x top_k = {2 * top_k} exceeds group_size={self.group_size}")
        start, end = self.sampler.window()
        if self.objective == "nft":
            if self.init_noise == "per_group":
                raise ConfigError("init_noise", "objective nft samples with the deterministic ODE: a group sharing "
                                                "its initial latent would be one image G times (per_sample)")
            if self.inner_epochs > 1:
                raise ConfigError("inner_epochs", "objective nft takes one optimizer step per iteration")
            start, end = 0, self.sampler.steps  # it trains on the sampler's timesteps, not an SDE window
        elif self.sampler.noise_level <= 0:
            raise ConfigError("sampler.noise_level", "GRPO needs stochastic (SDE) steps: noise_level > 0")
        if self.parallel == "fsdp2" and self.objective != "grpo":
            raise ConfigError("parallel", f"parallel=fsdp2 runs objective grpo (objective {self.objective}: ddp)")
        if self.parallel == "fsdp2" and self.sampler.compile != "none":
            raise ConfigError("sampler.compile", "a sharded policy samples eagerly: sampler.compile=none with "
                                                 "parallel=fsdp2")
        if self.warmup_iterations and not self.warmup_prompts:
            raise ConfigError("warmup_prompts", "warmup_iterations > 0 needs warmup_prompts")
        if self.optim.warmup_steps >= self.iterations:
            raise ConfigError("optim.warmup_steps", f"{self.optim.warmup_steps} must be < iterations={self.iterations}")
        if self.train_timesteps > end - start:
            raise ConfigError("train_timesteps", f"{self.train_timesteps} exceeds the "
                                                 f"{'SDE window' if self.objective == 'grpo' else 'sampling steps'} "
                                                 f"({end - start} steps)")

    def resolved_top_k(self) -> int | None:
        """K of the Top-k filter (None: every sample): the config's, or the advantage preset's own."""
        from ..kernels import preset_top_k

        return preset_top_k(self.advantage, self.group_size) if self.top_k == "preset" else self.top_k


# ----------------------------------------------------------------------------- pieces


def sample_seed(seed: int, iteration: int, n: int) -> int:
    """Noise seed of sample ``n`` of ``iteration`` (same on every rank and after a resume)."""
    return int(np.random.SeedSequence([seed, iteration, n]).generate_state(1)[0])


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
                    on_policy: bool, micro_batch: int, kl_convention: str = "flow_grpo",
                    micro_steps: int | None = None, grad_scale: float = 1.0) -> dict[str, float]:
    """Accumulate the GRPO gradient of this rank's samples (``[B, ...]`` inputs, ``keep [B]`` bool)
    into ``.grad``. Only kept rows are forwarded; the others cost nothing.

    The loss is the mean over all ranks' kept samples and the trained steps: each micro-batch's
    mean loss is weighted by its share of the global kept count. ``on_policy``: the policy has not
    changed since sampling, so the old log-prob is the recomputed one (ratio exactly 1) and the
    stored one only measures drift. ``micro_steps``: run exactly this many micro-batches (a sharded policy's
    ranks must make the same forward and backward calls): the ones beyond this rank's kept rows forward its
    first row with weight 0 (their gradient is zero; their gathers and reductions are the other ranks').
    ``grad_scale`` multiplies what is backpropagated (FSDP2 averages gradients over ranks where this function's
    weights expect a sum: the number of ranks).
    """
    from ..kernels import flow_grpo_loss, kl_std

    idx = keep.nonzero().squeeze(1)
    Bk = idx.numel()
    stats = {"clip_fraction": 0.0, "approx_kl": 0.0, "kl": 0.0, "logp_drift": 0.0, "loss": 0.0}
    mb = micro_batch or max(Bk, 1)
    chunks = [idx[s:s + mb] for s in range(0, Bk, mb)]
    if micro_steps is not None:
        chunks += [None] * (micro_steps - len(chunks))  # padding: weight 0
    T = len(steps)
    cps = sampler.cfg.sde_type == "cps"
    for chunk in chunks:
        rows = chunk if chunk is not None else torch.zeros(1, dtype=torch.long, device=idx.device)
        lat, e, pool, a = traj_latents[rows], emb[rows], pooled[rows], adv[rows]
        w = rows.numel() / n_kept_global / T if chunk is not None else 0.0
        ones = torch.ones(rows.numel(), dtype=torch.bool, device=adv.device)
        for j in steps:
            lp, mean, std = sampler.step_logprob(lat, j, sigmas, e, pool)
            stored = old_logp[rows, j]
            if chunk is not None:
                stats["logp_drift"] = max(stats["logp_drift"], value_of((lp.detach() - stored).abs().max()))
            old = lp.detach() if on_policy else stored
            kl_args = {}
            if kl_beta > 0:
                with torch.no_grad(), policy.reference() as ref:
                    _, mean_ref, _ = sampler.step_logprob(lat, j, sigmas, e, pool, ref)
                s_kl = kl_std(std, sigmas[j], sigmas[j + 1], convention=kl_convention, cps=cps)
                kl_args = {"kl_mean_new": mean, "kl_mean_ref": mean_ref, "kl_std": s_kl, "kl_beta": kl_beta}
            res = flow_grpo_loss(lp, old, a, ones, clip_range, **kl_args)
            with phase("backward"):
                (res.loss * (w * grad_scale)).backward()
            if chunk is None:
                continue
            stats["loss"] += value_of(res.loss.detach()) * w
            stats["clip_fraction"] += value_of(res.clip_fraction) * w
            stats["approx_kl"] += value_of(res.approx_kl) * w
            stats["kl"] += value_of(res.kl) * w if res.kl is not None else 0.0
    return stats


# ----------------------------------------------------------------------------- the reward


def make_reward(r: RewardFnConfig, device: torch.device, name: str | None = None):
    """The reward function ``fn(images, prompts) -> [B]`` that ``reward`` names (or its part ``name``): the pixel
    oracle's dense forms, the evaluation's judge, SpatialScore, a user's Python function, or their weighted sum."""
    from ..rl import reward_fns

    name = name or r.name
    if name == "weighted":
        return reward_fns.WeightedReward({k: (w, make_reward(r, device, k)) for k, w in r.weights.items()})
    if name == "oracle" and r.oracle.form == "judge":
        from ..eval.judge import judge_reward

        return judge_reward
    if name == "oracle":
        tau, form = r.oracle.tau, r.oracle.form
        return lambda images, prompts: reward_fns.oracle_reward(images, prompts, tau=tau, form=form)
    if name == "python":
        return reward_fns.PythonReward(r.python.function)
    s = r.spatialscore
    return reward_fns.SpatialScoreReward(s.model, device=device, quantize=s.quantize, batch_size=r.batch,
                                         liger=s.liger, compile=s.compile, form=s.form, sigma_weight=s.sigma_weight)


class GRPOObjective:
    """The Spatial-RL trainer's step under ``objective: grpo`` (Flow-GRPO): the SDE steps' recorded log-probs
    against their recomputation under the current policy (:func:`policy_gradient`)."""

    SDE = True

    def __init__(self, trainer):
        self.trainer = trainer

    def sampling_weights(self) -> None:
        return None  # on-policy: samples come from the weights being trained

    def accumulate(self, traj: Trajectory, adv: torch.Tensor, keep: torch.Tensor, n_kept: int, iteration: int,
                   epoch: int, steps: list[int]) -> dict[str, float]:
        from ..dist import max_over_ranks

        tr, cfg = self.trainer, self.trainer.cfg
        micro_steps = None
        if tr.fsdp:  # every rank the same number of micro-batches: the most any rank needs for its kept rows
            mine = int(keep.sum())
            micro_steps = max_over_ranks(math.ceil(mine / (cfg.micro_batch or mine)) if mine else 0)
        return policy_gradient(tr.sampler, tr.policy, traj.latents, traj.log_probs, traj.prompt_embeds, traj.pooled,
                               adv, keep, steps, traj.sigmas, n_kept_global=n_kept, clip_range=cfg.clip_range,
                               kl_beta=cfg.kl_beta, on_policy=epoch == 0, micro_batch=cfg.micro_batch,
                               kl_convention=cfg.kl_convention, micro_steps=micro_steps,
                               grad_scale=tr.world if tr.fsdp else 1.0)

    def after_update(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


# ----------------------------------------------------------------------------- the trainer


class GRPOTrainer(Trainer):
    """Spatial-RL: ``train_step()`` is one iteration (sample -> score -> advantages -> update of the kept
    samples); the evaluation samples the held-out prompts before training and every ``eval_every``."""

    EVAL_AT_START = True
    UNIT = "it"

    def plan(self) -> None:
        cfg = self.cfg
        self.n_total = cfg.prompts_per_iter * cfg.group_size
        if self.n_total % self.world:
            raise ConfigError("prompts_per_iter", f"prompts_per_iter x group_size = {self.n_total} samples per "
                                                  f"iteration cannot be split evenly over {self.world} ranks")
        self.mine = list(range(self.rank, self.n_total, self.world))  # sample n lives on rank n % world
        if "spatialscore" in cfg.reward.parts() and cfg.reward.spatialscore.liger and self.device.type != "cuda":
            raise ConfigError("reward.spatialscore.liger", "liger-kernel's Triton kernels need a CUDA GPU (this run is "
                                                           f"on {self.device.type}): reward.spatialscore.liger=false")

    @property
    def total_steps(self) -> int:
        return self.cfg.iterations

    def build(self) -> None:
        self._init_prompts()
        self._init_models()
        self.bad_streak = 0

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
        from ..rl.sampler import FluxSampler, load_pipeline
        from .optim import make_optimizer

        cfg = self.cfg
        _check_sigma_aware(cfg.reward)
        dtype = getattr(torch, cfg.dtype)
        pipe = load_pipeline(cfg.model, dtype=dtype, device=self.device)
        if self.device.type == "cuda":
            info(f"attention: SDPA with {sdpa_for_training(self.device)}", who="grpo")
        kl = cfg.nft.kl_beta if cfg.objective == "nft" else cfg.kl_beta
        self.policy = Policy(pipe.transformer, lora_rank=cfg.policy.lora_rank, lora_alpha=cfg.policy.lora_alpha,
                             need_reference=kl > 0)
        if cfg.policy.gradient_checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        self.fsdp = cfg.parallel == "fsdp2" and self.world > 1
        if self.fsdp:
            self.policy.shard()
        self.sampler = FluxSampler(pipe, cfg.sampler)
        self.policy.compile_reference(cfg.sampler.compile)
        self.reward_fn = make_reward(cfg.reward, self.device)
        self.oracle_fn = self.reward_fn if cfg.reward.name == "oracle" else make_reward(cfg.reward, self.device,
                                                                                        "oracle")
        self.params = self.policy.params
        self.opt = make_optimizer(cfg.optim, [{"params": list(self.params.values()), "lr": cfg.optim.lr}])
        self.ema = EMA(self.params, cfg.policy.ema_decay) if cfg.policy.ema_decay > 0 else None
        self.objective = NFTObjective(self) if cfg.objective == "nft" else GRPOObjective(self)
        self.preset = dict(ADVANTAGE_PRESETS[cfg.advantage])
        self.top_k = cfg.resolved_top_k()
        s = cfg.reward.spatialscore
        self.lcb_topk = self.top_k is not None and cfg.reward.name == "spatialscore" and s.topk_by == "lcb"
        # a sigma-aware SpatialScore reward logs how much its sigma reorders the groups mu ranks (sigma_flips)
        self.sigma_aware = cfg.reward.name == "spatialscore" and (s.form == "lcb" or s.topk_by == "lcb")
        self.window = cfg.sampler.window()
        if is_main():
            w0, w1 = self.window
            info(f"policy: {'LoRA r' + str(cfg.policy.lora_rank) if cfg.policy.lora_rank else 'full'} "
                 f"({self.policy.n_trainable:,} trainable), reward {cfg.reward.name}, G={cfg.group_size} x "
                 f"P={cfg.prompts_per_iter}, top_k={self.top_k or 'off'}, advantage {cfg.advantage}, objective "
                 f"{cfg.objective} ({f'SDE window [{w0}, {w1})' if cfg.objective == 'grpo' else 'ODE'} of "
                 f"{cfg.sampler.steps} steps), {self.world} rank(s) x {len(self.mine)} samples"
                 f"{', policy sharded (FSDP2)' if self.fsdp else ''}, "
                 f"{len(self.train_prompts)} train / {len(self.eval_prompts)} eval prompts", who="grpo")

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Whole tensors whatever the sharding (a run resumes on any number of ranks, ``ddp`` or ``fsdp2``); under
        FSDP2 a collective that leaves them on rank 0 only."""
        if self.fsdp:
            from ..fsdp import full_tensors, optimizer_state

            keep = is_main()
            tensors = full_tensors(self.params, keep=keep)
            if self.ema:
                tensors.update({f"ema.{n}": w for n, w in full_tensors(self.ema.weights, keep=keep).items()})
            optimizer = optimizer_state(self.policy.transformer, self.opt)
        else:
            tensors = {n: p.detach() for n, p in self.params.items()}
            if self.ema:
                tensors.update({f"ema.{n}": w for n, w in self.ema.weights.items()})
            optimizer = self.opt.state_dict()
        tensors.update(self.objective.state_dict())
        return tensors, {"optimizer": optimizer, "bad_streak": self.bad_streak}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        from ..fsdp import indexed_optimizer_state, load_into, load_optimizer_state, named_optimizer_state

        missing = [n for n in self.params if n not in tensors]
        if missing:
            raise ConfigError("out", f"{self.out} holds a checkpoint of another policy (it lacks {missing[0]}): "
                                     f"use a new out folder")
        load_into(self.params, tensors)
        if self.ema:
            load_into(self.ema.weights, {n: tensors[f"ema.{n}"] for n in self.params})
        self.objective.load_state_dict(tensors)
        names = list(self.params)  # the optimizer's parameter order
        if self.fsdp:
            load_optimizer_state(self.policy.transformer, self.opt, named_optimizer_state(state["optimizer"], names))
        else:
            self.opt.load_state_dict(indexed_optimizer_state(state["optimizer"], names))
        self.bad_streak = state["bad_streak"]

    def can_save(self) -> bool:
        return not self.bad_streak  # a streak of non-finite rewards never becomes the resume point

    # ------------------------------------------------------------------ one iteration

    def train_step(self) -> dict:
        """One iteration: sample -> score -> advantages -> update (kept samples only)."""
        from ..kernels import group_advantages

        cfg, t0 = self.cfg, time.perf_counter()
        pool = cfg.warmup_prompts if self.step < cfg.warmup_iterations else self.train_prompts
        groups, steps = iteration_plan(cfg, len(pool), self.step, self.window[1] - self.window[0])
        prompts = [pool[groups[n // cfg.group_size]] for n in self.mine]
        seeds = iteration_seeds(cfg, self.step, groups, self.mine)

        peaks = PhasePeaks(self.device)  # on CUDA: each phase's peak allocation (the KL reference forward in train)
        peaks.start("sample")
        with phase("sample"), self.policy.swapped(self.objective.sampling_weights()):
            traj = self._sample(prompts, seeds, init_seeds(cfg, self.step, groups, self.mine))
        peaks.stop()
        t1 = time.perf_counter()
        peaks.start("score")
        with torch.no_grad(), phase("score"):
            rewards, rank_by, parts = self._score(traj.images, prompts)
        n_bad = self._check_rewards(rewards)
        peaks.stop()
        t2 = time.perf_counter()

        peaks.start("train")
        with phase("advantages"):
            res = group_advantages(rewards, top_k=self.top_k, rank_by=rank_by, drop_zero_std=cfg.drop_zero_std,
                                   **self.preset)
        n_kept = int(res.keep.sum())
        lr, stats = self._update(traj, res.advantages.reshape(-1), res.keep.reshape(-1), steps, n_kept)
        peaks.stop()
        t3 = time.perf_counter()
        return {**_reward_record(rewards, res, n_kept, n_bad), **parts, "group_prompts": [pool[g] for g in groups],
                **stats, "t_sample": t1 - t0, "t_score": t2 - t1, "t_train": t3 - t2,
                "samples_per_s": self.n_total / (t3 - t0), "lr": lr, **peaks.peaks}

    def _sample(self, prompts: list[str], seeds: list[int], inits: list[int] | None) -> Trajectory:
        chunk = self.cfg.sample_batch or max(1, len(prompts))
        return Trajectory.cat([self.sampler.sample(prompts[s:s + chunk], seeds[s:s + chunk], sde=self.objective.SDE,
                                                   init_seeds=inits[s:s + chunk] if inits else None)
                               for s in range(0, len(prompts), chunk)])

    def _score(self, images: torch.Tensor, prompts: list[str]):
        """(rewards ``[P, G]`` of every rank, the score Top-k ranks by or None, the parts' means and for a
        sigma-aware SpatialScore ``sigma_flips``): group statistics are global, so every rank sees the whole matrix."""
        from ..rl.reward_fns import lower_bound, order_flips

        cfg = self.cfg
        shape = (cfg.prompts_per_iter, cfg.group_size)

        def everyone(v: torch.Tensor) -> torch.Tensor:
            return gather_by_index(v.float().cpu(), self.n_total, self.rank, self.world).view(shape)

        rank_by, parts = None, {}
        if self.sigma_aware:
            mu, sigma = self.reward_fn.scores(images, prompts)
            local = self.reward_fn.reward(mu, sigma)
            bound = everyone(lower_bound(mu, sigma, cfg.reward.spatialscore.sigma_weight))
            rank_by = bound if self.lcb_topk else None
            parts["sigma_flips"] = order_flips(everyone(mu), bound)
        else:
            local = self.reward_fn(images, prompts)
        parts.update({f"reward_{k}_mean": float(everyone(v).nanmean())
                      for k, v in getattr(self.reward_fn, "last", {}).items()})
        return everyone(local), rank_by, parts

    def _check_rewards(self, rewards: torch.Tensor) -> int:
        """Count non-finite rewards (they get keep=False); stop after ``max_bad_iterations`` iterations
        in a row without a single finite reward."""
        from ..errors import TrainingError

        n_bad = int((~torch.isfinite(rewards)).sum())
        self.bad_streak = self.bad_streak + 1 if n_bad == rewards.numel() else 0
        if n_bad and is_main():
            info(f"iteration {self.step + 1}: {n_bad} of {rewards.numel()} rewards are not finite (excluded)",
                 who="grpo")
        if self.bad_streak >= self.cfg.max_bad_iterations:
            raise TrainingError(f"{self.bad_streak} iterations in a row without a finite reward (iterations "
                                f"{self.step + 2 - self.bad_streak}-{self.step + 1}); the last checkpoint is intact: "
                                f"check the reward model and the sampler's dtype")
        return n_bad

    def _update(self, traj: Trajectory, adv_all: torch.Tensor, keep_all: torch.Tensor, steps: list[int],
                n_kept: int) -> tuple[float, dict[str, float]]:
        """The objective's step(s) on the kept samples (``inner_epochs``), then the EMA; (rate, stats)."""
        from .optim import set_lr

        cfg = self.cfg
        lr = set_lr(self.opt, cfg.optim, self.step, cfg.iterations)
        stats: dict[str, float] = {}
        if n_kept:
            adv = adv_all[self.mine].to(self.device)
            keep = keep_all[self.mine].to(self.device)
            for epoch in range(cfg.inner_epochs):
                self.opt.zero_grad(set_to_none=True)
                stats = self.objective.accumulate(traj, adv, keep, n_kept, self.step, epoch, steps)
                with phase("optimizer"):
                    if not self.fsdp:  # FSDP2 summed the gradients into each rank's shard in the backward
                        all_reduce_grads(self.params, self.world)
                    gnorm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.optim.grad_clip or float("inf"))
                    self.opt.step()
                stats["grad_norm"] = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
            if self.ema:
                self.ema.update(self.params)
        self.objective.after_update(self.step + 1)
        return lr, _reduce_stats(stats, self.world)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, tag: str | None = None) -> dict:
        """Held-out prompts x ``eval_seeds`` fixed noises, deterministic ODE, (EMA) policy."""
        from ..eval.heldout import sample_held_out
        from ..rl.reward_fns import oracle_hard

        cfg = self.cfg
        with self.policy.swapped(self.ema.weights if self.ema else None):
            h = sample_held_out(self.sampler, self.eval_prompts, cfg.eval_seeds, seed=10_000_019, rank=self.rank,
                                world=self.world, batch=cfg.sample_batch, lockstep=self.fsdp)
        res = {"eval_reward": h.mean(self.reward_fn(h.images, h.prompts))}
        if self.oracle_ok and cfg.reward.name != "oracle":
            res["eval_oracle"] = h.mean(self.oracle_fn(h.images, h.prompts))
        if self.oracle_ok:
            res["eval_oracle_acc"] = h.mean(oracle_hard(h.images, h.prompts)[1])
            res.update(h.judged())  # the judge of `spatialcore eval`: both objects found, GenEval's position rule
        if tag and cfg.save_grids and is_main():
            png = h.grid(self.eval_prompts, cfg.eval_seeds, self.out / f"samples_{tag}.png")
            if png and self.metrics:
                self.metrics.image(f"samples/{tag}", png, self.step)
        return res

    def final_result(self) -> dict:
        """The last record with the held-out evaluation "after" (its sample grid)."""
        return {**self.last, **self.evaluate("after")} if self.cfg.save_grids or not self.last else dict(self.last)

    # ------------------------------------------------------------------ the result

    def export(self, final: dict) -> str:
        from ..rl.policy import resolve_export_dtype, stock_loading

        p, out = self.cfg.policy, self.out / "policy"
        state = None
        if self.fsdp:  # the whole transformer, with the (EMA) weights to export, gathered to rank 0 (a collective)
            from ..fsdp import model_state

            with self.policy.swapped(self.ema.weights if self.ema else None):
                state = model_state(self.policy.transformer)
        if not is_main():
            return ""
        dtype = resolve_export_dtype(p.export_dtype, self.cfg.model, self.cfg.dtype)
        self.policy.save(out, None if self.fsdp else (self.ema.weights if self.ema else None), merged=p.export_merged,
                         dtype=dtype, state=state)
        return (f"policy -> {out} ({str(dtype).removeprefix('torch.')}); with stock diffusers: "
                f"{stock_loading(self.cfg.model, out, dtype, lora=bool(p.lora_rank))}")

    def plot(self) -> None:
        from ..logs import read_metrics
        from ..plots import curves

        recs = read_metrics(self.out / "metrics.jsonl")
        train = [(r["step"], r["reward_mean"]) for r in recs if r.get("reward_mean") is not None]
        ev = [r for r in recs if r.get("eval_reward") is not None]
        curves({"train (sampled)": train, "held-out (fixed noise, ODE)": [(r["step"], r["eval_reward"]) for r in ev]},
               self.out / "reward.png", xlabel="iteration", ylabel="reward")
        curves({"held-out (fixed noise, ODE)": [(r["elapsed_s"], r["eval_reward"]) for r in ev]},
               self.out / "reward_vs_time.png", xlabel="training seconds", ylabel="reward")

    def log_fields(self, rec: dict) -> dict:
        if "reward_mean" not in rec:  # an evaluation's own record (before training, or at a time limit)
            return {k: v for k, v in rec.items() if k.startswith("eval_")}
        extra = {k: rec[k] for k in ("eval_reward", "nonfinite", "gpu_mem_gib") if rec.get(k)}
        return dict(reward=rec["reward_mean"], std=rec["reward_std_group"], kept=rec["kept_fraction"],
                    clip=rec.get("clip_fraction", 0.0), approx_kl=rec.get("approx_kl", 0.0),
                    samples_s=rec["samples_per_s"], **extra)

    def postfix(self, rec: dict) -> str:
        return f"reward {rec['reward_mean']:.3f} kept {rec['kept_fraction']:.2f}"


def train(cfg: GRPOTrainConfig) -> dict:
    """Build a :class:`GRPOTrainer` from ``cfg`` and run it (resuming from ``cfg.out``)."""
    cfg.check()
    return GRPOTrainer(cfg).run()


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


def _reduce_stats(stats: dict[str, float], world: int) -> dict[str, float]:
    from ..dist import all_reduce_

    if world == 1 or not stats:
        return stats
    keys = sorted(stats)
    t = all_reduce_(torch.tensor([stats[k] for k in keys], dtype=torch.float64))  # shares already weighted
    out = dict(zip(keys, t.tolist(), strict=True))
    if "logp_drift" in out:
        out["logp_drift"] = out["logp_drift"] / world
    out["grad_norm"] = stats["grad_norm"]  # the same on every rank (clipped after the all-reduce)
    return out
