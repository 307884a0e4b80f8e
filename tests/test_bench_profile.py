"""`spatialcore bench` / `spatialcore profile` on the tiny models: the same file formats the GPU
runs write (JSON with environment + rows + same-run ratios, Markdown table, trace, phases)."""

import json

import pytest

from spatialcore.cli import main
from spatialcore.profiling.bench import peak_tflops


def _run(*args):
    assert main(list(args)) == 0


@pytest.mark.parametrize("suite", ["score", "sample", "grpo", "logprob"])
def test_bench_suite_writes_json_and_markdown(suite, tiny_dir, tmp_path):
    _run("bench", suite, "--tiny", str(tiny_dir), "--out", str(tmp_path), "--reps", "2", "--warmup", "1")
    data = json.loads((tmp_path / f"{suite}.json").read_text())
    env = data["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["triton"] and "commit" in env
    rows = data["rows"]
    assert rows and all(r["status"] == "ok" or r["status"].startswith(("ok: ", "skipped: ")) for r in rows)
    measured = [r for r in rows if r["status"].startswith("ok")]
    assert all(r["median_s"] > 0 and r["p10_s"] <= r["median_s"] <= r["p90_s"] for r in measured)
    md = (tmp_path / f"{suite}.md").read_text()
    assert md.count("\n|") >= len(rows) + 1
    if suite == "score":
        base = next(r for r in rows if r["baseline"])
        ours = next(r for r in rows if r["name"].startswith("spatialcore (no LM head"))
        assert ours["speedup_vs_baseline"] == pytest.approx(base["median_s"] / ours["median_s"])
        assert data["info"]["logits_shape"][-1] == 512  # the stock path computes vocabulary logits
        fp8 = next(r for r in rows if "float8" in r["name"])
        assert fp8["status"].startswith("skipped: ") and "8.9" in fp8["status"]
    if suite == "sample":  # stock diffusers on the same weights and inputs: the same images (float32 rounding)
        stock = next(r for r in rows if r["name"] == "stock")
        assert stock["max_abs_image_diff_vs_eager"] <= 5e-6 and stock["speedup_vs_baseline"] > 0
        assert [r["name"] for r in rows] == ["eager", "stock", "rl-eager"]
    if suite == "logprob":  # fp32 on CPU: the sampler's number, bit for bit in its own layout (6 rows);
        # a few ulp at other row counts where the CPU's GEMM depends on them (an AMD EPYC's: 1 ulp)
        assert [r["name"] for r in rows] == ["micro-batch 1", "micro-batch 3", "micro-batch 6"]
        assert rows[-1]["bitwise"] and rows[-1]["max_abs_logp_diff"] == 0.0
        assert all(r["max_abs_logp_diff"] <= 5e-7 and r["bitwise"] == (r["max_abs_logp_diff"] == 0.0) for r in rows)
    if suite == "grpo":  # the trainer's own step on the reference config at tiny shapes, rank 0 of 4
        info = data["info"]
        assert info["config"].endswith("configs/grpo/flux_dev_spatial.yaml") and info["ranks"] == 4
        assert info["samples_per_rank"] == 4 and info["kl_beta"] > 0 and info["gradient_checkpointing"]
        kept = sorted(info["kept_on_rank"])  # 2 timed steps: the median is the mean of the two
        assert info["train_flops"] == info["flops_per_row_timestep"] * 2 * (kept[0] + kept[1]) / 2
        assert info["train_tflops"] > 0 and info["mfu"] is None  # no peak on CPU
        assert [r["name"] for r in rows] == ["sample", "score", "train", "step"]


def test_grpo_flop_count_of_one_micro_step_scales_to_the_whole_update(tmp_path, monkeypatch):
    """The bench counts one micro-step (micro_batch rows, one timestep) and scales it: the scaled number equals
    FlopCounterMode around the whole update of the same trajectory (every kept row of the rank, every trained
    timestep), counted here independently."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from spatialcore.config import load_config
    from spatialcore.profiling.bench import _micro_step_flops, one_rank_of
    from spatialcore.profiling.suites import SUITE_DEFAULTS
    from spatialcore.trainers.grpo import GRPOTrainConfig

    tiny = SUITE_DEFAULTS["grpo"][0]
    cfg = load_config(GRPOTrainConfig, "configs/grpo/flux_dev_spatial.yaml",
                      [*tiny["config_set"], f"out={tmp_path / 'run'}", "report_to=[]", "sampler.image_size=16"])
    tr = one_rank_of(2)(cfg)  # 8 samples on this rank, micro-batches of 2
    tr.train_step()
    traj, steps, n = tr.last_traj, tr.trained_steps, len(tr.mine)
    with FlopCounterMode(display=False) as whole:
        tr.objective.accumulate(traj, torch.linspace(-1, 1, n), torch.ones(n, dtype=torch.bool), n, 1, 0, steps)
    tr.opt.zero_grad(set_to_none=True)
    per_row_step = _micro_step_flops(tr, False, torch.device("cpu"))
    assert n == 8 and len(steps) == 2 and tr.cfg.micro_batch == 2
    assert per_row_step * n * len(steps) == whole.get_total_flops() > 0
    assert tr.last_traj is None and all(p.grad is None for p in tr.params.values())  # nothing of the count stays


def test_profile_grpo_writes_trace_phases_and_nvml_note(tiny_dir, tmp_path):
    _run("profile", "grpo", "--tiny", str(tiny_dir), "--out", str(tmp_path / "p"), "--reps", "1", "--warmup", "0",
         "group_size=4", "top_k=1")
    trace = json.loads((tmp_path / "p" / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    for phase in ("sample", "decode", "score", "advantages", "backward", "optimizer"):
        assert phase in names, phase
    md = (tmp_path / "p" / "profile.md").read_text()
    assert "| backward |" in md and "aten::" in md
    nvml = json.loads((tmp_path / "p" / "nvml.json").read_text())
    assert nvml["samples"] == [] and nvml["error"].startswith("NVML unavailable")


def test_bench_rejects_full_shapes_without_gpu_and_unknown_parameters(tiny_dir, tmp_path, capsys):
    assert main(["bench", "score", "--shape", "full", "--tiny", str(tiny_dir), "--device", "cpu"]) == 2
    assert "shape" in capsys.readouterr().err
    assert main(["bench", "score", "--tiny", str(tiny_dir), "batchsize=3"]) == 2
    assert "batchsize" in capsys.readouterr().err


def test_peak_table_names():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB") is None
