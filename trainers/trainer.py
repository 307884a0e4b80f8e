"""What every run has, written once: its config section (:class:`RunConfig`) and its loop (:class:`Trainer`).

A trainer is an object: ``build()`` makes data, models and optimizer from the config, ``train_step()`` is one
optimizer step, ``evaluate()`` the held-out numbers, ``state_dict()`` / ``load_state_dict()`` what a checkpoint
holds beyond the step and the training time, ``export()`` the run's result. This module owns the rest:

* the start: process group (torchrun), CPU threads, seed, the run folder (``run`` mode, ``config.yaml``,
  ``run.json``), resume from the newest complete checkpoint (weights, optimizer, RNG, step, training seconds);
* the cadence: one record per step in ``metrics.jsonl`` (the evaluation's numbers in the record of the step
  they belong to), a log line every ``log_every`` steps and at every evaluation, an evaluation every
  ``eval_every`` steps and at the last, an atomic checkpoint every ``save_every`` steps and at the last;
* the ends: the last step (a final evaluation where the last step had none, the export, plots),
  ``max_minutes`` of training time (the same, as a partial result), ``stop_after`` (the process ends as if
  killed, for the resume tests).

A new objective costs a config (``RunConfig`` plus its own sections) and a subclass with ``build``,
``total_steps``, ``train_step``, ``evaluate``, ``state_dict``/``load_state_dict`` and ``export``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from ..config import ConfigError, param
from ..dist import is_main
from ..logs import info, progress, step_line


@dataclass
class RunConfig:
    """The keys every run has (a trainer's config extends it with its own sections)."""

    KIND: ClassVar[str] = "run"  # the trainer's name: log prefix and default run folder

    model: str | None = param(None, help="the checkpoint the run starts from: a local folder or a hub id")
    out: str | None = param(None, help="the run folder (config.yaml, run.json, metrics.jsonl, checkpoints/ and the "
                                       "result); default runs/<trainer>")
    run: Literal["auto", "resume", "fresh"] = param(
        "auto", help="auto: resume a run of the same config, refuse another's; resume: there must be one; fresh: "
                     "move an existing run aside and start over")
    seed: int = param(0, min=0)
    dtype: Literal["float32", "bfloat16"] = param("float32", help="dtype the models train in")
    threads: int = param(0, min=0, help="torch CPU threads (0: torch's default)")
    report_to: list[str] = param(default_factory=lambda: ["jsonl"],
                                 help="where records go besides metrics.jsonl: tensorboard, wandb (optional packages)")
    micro_batch: int = param(0, min=0, help="items (pairs, kept samples, nft's sample-timestep pairs, images) per "
                                            "forward/backward on a rank; the rest of the rank's share is accumulated (0: all at once)")
    log_every: int = param(10, min=1, help="a log line every this many steps (and at every evaluation)")
    eval_every: int = param(100, min=1, help="a held-out evaluation every this many steps (and at the last)")
    save_every: int = param(200, min=1, help="an atomic checkpoint every this many steps (and at the last)")
    max_minutes: float = param(0.0, min=0.0, help="stop after this much training time, evaluated and exported as a "
                                                  "partial result (0: no limit)")
    stop_after: int = param(0, min=0, help="end the process after this many steps, as if killed (tests)")

    def __post_init__(self) -> None:
        if self.out is None:
            self.out = f"runs/{self.KIND}"

    def check(self) -> None:
        from ..logs import check_report_to

        check_report_to(self.report_to)


def _start(cfg: RunConfig) -> tuple[int, int, torch.device]:
    """Process group, CPU threads, seed, then the run folder (a collective)."""
    from .. import dist
    from ..run_folder import open_run

    rank, world, device = dist.init()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    open_run(cfg, world)
    return rank, world, device


def _evaluated(rec: dict) -> bool:
    return any(k.startswith("eval_") for k in rec)


class Trainer:
    """The loop of every trainer (module docstring); subclasses supply the hooks below it."""

    EVAL_AT_START: ClassVar[bool] = False  # evaluate before the first step (the "before" of a fine-tuning run)
    UNIT: ClassVar[str] = "step"

    def __init__(self, cfg: RunConfig):
        from ..checkpoint import find_checkpoint, restore
        from ..run_folder import open_metrics

        if not cfg.model:
            raise ConfigError("model", "give the checkpoint the run starts from (a folder or a hub id)")
        self.cfg, self.who = cfg, cfg.KIND
        self.rank, self.world, self.device = _start(cfg)
        self.out = Path(cfg.out)
        self.step, self.elapsed, self.last = 0, 0.0, {}
        self.plan()
        ckpt = find_checkpoint(self.out, who=self.who)  # before any model: a torn run folder fails fast
        self.build()
        if ckpt is not None:
            tensors, state = restore(ckpt, self.rank, who=self.who)
            self.step, self.elapsed = state["step"], state.get("elapsed", 0.0)
            self.load_state_dict(tensors, state)
        self.metrics = open_metrics(self.out, self.step, cfg)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        """Train to ``total_steps`` (or ``stop_after`` / ``max_minutes``), then evaluate and export."""
        from ..dist import shutdown

        cfg, total = self.cfg, self.total_steps
        if self.step == 0 and self.EVAL_AT_START:
            self.write({"step": 0, "elapsed_s": 0.0, **self.evaluate("before")})
        steps = range(self.step, total)
        bar = progress(steps, desc=self.who, unit=self.UNIT) if is_main() else steps
        timed_out = False
        for _ in bar:
            t0 = time.perf_counter()
            rec = self.train_step()
            self.step += 1
            self.elapsed += time.perf_counter() - t0
            rec = {"step": self.step, **rec, "elapsed_s": self.elapsed}
            if self.eval_due():
                ev = self.evaluate()
                rec.update(ev)
                self.after_evaluation(ev)
            self.last = rec
            self.write(rec, bar)
            timed_out = bool(cfg.max_minutes and self.elapsed >= 60 * cfg.max_minutes)
            if (self.step % cfg.save_every == 0 or self.step == total or timed_out or self.save_due()) \
                    and self.can_save():
                self.save()
            if cfg.stop_after and total > self.step >= cfg.stop_after:
                info(f"stopping at step {self.step} (stop_after)", who=self.who)
                if self.metrics:
                    self.metrics.close()
                shutdown()
                return {}
            if timed_out:
                info(f"partial result: time budget of {cfg.max_minutes} min reached at step {self.step} of {total}",
                     who=self.who)
                break
        return self.finish()

    def write(self, rec: dict, bar=None) -> None:
        """Rank 0: the record to metrics.jsonl (and the integrations), the progress bar, the log line."""
        if self.device.type == "cuda":  # the allocator's peak since it was last reset (a trainer may reset it per phase)
            rec["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if not self.metrics:
            return
        self.metrics.write(rec)
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(self.postfix(rec))
        step = rec["step"]
        if _evaluated(rec) or step % self.cfg.log_every == 0 or step == self.total_steps:
            info(step_line(step, self.total_steps, **self.log_fields(rec)), who=self.who)

    def save(self) -> None:
        from ..checkpoint import write_checkpoint

        tensors, state = self.state_dict()
        write_checkpoint(self.out, self.step, tensors, {**(state or {}), "elapsed": self.elapsed})

    def finish(self) -> dict:
        """A final evaluation where the last step had none (a time budget, a resumed finished run), the
        trainer's final numbers, the export, plots; returns the final numbers."""
        from ..dist import shutdown

        if not _evaluated(self.last):
            ev = self.evaluate()
            if ev:
                self.last = {**self.last, **ev}
                self.write({"step": self.step, "elapsed_s": self.elapsed, **ev})
        final = self.final_result()
        done = self.export(final)
        if is_main():
            self.metrics.close()
            self.plot()
            info(f"done: {done}", who=self.who)
        shutdown()
        return final

    # ------------------------------------------------------------------ what a trainer supplies

    @property
    def total_steps(self) -> int:
        raise NotImplementedError

    def plan(self) -> None:
        """Checks that need the number of ranks but no data or model (how a batch splits), run before the
        checkpoint lookup."""

    def build(self) -> None:
        """Data, models, optimizer (and everything ``load_state_dict`` fills)."""
        raise NotImplementedError

    def train_step(self) -> dict:
        """One optimizer step at ``self.step`` (0-based; the loop counts it): the record's numbers."""
        raise NotImplementedError

    def evaluate(self, tag: str | None = None) -> dict:
        """Held-out numbers (keys ``eval_*``); ``tag`` names images it may save. {}: nothing to evaluate yet."""
        raise NotImplementedError

    def after_evaluation(self, ev: dict) -> None:
        """Act on a periodic evaluation before the checkpoint (the reward trainer's curriculum)."""

    def state_dict(self) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
        """(tensors, state) a resume needs besides the step, the training time and the RNG; a collective."""
        raise NotImplementedError

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Restore what :meth:`state_dict` gave (``self.step`` is already the checkpoint's)."""
        raise NotImplementedError

    def eval_due(self) -> bool:
        """Evaluate after this step (``self.step`` steps done): every ``eval_every`` and at the last."""
        return self.step % self.cfg.eval_every == 0 or self.step == self.total_steps

    def save_due(self) -> bool:
        """A checkpoint beyond the cadence (e.g. at a stage switch)."""
        return False

    def can_save(self) -> bool:
        """False while the state must not become the resume point (e.g. a streak of non-finite rewards)."""
        return True

    def final_result(self) -> dict:
        """The numbers the run returns (default: the last record)."""
        return dict(self.last)

    def export(self, final: dict) -> str:
        """Write the run's result (called on every rank; rank 0 writes); returns what was written."""
        raise NotImplementedError

    def plot(self) -> None:
        """Rank 0: curves of the run folder's metrics."""

    def log_fields(self, rec: dict) -> dict:
        """The numbers of a record that go on its log line."""
        return {k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))}

    def postfix(self, rec: dict) -> str:
        """The progress bar's suffix for a record."""
        return ""
