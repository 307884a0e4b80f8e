"""SpatialScore trainer: one readable loop (launch with ``torchrun`` for several processes).

    spatialcore reward train --config configs/reward/tiny_cpu.yaml [key=value ...]
    torchrun --nproc_per_node 8 $(which spatialcore) reward train --config configs/reward/qwen2_5_vl_7b.yaml

Per optimizer step: ``grad_accum`` micro-batches of pairs -> one Qwen2.5-VL forward over the
2B (prompt, image) judgements -> Gaussian head -> ``kernels.pair_loss`` -> backward; gradient
clipping, AdamW, warm-up + cosine schedule. Every ``eval_every`` steps the held-out pairs are
scored (table format), every ``save_every`` steps an atomic checkpoint is written; a run
restarted with the same config resumes from the latest checkpoint exactly (weights,
optimizer, scheduler, RNG, data position).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import ConfigError, param
from ..logs import MetricsFile, info, progress, step_line


@dataclass
class RewardTrainConfig:
    model: str = param("runs/tiny/reward", help="Qwen2.5-VL checkpoint (folder or hub id)")
    init_from: str | None = None  # a SpatialScore folder to start from (curriculum stages)
    data: str = param("runs/pairs", help="pair folder (pairs.jsonl + images), or stream:<easy|medium|hard> "
                                         "for fresh synthetic pairs rendered on the fly")
    stream: dict[str, Any] = field(default_factory=dict)  # synth-config overrides for data=stream:<preset>
    # Streaming only: stages of synth overrides trained before the final task (the preset +
    # `stream`); a stage ends once its held-out accuracy reaches `advance_at`.
    curriculum: list[dict[str, Any]] = field(default_factory=list)
    advance_at: float = param(0.95, min=0.0, max=1.0)
    eval_split: Literal["val", "test"] = "test"
    out: str = "runs/reward"
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
    batch_size: int = param(16, min=1, help="pairs per rank per micro-batch")
    grad_accum: int = param(1, min=1)
    lr: float = param(3e-4, min=0.0)
    head_lr: float = param(3e-3, min=0.0)
    weight_decay: float = param(0.0, min=0.0)
    warmup_steps: int = param(50, min=0)
    max_steps: int = param(1000, min=1)
    min_lr_ratio: float = param(0.1, min=0.0, max=1.0)
    grad_clip: float = param(1.0, min=0.0)
    eval_every: int = param(100, min=1)
    eval_pairs: int = param(512, min=1)
    save_every: int = param(200, min=1)
    log_every: int = param(10, min=1)
    num_workers: int = param(0, min=0)
    shuffle_prompts: bool = False  # control: pair each image with another pair's prompt
    threads: int = param(0, min=0, help="torch CPU threads (0: torch's default)")
    stop_after: int = param(0, min=0, help="end the process after this many steps, as if killed (tests)")
    plots: list[str] = field(default_factory=lambda: ["loss", "accuracy"])

    def check(self) -> None:
        if self.curriculum and not self.data.startswith("stream:"):
            raise ConfigError("curriculum", "needs data=stream:<preset>")
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


def train(cfg: RewardTrainConfig) -> dict:
    from ..checkpoint import (
        all_rng_states,
        latest_checkpoint,
        load_checkpoint,
        save_checkpoint,
        set_rng_state,
    )
    from ..data.pairs import PairCollator, PairSampler, PairSet
    from ..data.synth import StreamingPairs
    from ..dist import barrier, is_main, mean, shutdown, start_run
    from ..kernels import pair_loss, pairwise_accuracy
    from ..reward.evaluate import format_table, pair_metrics, pair_scores
    from ..reward.model import LoraSpec, SpatialScore

    rank, world, device = start_run(cfg)
    out = Path(cfg.out)

    # ---- model
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    lora = LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha) if cfg.lora_rank else None
    if cfg.init_from:
        model = SpatialScore.from_pretrained(cfg.init_from, attention=cfg.attention, dtype=dtype)
        model.variance_head = cfg.variance_head
        info(f"initialised from {cfg.init_from}", who="reward")
    else:
        model = SpatialScore.from_backbone(cfg.model, attention=cfg.attention, dtype=dtype, lora=lora,
                                           variance_head=cfg.variance_head)
    model = model.to(device)
    model.accelerate(liger=cfg.liger, compile=cfg.compile)
    if cfg.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fsdp = cfg.parallel == "fsdp2" and world > 1
    ddp = model
    if fsdp:
        _fully_shard(model)
    elif world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    params = _trainable(model)
    head = [p for n, p in params.items() if n.startswith("head.")]
    body = [p for n, p in params.items() if not n.startswith("head.")]
    opt = torch.optim.AdamW([{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr}],
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    # ---- data
    collate = PairCollator(model.processor)
    streaming = cfg.data.startswith("stream:")
    stages = [*cfg.curriculum, {}]
    eval_sets: dict[int, list] = {}

    def stage_synth(i: int):
        return synth_config(cfg.data, {**cfg.stream, **stages[i]})

    def stage_eval(i: int):
        if i not in eval_sets:
            eval_sets[i] = held_out_pairs(stage_synth(i), cfg.seed, cfg.eval_pairs, cfg.eval_split)
        return eval_sets[i]

    if streaming:
        for i in range(len(stages)):
            stage_synth(i)  # fail on a bad stage before any training
        eval_set = stage_eval(len(stages) - 1)
    else:
        train_set = PairSet(cfg.data, split="train")
        eval_set = PairSet(cfg.data, split=cfg.eval_split)
        if len(train_set) < cfg.batch_size * world:
            raise ConfigError("batch_size", f"{len(train_set)} training pairs cannot fill {world} x {cfg.batch_size}")
        sampler = PairSampler(len(train_set), seed=cfg.seed, rank=rank, world_size=world, even=True)

    # ---- resume
    step, epoch, batch_in_epoch, stage = 0, 0, 0, 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        tensors, state = load_checkpoint(ckpt)
        missing = set(params) - set(tensors)
        if missing:
            raise RuntimeError(f"checkpoint {ckpt} lacks {sorted(missing)[:3]}...: was the config changed?")
        if fsdp:
            _fsdp_load(model, opt, tensors, state["optimizer"])
        else:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(tensors[n])
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        stage = state.get("stage", 0)
        info(f"resumed from {ckpt} at step {step}", who="reward")

    def batches():
        nonlocal epoch, batch_in_epoch
        if streaming:  # item k of this rank's stream is a pure function of (seed, stage, rank, k)
            stream = StreamingPairs(stage_synth(stage), f"{cfg.seed}-{stage}", rank=rank, world_size=world,
                                    start=batch_in_epoch * cfg.batch_size)
            loader = torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size, collate_fn=collate,
                                                 num_workers=cfg.num_workers)
            for batch in loader:
                batch_in_epoch += 1
                yield batch
        while True:
            sampler.set_epoch(epoch)
            sampler.position = batch_in_epoch * cfg.batch_size
            loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                                                 collate_fn=collate, num_workers=cfg.num_workers, drop_last=True)
            for batch in loader:
                batch_in_epoch += 1
                yield batch
            epoch, batch_in_epoch = epoch + 1, 0

    def evaluate(data) -> dict:
        was = ddp.training
        scores = pair_scores(model, data, batch_size=cfg.batch_size, limit=cfg.eval_pairs)
        ddp.train(was)
        return pair_metrics(*scores)

    def checkpoint() -> None:
        states = all_rng_states()
        if fsdp:  # every rank takes part in gathering the full tensors; rank 0 writes them
            tensors, optim = _fsdp_full(model, opt)
        else:
            tensors, optim = _trainable(model), opt.state_dict() if is_main() else None
        if is_main():
            save_checkpoint(out, step, tensors, {
                "optimizer": optim, "scheduler": sched.state_dict(), "rng": states, "step": step,
                "epoch": epoch, "batch_in_epoch": batch_in_epoch, "stage": stage})
        barrier()

    metrics = MetricsFile(out / "metrics.jsonl") if is_main() else None
    it = batches()
    ddp.train()
    bar = progress(range(step, cfg.max_steps), desc="reward", unit="step") if is_main() else range(step, cfg.max_steps)
    t_last, pairs_since = time.perf_counter(), 0
    last_eval: dict = {}
    for _ in bar:
        loss_sum, acc_sum = 0.0, 0.0
        for _micro in range(cfg.grad_accum):
            batch = next(it)
            inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
            if cfg.shuffle_prompts:
                inputs = _shuffle_prompts(inputs, cfg.batch_size, step)
            mu, log_var = ddp(**inputs)
            B = mu.shape[0] // 2
            lv = (log_var[:B], log_var[B:]) if cfg.variance_head else (None, None)
            loss = pair_loss(mu[:B], lv[0], mu[B:], lv[1])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}: check lr / data")
            (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach())
            acc_sum += pairwise_accuracy(mu[:B].detach(), mu[B:].detach())
            pairs_since += B * world
        gnorm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip) if cfg.grad_clip else None
        if gnorm is not None and hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            dt = time.perf_counter() - t_last
            rec = {"step": step, "loss": mean(loss_sum / cfg.grad_accum, device),
                   "train_acc": mean(acc_sum / cfg.grad_accum, device), "lr": sched.get_last_lr()[0],
                   "grad_norm": float(gnorm) if gnorm is not None else None, "pairs_per_s": pairs_since / dt}
            if device.type == "cuda":
                rec["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            t_last, pairs_since = time.perf_counter(), 0
            if metrics:
                metrics.write(rec)
                if hasattr(bar, "set_postfix_str"):
                    bar.set_postfix_str(f"loss {rec['loss']:.4f} acc {rec['train_acc']:.3f}")
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            final = stage == len(stages) - 1
            last_eval = evaluate(eval_set if final or not streaming else stage_eval(stage))
            if metrics:
                metrics.write({"step": step, "stage": stage,
                               **{f"eval_{k}": v for k, v in last_eval.items() if k != "calibration"}})
                info(step_line(step, cfg.max_steps, stage=f"{stage + 1}/{len(stages)}", eval_acc=last_eval["accuracy"],
                               acc_1=last_eval["accuracy_1"], acc_2_3=last_eval["accuracy_2_3"],
                               margin=last_eval["mean_margin"]), who="reward")
            if not final and last_eval["accuracy"] >= cfg.advance_at:
                stage, batch_in_epoch = stage + 1, 0
                it = batches()
                info(f"curriculum: stage {stage + 1}/{len(stages)} from step {step}", who="reward")
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            checkpoint()
        if cfg.stop_after and step >= cfg.stop_after and step < cfg.max_steps:
            info(f"stopping at step {step} (stop_after)", who="reward")
            if metrics:
                metrics.close()
            shutdown()
            return {}
    if streaming and stage < len(stages) - 1:  # the run ended mid-curriculum: report the final task
        last_eval = evaluate(eval_set)
    final_tensors = _fsdp_full(model, None)[0] if fsdp else None
    if is_main():
        if fsdp:  # a plain copy of the model on rank 0 holds the gathered weights for saving
            model = _unsharded_copy(cfg, final_tensors, dtype, lora)
        model.save_pretrained(out / "model")
        _plot(out)
        (out / "eval.md").write_text(format_table(last_eval) + "\n")
        metrics.close()
        info(f"done: model -> {out / 'model'}", who="reward")
    shutdown()
    return last_eval


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
    set_optimizer_state_dict(model, opt, optim_state_dict=optim, options=options)


def _unsharded_copy(cfg: RewardTrainConfig, tensors: dict[str, torch.Tensor], dtype, lora):
    from ..reward.model import SpatialScore

    if cfg.init_from:
        model = SpatialScore.from_pretrained(cfg.init_from, attention=cfg.attention, dtype=dtype)
        model.variance_head = cfg.variance_head
    else:
        model = SpatialScore.from_backbone(cfg.model, attention=cfg.attention, dtype=dtype, lora=lora,
                                           variance_head=cfg.variance_head)
    matched = [n for n, _ in model.named_parameters() if n in tensors]
    model.load_state_dict(tensors, strict=False)
    if len(matched) != len(tensors):
        raise RuntimeError("the gathered FSDP2 weights do not match a fresh model's parameter names")
    return model


def synth_config(data: str, overrides: dict | None = None):
    from ..config import from_dict
    from ..data.synth import DIFFICULTIES, SynthConfig

    name = data.split(":", 1)[1]
    if name not in DIFFICULTIES:
        raise ConfigError("data", f"unknown stream preset {name!r} (known: {', '.join(DIFFICULTIES)})")
    return from_dict(SynthConfig, {**DIFFICULTIES[name], **(overrides or {})}, "stream")


def held_out_pairs(synth_cfg, seed: int, n: int, split: str) -> list[dict]:
    """The first ``n`` pairs of a separate seed whose prompts fall in the held-out ``split``."""
    from ..data.synth import make_pair

    out, i = [], 0
    spec = synth_cfg.spec()
    while len(out) < n and i < 200 * n:
        pair = make_pair(synth_cfg, f"heldout-{seed}", i, spec)
        i += 1
        if pair.record["split"] == split:
            r = pair.record
            out.append({"id": r["id"], "prompt": r["prompt"], "chosen": pair.chosen, "rejected": pair.rejected,
                        "n_perturbations": r["n_perturbations"], "perturbations": r["perturbations"]})
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
