"""The end-to-end demo on a reduced budget: every stage runs, the report has its tables, and a
second run reuses what the first one built."""

from spatialcore.config import load_config
from spatialcore.demo import DemoConfig, run_demo

SMALL = ["pairs=24", "threads=2", "reward.max_steps=6", "reward.warmup_steps=1", "reward.eval_every=3",
         "reward.eval_pairs=8", "reward.save_every=6", "reward.log_every=3", "grpo.iterations=2",
         "grpo.eval_every=2", "grpo.group_size=4", "grpo.top_k=1", "grpo.sampler.steps=3",
         "grpo.sampler.image_size=32", "grpo.train_timesteps=2", "grpo.n_stream_prompts=4", "grpo.eval_seeds=2", "grpo.save_every=2"]


def test_demo_runs_every_stage_and_reports(tmp_path):
    cfg = load_config(DemoConfig, None, SMALL)
    assert cfg.reward.curriculum and cfg.grpo.reward.name == "spatialscore"  # demo defaults survive overrides
    assert run_demo(cfg, tmp_path) == 0
    report = (tmp_path / "REPORT.md").read_text()
    for stage in ("tiny checkpoints", "synthetic pairs", "SpatialScore training", "SpatialScore evaluation",
                  "Spatial-RL (GRPO + Top-k)"):
        assert f"| {stage} |" in report, stage
    assert "| SpatialScore (tiny) |" in report and "| shuffled-prompt control |" in report
    assert "| SpatialScore mu (the reward) |" in report and "pixel oracle, hard" in report
    for png in ("pair_stats.png", "reward/accuracy.png", "grpo/reward.png", "grpo/samples_before.png",
                "grpo/samples_after.png"):
        assert (tmp_path / png).stat().st_size > 0, png
    # A second run reuses the checkpoints, the reward model and the policy it built.
    assert run_demo(load_config(DemoConfig, None, SMALL), tmp_path) == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert report.count("reused") >= 2
