"""The loop every trainer shares (trainers/trainer.py), driven by a toy objective written the way a new one
would be: a config that extends RunConfig, and a Trainer subclass with its step, evaluation, state and export.
Its cadence (a record per step, evaluations and checkpoints at their steps and at the last), resume after a stop,
and the time budget's partial result are checked by value."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file

from spatialcore.config import load_config, param
from spatialcore.trainers.optim import OptimConfig, make_optimizer, set_lr
from spatialcore.trainers.trainer import RunConfig, Trainer

TRUE_W = torch.tensor([1.5, -2.0, 0.5])


@dataclass
class ToyConfig(RunConfig):
    KIND: ClassVar[str] = "toy"
    steps: int = param(12, min=1)
    batch: int = param(8, min=1)
    optim: OptimConfig = param(default_factory=lambda: OptimConfig(name="sgd", lr=0.1))
    sleep: float = 0.0  # seconds per step (the time-budget test)


class ToyTrainer(Trainer):
    """Least squares on a stream of batches (batch k drawn from seed + k): the whole objective."""

    @property
    def total_steps(self) -> int:
        return self.cfg.steps

    def build(self) -> None:
        self.w = torch.zeros(3, requires_grad=True)
        self.opt = make_optimizer(self.cfg.optim, [{"params": [self.w], "lr": self.cfg.optim.lr}])

    def _batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(self.cfg.batch, 3, generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + k))
        return x, x @ TRUE_W

    def train_step(self) -> dict:
        x, y = self._batch(self.step)
        loss = ((x @ self.w - y) ** 2).mean()
        self.opt.zero_grad()
        loss.backward()
        lr = set_lr(self.opt, self.cfg.optim, self.step, self.total_steps)
        self.opt.step()
        time.sleep(self.cfg.sleep)
        return {"loss": float(loss.detach()), "lr": lr}

    def evaluate(self, tag: str | None = None) -> dict:
        x, y = self._batch(-1)
        with torch.no_grad():
            return {"eval_loss": float(((x @ self.w - y) ** 2).mean())}

    def state_dict(self):
        return {"w": self.w.detach()}, {"optimizer": self.opt.state_dict()}

    def load_state_dict(self, tensors, state) -> None:
        with torch.no_grad():
            self.w.copy_(tensors["w"])
        self.opt.load_state_dict(state["optimizer"])

    def export(self, final: dict) -> str:
        save_file({"w": self.w.detach().clone()}, self.out / "model.safetensors")
        return f"model -> {self.out / 'model.safetensors'}"


def _cfg(tmp_path, name: str, **kw) -> ToyConfig:
    base = {"model": "toy", "out": str(tmp_path / name), "eval_every": 5, "save_every": 4, "log_every": 3, **kw}
    return load_config(ToyConfig, None, [f"{k}={v}" for k, v in base.items()])


def _records(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_cadence_of_records_evaluations_and_checkpoints(tmp_path, capfd):
    final = ToyTrainer(_cfg(tmp_path, "a")).run()
    recs = _records(tmp_path / "a")
    assert [r["step"] for r in recs] == list(range(1, 13)), "one record per step"
    assert [r["step"] for r in recs if "eval_loss" in r] == [5, 10, 12], "every eval_every and at the last"
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step_*")) == ["step_00000008",
                                                                                       "step_00000012"]
    assert final["step"] == 12 and final["eval_loss"] == recs[-1]["eval_loss"] < recs[0]["loss"]
    assert (tmp_path / "a" / "model.safetensors").is_file() and (tmp_path / "a" / "run.json").is_file()
    err = capfd.readouterr().err
    logged = [line for line in err.splitlines() if line.startswith("[toy] step ")]
    assert [line.split()[2] for line in logged] == ["3/12", "5/12", "6/12", "9/12", "10/12", "12/12"]


def test_a_stopped_run_resumes_to_the_same_weights_and_records(tmp_path, capfd):
    ToyTrainer(_cfg(tmp_path, "straight")).run()
    assert ToyTrainer(_cfg(tmp_path, "stopped", stop_after=6)).run() == {}
    assert not (tmp_path / "stopped" / "model.safetensors").exists()
    ToyTrainer(_cfg(tmp_path, "stopped")).run()
    assert "resumed from step 4 " in capfd.readouterr().err  # the newest checkpoint before the stop
    a, b = _records(tmp_path / "straight"), _records(tmp_path / "stopped")
    assert [r["step"] for r in b] == list(range(1, 13))
    keep = ("step", "loss", "lr", "eval_loss")
    assert [{k: r.get(k) for k in keep} for r in a] == [{k: r.get(k) for k in keep} for r in b]
    assert torch.equal(load_file(tmp_path / "straight" / "model.safetensors")["w"],
                       load_file(tmp_path / "stopped" / "model.safetensors")["w"])


def test_the_time_budget_ends_with_an_evaluated_exported_partial_result(tmp_path, capfd):
    final = ToyTrainer(_cfg(tmp_path, "t", sleep=0.05, max_minutes=0.12 / 60)).run()
    recs = _records(tmp_path / "t")
    stopped = recs[-1]["step"]
    assert 2 <= stopped < 12 and "eval_loss" in recs[-1] and final["eval_loss"] == recs[-1]["eval_loss"]
    assert (tmp_path / "t" / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    assert (tmp_path / "t" / "model.safetensors").is_file()
    assert f"partial result: time budget of {0.12 / 60} min reached at step {stopped} of 12" in capfd.readouterr().err


def test_a_run_needs_a_model(tmp_path):
    from spatialcore.config import ConfigError

    with pytest.raises(ConfigError, match="'model'"):
        ToyTrainer(load_config(ToyConfig, None, [f"out={tmp_path / 'x'}"]))
    assert load_config(ToyConfig).out == "runs/toy"  # the default run folder is named after the trainer


def test_every_trainer_logs_an_evaluation_s_own_record():
    """At a time limit the final evaluation is written as its own record (no training step's numbers): each trainer's
    log line must take it (the reward trainer once failed there with a KeyError after the run's last checkpoint)."""
    from types import SimpleNamespace

    from spatialcore.trainers.grpo import GRPOTrainer
    from spatialcore.trainers.reward import RewardTrainer
    from spatialcore.trainers.sft import SFTTrainer

    ev = {"step": 7, "elapsed_s": 1.0, "stage": 1, "eval_accuracy": 0.75, "eval_accuracy_1": 0.5,
          "eval_accuracy_2_3": 1.0, "eval_mean_margin": 0.25, "eval_reward": 0.5}
    fields = RewardTrainer.log_fields(SimpleNamespace(stages=[0, 1]), ev)
    assert fields == {"stage": "2/2", "eval_acc": 0.75, "acc_1": 0.5, "acc_2_3": 1.0, "margin": 0.25}
    for trainer in (GRPOTrainer, SFTTrainer):
        assert trainer.log_fields(SimpleNamespace(), ev)["eval_accuracy"] == 0.75
