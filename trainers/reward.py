"""SpatialScore trainer: one readable loop (launch with ``torchrun`` for several processes).

    spatialcore reward train --config configs/reward/tiny_cpu.yaml [key=value ...]
    torchrun --nproc_per_node 8 $(which spatialcore) reward train --config configs/reward/qwen2_5_vl_7b.yaml

Per optimizer step (``batch_size`` pairs over all ranks): each rank takes its micro-batches of
``micro_batch`` pairs (accumulation = batch_size / (ranks x micro_batch), derived, so one config
runs unchanged on any number of ranks) -> one Qwen2.5-VL forward over the 2B (prompt, image)
judgements -> Gaussian head -> ``kernels.pair_loss`` -> backward; gradients averaged over the
global batch, pre-clip norm logged, clipping, AdamW (or SGD), warm-up + cosine schedule. Every ``eval_every`` steps the held-out pairs are
scored (table format), every ``save_every`` steps an atomic checkpoint is written; a run
restarted with the same config resumes from the newest complete checkpoint exactly (weights,
optimizer, scheduler, RNG, data position) and writes each step to ``metrics.jsonl`` once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from ..config import ConfigError, param
from ..dist import is_main
from ..logs import info, progress, step_line


@dataclass
class RewardTrainConfig:
    model: str = param("runs/tiny/reward", help="Qwen2.5-VL checkpoint (folder or hub id)")
    init_from: str | None = None  # a SpatialScore folder to start from (curriculum stages)
    data: str = param("runs/pairs", help="pair folder (pairs.jsonl + images), or stream:<easy|medium|hard> "
                                         "for fresh synthetic pairs rendered on the fly")
    stream: dict[str, Any] = field(default_factory=dict)  # synth-config overrides for data=stream:<preset>
    # Streaming only: stages of synth overrides trained before the final task (the preset +
    # `stream`); a stage ends once its held-out accuracy reaches `advance_at`. Two keys of a stage are
    # not synth keys: `advance_at` (this stage's own threshold) and `max_stage_steps` (the stage also
    # ends after this many steps, reached or not: a stage the model cannot clear does not hold the run).
    curriculum: list[dict[str, Any]] = field(default_factory=list)
    advance_at: float = param(0.95, min=0.0, max=1.0)
    eval_split: Literal["val", "test"] = "test"
    out: str = "runs/reward"
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])  # + tensorboard, wandb (optional packages)
    run: Literal["auto", "resume", "fresh"] = param(
        "auto", help="auto: resume a run of the same config, refuse another's; resume: there must be one; fresh: "
                     "move an existing run aside and start over")
    seed: int = param(0, min=0)
    attention: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    dtype: Literal["float32", "bfloat16"] = "float32"
    lora_rank: int = param(0, min=0, help="0: full fine-tuning")
    # Data parallelism under torchrun: DDP (a full replica per rank) or FSDP2 (fully_shard per
    # decoder/vision block: parameters, gradients and optimizer state sharded; for the 7B).
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    lora_alpha: int = param(32, min=1)
    variance_head: bool = False  # plain Bradley-Terry trained better in calibration runs
    gradient_checkpointing: bool = False
    liger: bool = False  # liger-kernel RMSNorm/SwiGLU/RoPE Triton kernels in the backbone (CUDA)
    compile: bool = False  # torch.compile of each decoder layer
    batch_size: int = param(16, min=1, help="pairs per optimizer step over all ranks (the global batch)")
    micro_batch: int = param(0, min=0, help="pairs per rank per forward/backward; accumulation is derived "
                                            "(0: batch_size / ranks, no accumulation)")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = param(3e-4, min=0.0)
    head_lr: float = param(3e-3, min=0.0)
    weight_decay: float = param(0.0, min=0.0)
    warmup_steps: int = param(50, min=0)
    max_steps: int = param(1000, min=1)
    min_lr_ratio: float = param(0.1, min=0.0, max=1.0)
    grad_clip: float = param(1.0, min=0.0, help="max global gradient norm (0: no clipping)")
    eval_every: int = param(100, min=1)
    eval_pairs: int = param(512, min=1)
    save_every: int = param(200, min=1)
    log_every: int = param(10, min=1)
    num_workers: int = param(0, min=0)
    shuffle_prompts: bool = False  # control: pair each image with another pair's prompt
    threads: int = param(0, min=0, help="torch CPU threads (0: torch's default)")
    stop_after: int = param(0, min=0, help="end the process after this many steps, as if killed (tests)")
    plots: list[str] = field(default_factory=lambda: ["loss", "accuracy"])

    RENAMED: ClassVar[dict[str, str]] = {
        "grad_accum": "micro_batch (batch_size is now the global batch; accumulation = batch_size / (ranks x "
                      "micro_batch))"}

    def check(self) -> None:
        from ..logs import check_report_to

        check_report_to(self.report_to)
        if self.curriculum and not self.data.startswith("stream:"):
            raise ConfigError("curriculum", "needs data=stream:<preset>")
        for i, stage in enumerate(self.curriculum):
            if not isinstance(stage, dict):
                raise ConfigError(f"curriculum[{i}]", f"must be a mapping of synth keys, got {stage!r}")
            at, most = stage.get("advance_at", 0.0), stage.get("max_stage_steps", 1)
            if isinstance(at, bool) or not isinstance(at, (int, float)) or not 0.0 <= at <= 1.0:
                raise ConfigError(f"curriculum[{i}].advance_at", f"must be a number in [0, 1], got {at!r}")
            if isinstance(most, bool) or not isinstance(most, int) or most < 1:
                raise ConfigError(f"curriculum[{i}].max_stage_steps", f"must be an integer >= 1, got {most!r}")
        if self.warmup_steps >= self.max_steps:
            raise ConfigError("warmup_steps", f"{self.warmup_steps} must be < max_steps={self.max_steps}")


def lr_lambda(cfg: RewardTrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _build_model(cfg: RewardTrainConfig, dtype: torch.dtype):
    from ..reward.model import LoraSpec, SpatialScore

    if cfg.init_from:
        model = SpatialScore.from_pretrained(cfg.init_from, attention=cfg.attention, dtype=dtype)
        model.variance_head = cfg.variance_head
        return model
    lora = LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha) if cfg.lora_rank else None
    return SpatialScore.from_backbone(cfg.model, attention=cfg.attention, dtype=dtype, lora=lora,
                                      variance_head=cfg.variance_head)


class RewardTrainer:
    """SpatialScore training: ``__init__`` builds data, model and optimizer from the config (and
    resumes from the run folder), ``train_step()`` is one optimizer step over the global batch,
    ``state_dict()`` is what a checkpoint holds, ``run()`` is the loop."""

    def __init__(self, cfg: RewardTrainConfig):
        from ..dist import start_run
        from .run import find_checkpoint, open_metrics, restore, split_batch

        self.cfg = cfg
        self.rank, self.world, self.device = start_run(cfg)
        self.out = Path(cfg.out)
        self.micro, self.accum = split_batch(cfg.batch_size, cfg.micro_batch, self.world)
        ckpt = find_checkpoint(self.out, who="reward")
        self._init_data()
        self._init_model()
        self.step, self.epoch, self.consumed, self.stage = 0, 0, 0, 0
        self.last_eval: dict = {}
        if ckpt is not None:
            self.load_state_dict(*restore(ckpt, self.rank, who="reward"))
        self.metrics = open_metrics(self.out, self.step, cfg)
        self._batches = None

    # ------------------------------------------------------------------ construction

    def _init_data(self) -> None:
        """Data before the model: a bad data source or a batch that does not fit fails fast."""
        from ..data.pairs import PairSet

        cfg = self.cfg
        self.streaming = cfg.data.startswith("stream:")
        self.stages = [*cfg.curriculum, {}]
        self._eval_sets: dict[int, list] = {}
        if self.streaming:
            self.stage_synth = [synth_config(cfg.data, {**cfg.stream, **{k: v for k, v in stage.items()
                                                                           if k not in STAGE_KEYS}})
                                for stage in self.stages]
            self.eval_set = self.stage_eval(len(self.stages) - 1)
        else:
            self.train_set = PairSet(cfg.data, split="train")
            self.eval_set = PairSet(cfg.data, split=cfg.eval_split)
            self.steps_per_epoch = len(self.train_set) // cfg.batch_size
            if self.steps_per_epoch == 0:
                raise ConfigError("batch_size", f"{len(self.train_set)} training pairs cannot fill one batch of "
                                                f"{cfg.batch_size}")

    def _init_model(self) -> None:
        from ..data.pairs import PairCollator
        from .run import make_optimizer

        cfg = self.cfg
        dtype = getattr(torch, cfg.dtype)
        model = _build_model(cfg, dtype)
        if cfg.init_from:
            info(f"initialised from {cfg.init_from}", who="reward")
        model = model.to(self.device)
        model.accelerate(liger=cfg.liger, compile=cfg.compile)
        if cfg.gradient_checkpointing:
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
        self.opt = make_optimizer(cfg.optimizer, [{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr}],
                                  weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.collate = PairCollator(model.processor)
        if is_main():
            info(f"global batch {cfg.batch_size} pairs = {self.world} rank(s) x {self.accum} micro-batch(es) x "
                 f"{self.micro}, optimizer {cfg.optimizer}, {cfg.parallel if self.world > 1 else 'one process'}",
                 who="reward")

    def stage_eval(self, i: int) -> list:
        if i not in self._eval_sets:
            self._eval_sets[i] = held_out_pairs(self.stage_synth[i], self.cfg.seed, self.cfg.eval_pairs,
                                                self.cfg.eval_split)
        return self._eval_sets[i]

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(trainable weights, everything else a resume needs); a collective under FSDP2."""
        if self.fsdp:
            tensors, optim = _fsdp_full(self.model, self.opt)
        else:
            tensors, optim = _trainable(self.model), self.opt.state_dict()
        return tensors, {"optimizer": optim, "scheduler": self.sched.state_dict(), "step": self.step,
                         "epoch": self.epoch, "consumed": self.consumed, "stage": self.stage}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
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
        self.sched.load_state_dict(state["scheduler"])
        for group, lr in zip(self.opt.param_groups, self.sched.get_last_lr(), strict=True):
            group["lr"] = lr  # also where no optimizer state was loaded (FSDP2 with stateless SGD)
        self.step, self.epoch, self.consumed, self.stage = (state["step"], state["epoch"], state["consumed"],
                                                            state["stage"])

    def save(self) -> None:
        from .run import checkpoint

        tensors, state = self.state_dict()
        checkpoint(self.out, self.step, tensors, state)

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
                                                    num_workers=cfg.num_workers))
        shard = PairSampler(len(self.train_set), seed=cfg.seed, rank=self.rank, world_size=self.world,
                            even=True).shard(self.epoch)
        end = self.steps_per_epoch * cfg.batch_size // self.world
        batches = [shard[i:i + self.micro] for i in range(start, end, self.micro)]
        return iter(torch.utils.data.DataLoader(self.train_set, batch_sampler=batches, collate_fn=self.collate,
                                                num_workers=cfg.num_workers))

    def _advance_data(self) -> None:
        self.consumed += self.cfg.batch_size
        if not self.streaming and self.consumed == self.steps_per_epoch * self.cfg.batch_size:
            self.epoch, self.consumed, self._batches = self.epoch + 1, 0, None

    # ------------------------------------------------------------------ the step

    def train_step(self) -> dict[str, float]:
        """One optimizer step: ``accum`` micro-batches per rank -> pair loss -> backward (gradients
        averaged over the global batch) -> pre-clip norm, clip, optimizer, schedule."""
        from contextlib import nullcontext

        from ..kernels import pair_loss, pairwise_accuracy
        from .run import TrainingError

        cfg = self.cfg
        if self._batches is None:
            self._batches = self._micro_batches()
        loss_sum, acc_sum = 0.0, 0.0
        for j in range(self.accum):
            batch = next(self._batches)
            inputs = {k: v.to(self.device) for k, v in batch["inputs"].items()}
            if cfg.shuffle_prompts:
                inputs = _shuffle_prompts(inputs, self.micro, self.step)
            last = j == self.accum - 1
            with nullcontext() if last or self.ddp is self.model else self.ddp.no_sync():
                mu, log_var = self.ddp(**inputs)
                B = mu.shape[0] // 2
                lv = (log_var[:B], log_var[B:]) if cfg.variance_head else (None, None)
                loss = pair_loss(mu[:B], lv[0], mu[B:], lv[1])
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite pair loss at step {self.step + 1} (micro-batch {j + 1}); the "
                                        f"last checkpoint is untouched: lower lr or check the data")
                (loss / self.accum).backward()
            loss_sum += float(loss.detach())
            acc_sum += pairwise_accuracy(mu[:B].detach(), mu[B:].detach())
        gnorm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.grad_clip or float("inf"))
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self._advance_data()
        return {"loss": loss_sum / self.accum, "train_acc": acc_sum / self.accum, "grad_norm": float(gnorm)}

    def evaluate(self, data) -> dict:
        from ..reward.evaluate import pair_metrics, pair_scores

        was = self.ddp.training
        scores = pair_scores(self.model, data, batch_size=self.micro, limit=self.cfg.eval_pairs)
        self.ddp.train(was)
        return pair_metrics(*scores)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        """Train to ``max_steps`` (or ``stop_after``), then save the model; returns the last evaluation."""
        from ..dist import shutdown

        cfg = self.cfg
        self.ddp.train()
        steps = range(self.step, cfg.max_steps)
        bar = progress(steps, desc="reward", unit="step") if is_main() else steps
        t_last, pairs_since = time.perf_counter(), 0
        for _ in bar:
            rec = self.train_step()
            pairs_since += cfg.batch_size
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self._log(rec, pairs_since / (time.perf_counter() - t_last), bar)
                t_last, pairs_since = time.perf_counter(), 0
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                self._evaluate_and_advance()
            if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                self.save()
            if cfg.stop_after and cfg.max_steps > self.step >= cfg.stop_after:
                info(f"stopping at step {self.step} (stop_after)", who="reward")
                if self.metrics:
                    self.metrics.close()
                shutdown()
                return {}
        return self._finish()

    def _log(self, rec: dict, pairs_per_s: float, bar) -> None:
        from ..dist import mean

        rec = {"step": self.step, "loss": mean(rec["loss"]), "train_acc": mean(rec["train_acc"]),
               "lr": self.sched.get_last_lr()[0], "grad_norm": rec["grad_norm"], "pairs_per_s": pairs_per_s}
        if self.device.type == "cuda":
            rec["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.metrics:
            self.metrics.write(rec)
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"loss {rec['loss']:.4f} acc {rec['train_acc']:.3f}")

    def _evaluate_and_advance(self) -> None:
        """Held-out evaluation (the current curriculum stage's, or the final task's); a stage that
        reaches ``advance_at`` hands over to the next."""
        cfg = self.cfg
        final = self.stage == len(self.stages) - 1
        self.last_eval = self.evaluate(self.eval_set if final or not self.streaming else self.stage_eval(self.stage))
        ev = self.last_eval
        if self.metrics:
            self.metrics.write({"step": self.step, "stage": self.stage,
                                **{f"eval_{k}": v for k, v in ev.items() if k != "calibration"}})
            info(step_line(self.step, cfg.max_steps, stage=f"{self.stage + 1}/{len(self.stages)}",
                           eval_acc=ev["accuracy"], acc_1=ev["accuracy_1"], acc_2_3=ev["accuracy_2_3"],
                           margin=ev["mean_margin"]), who="reward")
        rules = self.stages[self.stage]
        in_stage = self.consumed // cfg.batch_size  # steps since this stage began (kept across a resume)
        cleared = ev["accuracy"] >= rules.get("advance_at", cfg.advance_at)
        if not final and (cleared or in_stage >= rules.get("max_stage_steps", float("inf"))):
            why = "" if cleared else f" (stage {self.stage + 1} not cleared in its {in_stage} steps)"
            self.stage, self.consumed, self._batches = self.stage + 1, 0, None
            info(f"curriculum: stage {self.stage + 1}/{len(self.stages)} from step {self.step}{why}", who="reward")

    def _finish(self) -> dict:
        from ..dist import shutdown
        from ..reward.evaluate import format_table

        if not self.last_eval or (self.streaming and self.stage < len(self.stages) - 1):
            self.last_eval = self.evaluate(self.eval_set)  # resumed at the end, or stopped mid-curriculum
        final_tensors = _fsdp_full(self.model, None)[0] if self.fsdp else None
        if is_main():
            model = self.model
            if self.fsdp:  # a plain copy of the model on rank 0 holds the gathered weights for saving
                model = _unsharded_copy(self.cfg, final_tensors)
            model.save_pretrained(self.out / "model")
            _plot(self.out)
            (self.out / "eval.md").write_text(format_table(self.last_eval) + "\n")
            self.metrics.close()
            info(f"done: model -> {self.out / 'model'}", who="reward")
        shutdown()
        return self.last_eval


def train(cfg: RewardTrainConfig) -> dict:
    """Build a :class:`RewardTrainer` from ``cfg`` and run it (resuming from ``cfg.out``)."""
    cfg.check()
    return RewardTrainer(cfg).run()


def _fully_shard(model) -> None:
    """FSDP2: one shard group per language-model decoder layer and per vision block, then the rest."""
    from torch.distributed.fsdp import fully_shard

    backbone = model.backbone.get_base_model() if hasattr(model.backbone, "get_base_model") else model.backbone
    for layer in backbone.language_model.layers:
        fully_shard(layer)
    for block in backbone.visual.blocks:
        fully_shard(block)
    fully_shard(model)


def _fsdp_full(model, opt) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Full (unsharded) trainable weights and optimizer state on rank 0 (a collective: all ranks call)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    names = set(_trainable(model))
    tensors = {n: t for n, t in full.items() if n in names}
    optim = get_optimizer_state_dict(model, opt, options=options) if opt is not None else None
    return tensors, optim


def _fsdp_load(model, opt, tensors: dict[str, torch.Tensor], optim: dict) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, tensors, options=options)
    if optim.get("state"):  # plain SGD keeps no state (and torch cannot place an empty one on a device)
        set_optimizer_state_dict(model, opt, optim_state_dict=optim, options=options)


def _unsharded_copy(cfg: RewardTrainConfig, tensors: dict[str, torch.Tensor]):
    model = _build_model(cfg, getattr(torch, cfg.dtype))
    matched = [n for n, _ in model.named_parameters() if n in tensors]
    model.load_state_dict(tensors, strict=False)
    if len(matched) != len(tensors):
        raise RuntimeError("the gathered FSDP2 weights do not match a fresh model's parameter names")
    return model


STAGE_KEYS = ("advance_at", "max_stage_steps")  # keys of a curriculum stage that are not synth keys


def synth_config(data: str, overrides: dict | None = None):
    from ..config import from_dict
    from ..data.synth import DIFFICULTIES, SynthConfig

    name = data.split(":", 1)[1]
    if name not in DIFFICULTIES:
        raise ConfigError("data", f"unknown stream preset {name!r} (known: {', '.join(DIFFICULTIES)})")
    return from_dict(SynthConfig, {**DIFFICULTIES[name], **(overrides or {})}, "stream")


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
        raise ConfigError("eval_split", f"no '{split}' pairs in the synthetic stream")
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
