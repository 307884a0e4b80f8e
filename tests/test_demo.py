"""The end-to-end demo on a reduced budget: every stage runs, the report has its tables (base against RL
by the pixel oracle, the reward-hacking gauge), and a second run reuses what the first one built."""

import json
from pathlib import Path

import pytest

from spatialcore.config import ConfigError, load_config
from spatialcore.demo import DemoConfig, run_demo

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "demo" / "smoke.yaml"


def small(extra=()):
    """The demo at configs/demo/smoke.yaml's budget (every stage, about a minute)."""
    return load_config(DemoConfig, SMOKE, list(extra))


def test_demo_runs_every_stage_and_reports(tmp_path, monkeypatch):
    import torch
    import yaml

    import spatialcore.demo as demo

    # threads=0: every stage whose own config sets none runs on every core, even after a stage that set fewer
    monkeypatch.setattr(demo, "available_cores", lambda: 2)
    torch.set_num_threads(1)
    cfg = small(["reward.threads=1"])
    assert cfg.reward.data.curriculum and cfg.grpo.reward.name == "spatialscore"  # demo defaults survive overrides
    assert cfg.grpo.max_minutes == 0  # fixed iteration counts: the result does not depend on the machine's speed
    assert run_demo(cfg, tmp_path) == 0
    assert yaml.safe_load((tmp_path / "reward" / "config.yaml").read_text())["threads"] == 1
    assert yaml.safe_load((tmp_path / "grpo" / "config.yaml").read_text())["threads"] == 2
    assert torch.get_num_threads() == 2  # the last stage (evaluation) ran on the demo's threads
    report = (tmp_path / "REPORT.md").read_text()
    assert "(2 threads; SpatialScore training 1, Spatial-RL 2, eager)" in report  # smoke.yaml: compile none
    for stage in ("tiny checkpoints", "synthetic pairs", "SpatialScore training", "SpatialScore evaluation",
                  "base generator evaluation", "Spatial-RL (DiffusionNFT + Top-k)", "RL policy evaluation"):
        assert f"| {stage} |" in report, stage
    assert "Objective: DiffusionNFT (`objective: nft`;" in report  # the demo's objective, named with what it does
    # the base generator was sampled and judged by the side lane while SpatialScore trained, then scored
    assert "| base generator evaluation |" in report and "sampled and judged beside SpatialScore's training" in report
    assert json.loads((tmp_path / "side_lane.json").read_text()) == {"eval": "done"}  # compile none: no warm-up
    assert "| SpatialScore (tiny) |" in report and "| shuffled-prompt control |" in report
    base = json.loads((tmp_path / "eval_base" / "eval.json").read_text())
    rl = json.loads((tmp_path / "eval_rl" / "eval.json").read_text())
    assert base["samples"] == rl["samples"] == 4 and rl["lora"] and not base["lora"]
    # the table carries the judge's numbers of both evaluations, and the gauge compares them
    assert (f"| objects found (both named objects) | {base['objects_found']:.3f} | {rl['objects_found']:.3f} |"
            in report)
    assert f"| {base['relation_accuracy']:.3f} | {rl['relation_accuracy']:.3f} |" in report
    assert "Reward-hacking gauge" in report and "PARTIAL" not in report
    for png in ("pair_stats.png", "reward/accuracy.png", "grpo/reward.png", "eval_base/grid.png", "eval_rl/grid.png"):
        assert (tmp_path / png).stat().st_size > 0, png
    # A second run reuses the checkpoints, the reward model, the policy and both evaluations.
    assert run_demo(small(["reward.threads=1"]), tmp_path) == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert report.count("reused") >= 5
    # a time limit that ends Spatial-RL early is said loudly
    partial = small(["reward.threads=1", "grpo.iterations=3", "grpo.max_minutes=1e-6"])
    assert run_demo(partial, tmp_path / "partial") == 0
    assert "**PARTIAL RESULT" in (tmp_path / "partial" / "REPORT.md").read_text()


def test_demo_refuses_a_missing_generator(tmp_path):
    with pytest.raises(ConfigError, match="generator"):
        run_demo(small([f"generator={tmp_path}"]), tmp_path / "x")


def test_the_report_claims_only_what_its_numbers_show():
    from spatialcore.demo import _what_it_shows

    base = {"relation_accuracy": 0.42, "objects_found": 0.94}
    assert "by the target margin" in _what_it_shows(base, {"relation_accuracy": 0.60, "objects_found": 0.92})
    assert "short of the +15-point target" in _what_it_shows(base, {"relation_accuracy": 0.47, "objects_found": 0.94})
    flat = _what_it_shows(base, {"relation_accuracy": 0.40, "objects_found": 0.97})
    assert "did not make the generator obey" in flat and "-2.0 points" in flat
    lost = _what_it_shows(base, {"relation_accuracy": 0.70, "objects_found": 0.80})  # layouts by losing objects
    assert "did not make the generator obey" in lost


def test_spatial_rl_compiles_its_blocks_and_runs_eagerly_where_nothing_compiles(monkeypatch, capfd):
    import spatialcore.demo as demo

    cfg = load_config(DemoConfig, None, [])
    assert cfg.grpo.sampler.compile == "regional" and cfg.grpo.sample_batch == 32  # the demo's own choices
    assert demo.compile_problem() is None  # this machine builds CPU kernels
    assert demo._sampler_compile(cfg.grpo) == "regional"
    monkeypatch.setattr(demo, "compile_problem", lambda: "CalledProcessError: no C++ compiler")
    assert demo._sampler_compile(cfg.grpo) == "none" == cfg.grpo.sampler.compile
    assert "torch.compile cannot build kernels here (CalledProcessError: no C++ compiler): Spatial-RL runs eagerly" \
        in capfd.readouterr().err


def test_the_side_lane_judges_the_base_and_warms_spatial_rl_up_in_a_child_process(tmp_path):
    """The child evaluates the base generator without SpatialScore and runs Spatial-RL's one-iteration warm-up
    (rewarded by the oracle: no SpatialScore exists yet), leaving the evaluation and no warm-up folder."""
    import spatialcore.demo as demo
    from spatialcore.config import from_dict, to_dict
    from spatialcore.trainers.grpo import GRPOTrainConfig

    cfg = small()
    g = to_dict(cfg.grpo)
    g["reward"]["spatialscore"]["model"] = str(tmp_path / "reward" / "model")  # not there yet
    gcfg = from_dict(GRPOTrainConfig, {**g, "model": cfg.generator, "out": str(tmp_path / "grpo")}, "grpo")
    warm = demo._warmup_config(gcfg, tmp_path)
    assert warm["reward"]["name"] == "oracle" and warm["iterations"] == 1
    assert warm["threads"] == gcfg.threads  # compiled CPU kernels are built for a thread count
    assert warm["sampler"] == to_dict(gcfg)["sampler"]  # the same shapes and compile mode
    lane = demo._SideLane(cfg, gcfg, tmp_path, warmup=True)
    assert lane.wait() == {"eval": "done", "warmup": "done"}
    assert json.loads((tmp_path / "eval_base" / "eval.json").read_text())["samples"] == 4
    assert not (tmp_path / "grpo_warmup").exists()
