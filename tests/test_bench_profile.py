"""`spatialcore bench` / `spatialcore profile` on the tiny models: the same file formats the GPU
runs write (JSON with environment + rows + same-run ratios, Markdown table, trace, phases)."""

import json

import pytest
from spatialcore.profiling.bench import peak_tflops

from spatialcore.cli import main


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
    if suite == "logprob":  # fp32 on CPU: the sampler's number, bit for bit in its own layout (6 rows);
        # a few ulp at other row counts where the CPU's GEMM depends on them (an AMD EPYC's: 1 ulp)
        assert [r["name"] for r in rows] == ["micro-batch 1", "micro-batch 3", "micro-batch 6"]
        assert rows[-1]["bitwise"] and rows[-1]["max_abs_logp_diff"] == 0.0
        assert all(r["max_abs_logp_diff"] <= 5e-7 and r["bitwise"] == (r["max_abs_logp_diff"] == 0.0) for r in rows)
    if suite == "grpo":
        info = data["info"]
        assert info["train_flops"] > 0 and info["train_tflops"] > 0 and info["mfu"] is None  # no peak on CPU
        names = [r["name"] for r in rows]
        assert names == ["sample", "score", "advantages", "train", "step"]


def test_profile_grpo_writes_trace_phases_and_nvml_note(tiny_dir, tmp_path):
    _run("profile", "grpo", "--tiny", str(tiny_dir), "--out", str(tmp_path / "p"))
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
