"""report_to: TensorBoard gets every scalar of metrics.jsonl at its step and the sample grids (read back from
its event file); W&B gets the same calls (checked against a stand-in of its API: the wandb package is not a
dependency); an unknown or missing integration is a config error naming report_to."""

import sys
import types

import pytest

from runs import cli_args, records
from spatialcore.cli import main

LEFT = "the red circle is to the left of the blue square"


def _grpo(tiny_dir, out, *extra):
    base = {"model": str(tiny_dir / "flux"), "out": str(out), "prompts": [LEFT], "group_size": 4, "prompts_per_iter": 1,
            "top_k": 1, "iterations": 3, "eval_every": 3, "eval_seeds": 1, "save_every": 3, "sampler.steps": 2,
            "sampler.image_size": 32, "policy.lora_rank": 4, "threads": 1}
    return ["grpo", "train", *cli_args(base), *extra]


def test_tensorboard_reads_back_what_metrics_jsonl_holds(tiny_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(_grpo(tiny_dir, out, 'report_to=["jsonl", "tensorboard"]')) == 0
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    recs = [r for r in records(out) if "reward_mean" in r]
    got = {e.step: e.value for e in acc.Scalars("reward_mean")}
    assert got == pytest.approx({r["step"]: r["reward_mean"] for r in recs}, rel=1e-6)
    assert [e.step for e in acc.Scalars("eval_reward")] == [r["step"] for r in records(out) if "eval_reward" in r]
    assert {"samples/before", "samples/after"} <= set(acc.Tags()["images"])


def test_wandb_gets_the_same_scalars_and_images(tiny_dir, tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, data, step=None):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.__spec__ = types.SimpleNamespace(name="wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or Run()
    fake.Image = lambda path: ("image", path)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "wandb" else None)
    out = tmp_path / "run"
    assert main(_grpo(tiny_dir, out, 'report_to=["wandb"]')) == 0
    (init,) = calls["init"]
    assert init["resume"] == "allow" and init["config"]["group_size"] == 4 and init["dir"] == str(out)
    scalars = {step: d["reward_mean"] for step, d in calls["log"] if "reward_mean" in d}
    assert scalars == {r["step"]: r["reward_mean"] for r in records(out) if "reward_mean" in r}
    assert any(d.get("samples/after", (None,))[0] == "image" for _, d in calls["log"]) and calls["finish"] == 1


def test_report_to_errors_name_the_key(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    for value, why in (('["jsonl", "mlflow"]', "unknown"), ('["wandb"]', "pip install wandb")):
        assert main(_grpo(tiny_dir, tmp_path / "x", f"report_to={value}")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "report_to" in err and why in err, err
