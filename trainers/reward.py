"""SpatialScore trainer (launch with ``torchrun`` for several processes; the loop is ``trainer.Trainer``).

    spatialcore reward train --config configs/reward/tiny_cpu.yaml [key=value ...]
    torchrun --nproc_per_node 8 $(which spatialcore) reward train --config configs/reward/qwen2_5_vl_7b.yaml

Per optimizer step (``batch_size`` pairs over all ranks): each rank takes its micro-batches of
``micro_batch`` pairs (accumulation = batch_size / (ranks x micro_batch), derived, so one config
runs unchanged on any number of ranks) -> one Qwen2.5-VL forward over the 2B (prompt, image)
judgements -> Gaussian head -> ``kernels.pair_loss`` -> backward; gradients averaged over the
global batch, pre-clip norm logged, clipping, AdamW (or SGD) at the warm-up + cosine rate of ``optim``. Every
``eval_every`` steps the held-out pairs of the current curriculum stage are scored (table format) and a cleared
stage hands over to the next; the run ends with ``out/model`` (a SpatialScore folder) and ``out/eval.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from ..config import ConfigError, param
from ..dist import is_main
from ..errors import TrainingError
from ..logs import info
from .optim import OptimConfig
from .trainer import RunConfig, Trainer


@dataclass
class SpatialScoreBuildConfig:
    """How the SpatialScore being trained is built (section ``spatialscore``)."""

    attention: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    lora_rank: int = param(0, min=0, help="LoRA on the language model's projections (0: full fine-tuning)")
    lora_alpha: int = param(32, min=1)
    variance_head: bool = param(False, help="a Gaussian head: sigma beside mu, the variance-aware pair loss (plain "
                                            "Bradley-Terry trained better in calibration runs)")
    variance_loss: Literal["joint", "calibrate"] = param(
        "joint", help="with the variance head: joint = mu and sigma both from the Gaussian pair loss (SPEC 3.4); "
                      "calibrate = mu from plain Bradley-Terry, sigma from the Gaussian pair loss with mu held fixed "
                      "(sigma can only learn where mu's ranking fails, mu cannot shrink instead)")
    gradient_checkpointing: bool = False
    liger: bool = False  # liger-kernel RMSNorm/SwiGLU/RoPE Triton kernels in the backbone (CUDA)
    compile: bool = False  # torch.compile of each decoder layer


@dataclass
class PairDataConfig:
    """The preference pairs (section ``data``): a pair folder, or a synthetic stream with its curriculum."""

    source: str = param("runs/pairs", help="pair folder (pairs.jsonl + images), or stream:<easy|medium|hard|easy_grid> "
                                           "for fresh synthetic pairs rendered on the fly")
    stream: dict[str, Any] = field(default_factory=dict)  # synth-config overrides for source=stream:<preset>
    # Streaming only: stages of synth overrides trained before the final task (the preset +
    # `stream`); a stage ends once its held-out accuracy reaches `advance_at`. Two keys of a stage are
    # not synth keys: `advance_at` (this stage's own threshold) and `max_stage_steps` (the stage also
    # ends after this many steps, reached or not: a stage the model cannot clear does not hold the run).
    curriculum: list[dict[str, Any]] = field(default_factory=list)
    advance_at: float = param(0.95, min=0.0, max=1.0)
    eval_split: Literal["val", "test"] = "test"
    eval_pairs: int = param(512, min=1, help="held-out pairs per evaluation")
    num_workers: int = param(0, min=0)
    shuffle_prompts: bool = False  # control: pair each image with another pair's prompt
    # A confident model that meets a new stage can fall onto the constant-output saddle (loss log 2, margin ~0) and
    # stay there. Two defences: the rate ramps up again after every switch (stage_warmup), and a stage whose held-out
    # mean |margin| stays below saddle_margin for saddle_patience evaluations restarts from its first step's weights
    # and optimizer (saved at the switch) on fresh pairs, always with a ramp (restart_warmup steps at least).
    # docs/EXPERIMENTS.md, one run each on unseen objects: no ramp, it fell at the switch and each full-rate restart
    # fell again (0.55 on the test pairs); a ramped restart climbed out (0.71); the ramp at the switch, no fall (0.93).
    stage_warmup: int = param(100, min=0, help="steps over which the rate ramps from 0 back up after a stage switch")
    restart_warmup: int = param(100, min=1, help="the ramp after a saddle restart, in steps (at least stage_warmup)")
    saddle_guard: bool = param(True, help="restart a stage that collapses to constant output (curriculum only)")
    # |margin|, not the signed mean: a model at chance with confident outputs has a signed mean near 0 too, and a
    # collapsed one's tiny margins (1e-4 to 5e-3 seen, docs/EXPERIMENTS.md) kept resetting a 1e-3 threshold's patience
    saddle_margin: float = param(5e-2, min=0.0, help="held-out mean |margin| below this is the saddle")
    saddle_patience: int = param(2, min=1, help="evaluations in a row at the saddle before a restart")
    saddle_restarts: int = param(2, min=0, help="restarts at most per stage")
    # A wider model (1.47 M parameters, docs/EXPERIMENTS.md) fell at the two-object switch despite the ramp, and both
    # ramped restarts at the schedule's rate fell again; each restart can also lower the stage's rate (until the
    # next switch). 1.0 keeps the measured behaviour; 0.5 on that model left the saddle but not chance (one run).
    restart_lr_factor: float = param(1.0, min=0.01, max=1.0,
                                     help="the stage's rate is multiplied by this after each saddle restart")

    @property
    def streaming(self) -> bool:
        return self.source.startswith("stream:")

    def check(self) -> None:
        if self.curriculum and not self.streaming:
            raise ConfigError("curriculum", "needs source=stream:<preset>")
        for i, stage in enumerate(self.curriculum):
            if not isinstance(stage, dict):
                raise ConfigError(f"curriculum[{i}]", f"must be a mapping of synth keys, got {stage!r}")
            at, most = stage.get("advance_at", 0.0), stage.get("max_stage_steps", 1)
            if isinstance(at, bool) or not isinstance(at, (int, float)) or not 0.0 <= at <= 1.0:
                raise ConfigError(f"curriculum[{i}].advance_at", f"must be a number in [0, 1], got {at!r}")
            if isinstance(most, bool) or not isinstance(most, int) or most < 1:
                raise ConfigError(f"curriculum[{i}].max_stage_steps", f"must be an integer >= 1, got {most!r}")


@dataclass
class RewardOptimConfig(OptimConfig):
    head_lr: float = param(3e-3, min=0.0, help="base rate of the head (lr is the backbone's)")


@dataclass
class RewardTrainConfig(RunConfig):
    KIND: ClassVar[str] = "reward"
    # keys of the flat layout this config had before its sections
    RENAMED: ClassVar[dict[str, str]] = {
        "grad_accum": "micro_batch (batch_size is now the global batch; accumulation = batch_size / (ranks x "
                      "micro_batch))",
        "optimizer": "optim.name", "plots": "(nothing: both plots are always drawn)",
        **{k: f"optim.{k}" for k in ("lr", "head_lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip")},
        **{k: f"spatialscore.{k}" for k in ("attention", "lora_rank", "lora_alpha", "variance_head",
                                             "gradient_checkpointing", "liger", "compile")},
        **{k: f"data.{k}" for k in ("stream", "curriculum", "advance_at", "eval_split", "eval_pairs", "num_workers",
                                     "shuffle_prompts")}}

    init_from: str | None = param(None, help="a SpatialScore folder to start from instead of model (curriculum stages)")
    spatialscore: SpatialScoreBuildConfig = field(default_factory=SpatialScoreBuildConfig)
    data: PairDataConfig = field(default_factory=PairDataConfig)
    optim: RewardOptimConfig = field(default_factory=lambda: RewardOptimConfig(lr=3e-4, schedule="cosine",
                                                                               warmup_steps=50))
    # Data parallelism under torchrun: DDP (a full replica per rank) or FSDP2 (fully_shard per
    # decoder/vision block: parameters, gradients and optimizer state sharded; for the 7B).
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    batch_size: int = param(16, min=1, help="pairs per optimizer step over all ranks (the global batch)")
    max_steps: int = param(1000, min=1)

    def check(self) -> None:
        super().check()
        if self.spatialscore.variance_loss == "calibrate" and not self.spatialscore.variance_head:
            raise ConfigError("spatialscore.variance_loss", "calibrate fits the Gaussian head's sigma: it needs "
                                                            "spatialscore.variance_head=true")
        if self.optim.warmup_steps >= self.max_steps:
            raise ConfigError("optim.warmup_steps", f"{self.optim.warmup_steps} must be < max_steps={self.max_steps}")


def at_saddle(ev: dict, margin: float) -> bool:
    """One evaluation at the constant-output saddle: the held-out pairs' mean |mu_w - mu_l| below ``margin`` (a model
    at chance that still tells images apart has a large mean |margin|; only a collapsed one has ~0)."""
    return ev["eval_mean_abs_margin"] < margin


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _build_model(cfg: RewardTrainConfig, dtype: torch.dtype, device: str | torch.device = "cpu"):
    from ..reward.model import LoraSpec, SpatialScore

    m = cfg.spatialscore
    if cfg.init_from:
        model = SpatialScore.from_pretrained(cfg.init_from, attention=m.attention, dtype=dtype)
        model.variance_head = m.variance_head
        return model
    lora = LoraSpec(rank=m.lora_rank, alpha=m.lora_alpha) if m.lora_rank else None
    return SpatialScore.from_backbone(cfg.model, attention=m.attention, dtype=dtype, lora=lora,
                                      variance_head=m.variance_head, device=device)


class RewardTrainer(Trainer):
    """SpatialScore training: ``train_step()`` is one optimizer step over the global batch of pairs; the
    evaluation scores the held-out pairs of the current curriculum stage (or the task's) and hands a cleared
    stage over to the next."""

    def plan(self) -> None:
        from ..dist import split_batch

        self.micro, self.accum = split_batch(self.cfg.batch_size, self.cfg.micro_batch, self.world)
        if self.cfg.spatialscore.liger and self.device.type != "cuda":
            raise ConfigError("spatialscore.liger", "liger-kernel's Triton kernels need a CUDA GPU (this run is on "
                                                    f"{self.device.type}): spatialscore.liger=false")

    @property
    def total_steps(self) -> int:
        return self.cfg.max_steps

    # ------------------------------------------------------------------ construction

    def build(self) -> None:
        self._init_data()
        self._init_model()
        self.epoch, self.consumed, self.stage = 0, 0, 0
        self.warm_from, self.at_saddle, self.restarts = -1, 0, 0  # the stage's ramp start, saddle streak, restarts
        self._batches = None

    def _init_data(self) -> None:
        """Data before the model: a bad data source or a batch that does not fit fails fast."""
        from ..data.pairs import PairSet

        cfg, d = self.cfg, self.cfg.data
        self.streaming = d.streaming
        self.stages = [*d.curriculum, {}]
        self._eval_sets: dict[int, list] = {}
        if self.streaming:
            self.stage_synth = [synth_config(d.source, {**d.stream, **{k: v for k, v in stage.items()
                                                                       if k not in STAGE_KEYS}})
                                for stage in self.stages]
            self.eval_set = self.stage_eval(len(self.stages) - 1)
        else:
            self.train_set = PairSet(d.source, split="train")
            self.eval_set = PairSet(d.source, split=d.eval_split)
            self.steps_per_epoch = len(self.train_set) // cfg.batch_size
            if self.steps_per_epoch == 0:
                raise ConfigError("batch_size", f"{len(self.train_set)} training pairs cannot fill one batch of "
                                                f"{cfg.batch_size}")

    def _init_model(self) -> None:
        from ..reward.preprocess import PairCollator
        from .optim import make_optimizer, set_lr

        cfg = self.cfg
        dtype = getattr(torch, cfg.dtype)
        model = _build_model(cfg, dtype, self.device)
        if cfg.init_from:
            info(f"initialised from {cfg.init_from}", who="reward")
        model = model.to(self.device)
        model.accelerate(liger=cfg.spatialscore.liger, compile=cfg.spatialscore.compile)
        if cfg.spatialscore.gradient_checkpointing:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.fsdp = cfg.parallel == "fsdp2" and self.world > 1
        self.model, self.ddp = model, model
        if self.fsdp:
            _fully_shard(model)
        elif self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.params = _trainable(model)
        head = [p for n, p in self.params.items() if n.startswith("head.")]
        body = [p for n, p in self.params.items() if not n.startswith("head.")]
        self.opt = make_optimizer(cfg.optim, [{"params": body, "lr": cfg.optim.lr},
                                              {"params": head, "lr": cfg.optim.head_lr}])
        set_lr(self.opt, cfg.optim, 0, cfg.max_steps)
        self.collate = PairCollator(model.processor)
        if is_main():
            info(f"global batch {cfg.batch_size} pairs = {self.world} rank(s) x {self.accum} micro-batch(es) x "
                 f"{self.micro}, optimizer {cfg.optim.name}, {cfg.parallel if self.world > 1 else 'one process'}",
                 who="reward")

    def stage_eval(self, i: int) -> list:
        if i not in self._eval_sets:
            d = self.cfg.data
            self._eval_sets[i] = held_out_pairs(self.stage_synth[i], self.cfg.seed, d.eval_pairs, d.eval_split)
        return self._eval_sets[i]

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(trainable weights, everything else a resume needs); a collective under FSDP2."""
        if self.fsdp:
            tensors, optim = _fsdp_full(self.model, self.opt)
        else:
            tensors, optim = _trainable(self.model), self.opt.state_dict()
        return tensors, {"optimizer": optim, "epoch": self.epoch, "consumed": self.consumed, "stage": self.stage,
                         "warm_from": self.warm_from, "at_saddle": self.at_saddle, "restarts": self.restarts}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        from .optim import set_lr

        missing = set(self.params) - set(tensors)
        if missing:
            raise ConfigError("out", f"{self.out} holds a checkpoint of another model (it lacks "
                                     f"{sorted(missing)[0]}): use a new out folder")
        if self.fsdp:
            _fsdp_load(self.model, self.opt, tensors, state["optimizer"])
        else:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(tensors[n])
            self.opt.load_state_dict(state["optimizer"])
        # the rate is the schedule's at this step, also where no optimizer state was loaded (FSDP2 with SGD)
        set_lr(self.opt, self.cfg.optim, self.step, self.cfg.max_steps)
        self.epoch, self.consumed, self.stage = state["epoch"], state["consumed"], state["stage"]
        self.warm_from, self.at_saddle, self.restarts = (state.get("warm_from", -1), state.get("at_saddle", 0),
                                                         state.get("restarts", 0))

    # ------------------------------------------------------------------ data

    def _micro_batches(self):
        """This rank's micro-batches from the current data position (stage, epoch, pairs consumed)."""
        from ..data.pairs import PairSampler
        from ..data.synth import StreamingPairs

        cfg = self.cfg
        start = self.consumed // self.world
        if self.streaming:  # item k of this rank is pair rank + k * world of the stage's stream
            stream = StreamingPairs(self.stage_synth[self.stage], f"{cfg.seed}-{self.stage}", rank=self.rank,
                                    world_size=self.world, start=start)
            return iter(torch.utils.data.DataLoader(stream, batch_size=self.micro, collate_fn=self.collate,
                                                    num_workers=cfg.data.num_workers))
        shard = PairSampler(len(self.train_set), seed=cfg.seed, rank=self.rank, world_size=self.world,
                            even=True).shard(self.epoch)
        end = self.steps_per_epoch * cfg.batch_size // self.world
        batches = [shard[i:i + self.micro] for i in range(start, end, self.micro)]
        return iter(torch.utils.data.DataLoader(self.train_set, batch_sampler=batches, collate_fn=self.collate,
                                                num_workers=cfg.data.num_workers))

    def _advance_data(self) -> None:
        self.consumed += self.cfg.batch_size
        if not self.streaming and self.consumed == self.steps_per_epoch * self.cfg.batch_size:
            self.epoch, self.consumed, self._batches = self.epoch + 1, 0, None

    # ------------------------------------------------------------------ the step

    def train_step(self) -> dict[str, float]:
        """One optimizer step: ``accum`` micro-batches per rank -> pair loss -> backward (gradients
        averaged over the global batch) -> pre-clip norm, clip, optimizer at the schedule's rate."""
        from contextlib import nullcontext

        from ..dist import mean
        from ..kernels import pairwise_accuracy
        from .optim import set_lr

        cfg = self.cfg
        t0 = time.perf_counter()
        if self._batches is None:
            self._batches = self._micro_batches()
        loss_sum, acc_sum = 0.0, 0.0
        for j in range(self.accum):
            batch = next(self._batches)
            inputs = {k: v.to(self.device) for k, v in batch["inputs"].items()}
            if cfg.data.shuffle_prompts:
                inputs = _shuffle_prompts(inputs, self.micro, self.step)
            last = j == self.accum - 1
            with nullcontext() if last or self.ddp is self.model else self.ddp.no_sync():
                mu, log_var = self.ddp(**inputs)  # log_var is None without a variance head: Bradley-Terry
                B = mu.shape[0] // 2
                loss = reward_pair_loss(mu, log_var, cfg.spatialscore.variance_loss)
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite pair loss at step {self.step + 1} (micro-batch {j + 1}); the "
                                        f"last checkpoint is untouched: lower optim.lr or check the data")
                (loss / self.accum).backward()
            loss_sum += float(loss.detach())
            acc_sum += pairwise_accuracy(mu[:B].detach(), mu[B:].detach())
        gnorm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.optim.grad_clip or float("inf"))
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        lr = set_lr(self.opt, cfg.optim, self.step, cfg.max_steps)
        scale = cfg.data.restart_lr_factor ** self.restarts  # a lowered rate for the rest of a restarted stage
        if self.warm_from >= 0 and self.step - self.warm_from < self.ramp_steps:
            scale *= (self.step - self.warm_from + 1) / self.ramp_steps  # the ramp after a stage switch or restart
        if scale != 1.0:
            for g in self.opt.param_groups:
                g["lr"] *= scale
            lr *= scale
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._advance_data()
        return {"loss": mean(loss_sum / self.accum), "train_acc": mean(acc_sum / self.accum), "lr": lr,
                "grad_norm": float(gnorm), "pairs_per_s": cfg.batch_size / (time.perf_counter() - t0)}

    # ------------------------------------------------------------------ evaluation

    def _score(self, data) -> dict:
        from ..reward.evaluate import pair_metrics, pair_scores

        was = self.ddp.training
        scores = pair_scores(self.model, data, batch_size=self.micro, limit=self.cfg.data.eval_pairs)
        self.ddp.train(was)
        return pair_metrics(*scores)

    def evaluate(self, tag: str | None = None) -> dict:
        """The held-out table (overall, 1 and 2-3 perturbations, margin) on the current stage's pairs, or the
        task's at the last stage."""
        final = self.stage == len(self.stages) - 1
        self.table = self._score(self.eval_set if final or not self.streaming else self.stage_eval(self.stage))
        return {"stage": self.stage, **{f"eval_{k}": v for k, v in self.table.items() if k != "calibration"}}

    def after_evaluation(self, ev: dict) -> None:
        """The saddle guard (a collapsed stage restarts), then: a stage that reaches its ``advance_at`` (or its
        ``max_stage_steps``) hands over to the next, whose first weights are kept for the guard."""
        d = self.cfg.data
        if len(self.stages) == 1:
            return
        if self._guard(ev):
            return
        if self.stage == len(self.stages) - 1:
            return
        rules = self.stages[self.stage]
        in_stage = self.consumed // self.cfg.batch_size  # steps since this stage began (kept across a resume)
        cleared = ev["eval_accuracy"] >= rules.get("advance_at", d.advance_at)
        if cleared or in_stage >= rules.get("max_stage_steps", float("inf")):
            why = "" if cleared else f" (stage {self.stage + 1} not cleared in its {in_stage} steps)"
            self.stage, self.consumed, self._batches = self.stage + 1, 0, None
            self.warm_from, self.at_saddle, self.restarts = self.step, 0, 0
            info(f"curriculum: stage {self.stage + 1}/{len(self.stages)} from step {self.step}{why}", who="reward")
            if d.saddle_guard:
                from ..checkpoint import write_checkpoint

                tensors, state = self.state_dict()
                write_checkpoint(self._stage_start(self.stage), self.step, tensors, state)

    @property
    def ramp_steps(self) -> int:
        """The rate ramp's length from ``warm_from``: stage_warmup after a switch, restart_warmup at least after a
        saddle restart (a switch sets restarts back to 0)."""
        d = self.cfg.data
        return max(d.stage_warmup, d.restart_warmup) if self.restarts else d.stage_warmup

    def _stage_start(self, stage: int) -> Path:
        return self.out / "stage_starts" / f"stage_{stage:02d}"

    def _guard(self, ev: dict) -> bool:
        """A stage (after the first) whose held-out margin stays at ~0 restarts from its first step's weights and
        optimizer on fresh pairs, with the ramp; True when it did."""
        d = self.cfg.data
        if not d.saddle_guard or self.stage == 0:
            return False
        self.at_saddle = self.at_saddle + 1 if at_saddle(ev, d.saddle_margin) else 0
        if self.at_saddle < d.saddle_patience or self.restarts >= d.saddle_restarts:
            return False
        from ..checkpoint import load_checkpoint, resume_checkpoint

        path = resume_checkpoint(self._stage_start(self.stage))
        tensors, state = load_checkpoint(path)
        keep = (self.epoch, self.consumed, self.stage, self.restarts + 1)  # the data position moves on: fresh pairs
        self.load_state_dict(tensors, state)
        self.epoch, self.consumed, self.stage, self.restarts = keep
        self.warm_from, self.at_saddle = self.step, 0
        info(f"saddle guard: stage {self.stage + 1} sat at constant output (held-out mean |margin| "
             f"{ev['eval_mean_abs_margin']:.1e} for {d.saddle_patience} evaluations): restarted from its first step's "
             f"weights ({path.name}) with a {self.ramp_steps}-step rate ramp, restart {self.restarts} of "
             f"{d.saddle_restarts}", who="reward")
        return True

    def final_result(self) -> dict:
        """The task's held-out table (evaluated again when the run ended before the curriculum's last stage)."""
        if self.streaming and self.stage < len(self.stages) - 1:
            self.table = self._score(self.eval_set)
        return self.table

    # ------------------------------------------------------------------ the result

    def export(self, final: dict) -> str:
        from ..reward.evaluate import format_table

        final_tensors = _fsdp_full(self.model, None)[0] if self.fsdp else None
        if not is_main():
            return ""
        model = self.model
        if self.fsdp:  # a plain copy of the model on rank 0 holds the gathered weights for saving
            model = _unsharded_copy(self.cfg, final_tensors)
        model.save_pretrained(self.out / "model")
        (self.out / "eval.md").write_text(format_table(final) + "\n")
        return f"model -> {self.out / 'model'}"

    def plot(self) -> None:
        _plot(self.out)

    def log_fields(self, rec: dict) -> dict:
        # an evaluation's own record (at a time limit) has no training step's numbers
        fields = {"loss": rec["loss"], "acc": rec["train_acc"]} if "loss" in rec else {}
        if "eval_accuracy" in rec:
            fields.update(stage=f"{rec['stage'] + 1}/{len(self.stages)}", eval_acc=rec["eval_accuracy"],
                          acc_1=rec["eval_accuracy_1"], acc_2_3=rec["eval_accuracy_2_3"], margin=rec["eval_mean_margin"])
        return fields

    def postfix(self, rec: dict) -> str:
        return f"loss {rec['loss']:.4f} acc {rec['train_acc']:.3f}"


def reward_pair_loss(mu: torch.Tensor, log_var: torch.Tensor | None, variance_loss: str = "joint") -> torch.Tensor:
    """The training loss of a batch scored winners first (``mu[:B]`` the perfect images, ``mu[B:]`` their
    perturbed partners), with ``pair(...) = -mean log sigmoid((mu_w - mu_l) / sqrt(1 + pi/8 (var_w + var_l)))``
    (``kernels.pair_loss``, SPEC 3.4):

        no variance head (log_var None):  pair(mu_w, mu_l)                      plain Bradley-Terry
        joint:                            pair(mu_w, lv_w, mu_l, lv_l)
        calibrate:                        pair(mu_w, mu_l) + pair(sg(mu_w), lv_w, sg(mu_l), lv_l)

    sg = stop-gradient. Under ``joint`` a pair that mu ranks wrongly is made less costly by a larger sigma or by a
    smaller margin alike, and mu's scale is free, so sigma need not learn anything (measured: ~0.14 while mu spread
    ~10). Under ``calibrate`` mu's gradient is Bradley-Terry's and sigma's is the Gaussian loss's at the current mu:
    d/d lv_w = sigmoid(-z) z (pi/16) var_w / c^2 with z = (mu_w - mu_l) / c, pushing sigma up on the pairs mu gets
    wrong and down on those it barely gets right."""
    from ..kernels import pair_loss

    B = mu.shape[0] // 2
    if log_var is None:
        return pair_loss(mu[:B], None, mu[B:], None)
    if variance_loss == "joint":
        return pair_loss(mu[:B], log_var[:B], mu[B:], log_var[B:])
    if variance_loss == "calibrate":
        fixed = mu.detach()
        return pair_loss(mu[:B], None, mu[B:], None) + pair_loss(fixed[:B], log_var[:B], fixed[B:], log_var[B:])
    raise ValueError(f"variance_loss must be 'joint' or 'calibrate', got {variance_loss!r}")


def train(cfg: RewardTrainConfig) -> dict:
    """Build a :class:`RewardTrainer` from ``cfg`` and run it (resuming from ``cfg.out``)."""
    cfg.check()
    return RewardTrainer(cfg).run()


def _fully_shard(model) -> None:
    """FSDP2: one shard group per language-model decoder layer and per vision block, then the rest."""
    from ..fsdp import shard

    backbone = model.backbone.get_base_model() if hasattr(model.backbone, "get_base_model") else model.backbone
    shard(model, [*backbone.language_model.layers, *backbone.visual.blocks])


def _fsdp_full(model, opt) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Full (unsharded) trainable weights and optimizer state on rank 0 (a collective: all ranks call)."""
    from ..fsdp import model_state, optimizer_state

    tensors = model_state(model, set(_trainable(model)))
    return tensors, optimizer_state(model, opt) if opt is not None else None


def _fsdp_load(model, opt, tensors: dict[str, torch.Tensor], optim: dict) -> None:
    from ..fsdp import load_model_state, load_optimizer_state

    load_model_state(model, tensors)
    load_optimizer_state(model, opt, optim)


def _unsharded_copy(cfg: RewardTrainConfig, tensors: dict[str, torch.Tensor]):
    model = _build_model(cfg, getattr(torch, cfg.dtype))
    matched = [n for n, _ in model.named_parameters() if n in tensors]
    model.load_state_dict(tensors, strict=False)
    if len(matched) != len(tensors):
        raise RuntimeError("the gathered FSDP2 weights do not match a fresh model's parameter names")
    return model


STAGE_KEYS = ("advance_at", "max_stage_steps")  # keys of a curriculum stage that are not synth keys


def synth_config(source: str, overrides: dict | None = None):
    from ..config import from_dict
    from ..data.synth import DIFFICULTIES, SynthConfig

    name = source.split(":", 1)[1]
    if name not in DIFFICULTIES:
        raise ConfigError("data.source", f"unknown stream preset {name!r} (known: {', '.join(DIFFICULTIES)})")
    return from_dict(SynthConfig, {**DIFFICULTIES[name], **(overrides or {})}, "data.stream")


def held_out_pairs(synth_cfg, seed: int, n: int, split: str) -> list[dict]:
    """The first ``n`` pairs of a separate seed whose prompts fall in the held-out ``split``."""
    from ..data.synth import pairs_of_split

    out = []
    for pair in pairs_of_split(synth_cfg, f"heldout-{seed}", split, 200 * n):
        r = pair.record
        out.append({"id": r["id"], "prompt": r["prompt"], "chosen": pair.chosen, "rejected": pair.rejected,
                    "n_perturbations": r["n_perturbations"], "perturbations": r["perturbations"]})
        if len(out) == n:
            break
    if not out:
        raise ConfigError("data.eval_split", f"no '{split}' pairs in the synthetic stream")
    return out


def _shuffle_prompts(inputs: dict, B: int, step: int) -> dict:
    """Control run: every image is paired with another pair's prompt (same for chosen and
    rejected), so a model that reads the prompt cannot beat chance on held-out data."""
    g = torch.Generator().manual_seed(step)
    perm = torch.randperm(B, generator=g)
    idx = torch.cat([perm, perm + B])
    out = dict(inputs)
    out["input_ids"] = inputs["input_ids"][idx]
    out["attention_mask"] = inputs["attention_mask"][idx]
    return out


def _plot(out: Path) -> None:
    from ..logs import read_metrics
    from ..plots import curves

    recs = read_metrics(out / "metrics.jsonl")
    loss = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    acc = [(r["step"], r["train_acc"]) for r in recs if "train_acc" in r]
    ev = [(r["step"], r["eval_accuracy"]) for r in recs if "eval_accuracy" in r]
    curves({"train loss": loss}, out / "loss.png", ylabel="pair loss")
    curves({"train (batch)": acc, "held-out": ev}, out / "accuracy.png", ylabel="pairwise accuracy")
