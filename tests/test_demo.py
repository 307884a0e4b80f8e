from spatialcore.config import load_config
from spatialcore.demo import DemoConfig, run_demo


def test_demo_runs_and_reports(tmp_path):
    cfg = load_config(DemoConfig, None, ["group_size=3", "steps=2", "pairs=20", "prompts=[a red star above a blue ring]"])
    assert run_demo(cfg, tmp_path) == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert "tiny checkpoints" in report and "Flux sampling" in report and "synthetic pairs" in report
    assert "Top-k kept 2/3" in report
    assert (tmp_path / "samples.png").stat().st_size > 0
    # A second run reuses the checkpoints it built.
    assert run_demo(cfg, tmp_path) == 0
    assert "reused" in (tmp_path / "REPORT.md").read_text()
