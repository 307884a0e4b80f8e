"""profiling/gpu_check.sh rehearsed the way the GPU machine runs it, so that the script cannot rot
between device runs: from a copy of the checkout (the project not installed there: the script's own
shim must be what imports `spatialcore`, which it checks), its cheapest steps on the CPU with tiny
shapes, writing the files and tables the GPU run writes."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checkout_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


def _run(repo: Path, tmp: Path, **env) -> subprocess.CompletedProcess:
    venv_bin = str(Path(sys.executable).parent)  # pytest's python, and the cmake/ninja beside it
    full = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "PYTHON": sys.executable, "REHEARSAL": "1",
            "OUT": str(tmp / "out"), "RES": str(tmp / "res"), "SHIM": str(tmp / "shim"), **env}
    for name in ("PYTHONPATH", "PYTHONSAFEPATH"):  # as on the device: only what the script sets
        full.pop(name, None)
    return subprocess.run(["bash", "profiling/gpu_check.sh"], cwd=repo, env=full, capture_output=True, text=True,
                          timeout=1200)


def test_rehearsal_of_the_cheapest_steps(tmp_path):
    repo = _checkout_copy(tmp_path / "repo")
    # SCALE stretches the caps: a loaded CI machine imports torch slowly, and what this checks is that
    # the steps work the device's way, not how fast (the device run's caps are checked below)
    proc = _run(repo, tmp_path, STEPS="env wheels shim logprob train_reward", SCALE="12", BUDGET="200",
                SPATIALCORE_CACHE=str(tmp_path / "cache"))
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    assert f"spatialcore.kernels from {tmp_path / 'shim'}" in out, out[-3000:]
    assert "logprob exit 0" in out, out[-3000:]
    # a reference config as launched (random weights of its shapes; tiny here), stopped after its first step and resumed
    assert "train_reward first start exit 0" in out and "train_reward resume exit 0" in out, out[-3000:]
    assert "[reward] resumed from step 1 " in out and "| starts (a resume adds one) | 2 |" in out, out[-3000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "recompute stored log-probs" in summary and "micro-batch 1" in summary
    with tarfile.open(tmp_path / "out" / "gpu_check.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"logprob.json", "logprob.md", "logprob.log", "summary.md", "train_reward.md", "train_reward.log"} <= names
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.tgz", "summary.md"]


def test_step_caps_must_fit_the_budget(tmp_path):
    proc = _run(ROOT, tmp_path, BUDGET="100", STEPS="env kernel_bench")
    assert proc.returncode == 2 and "add up to 120s, over BUDGET=100s" in proc.stdout, proc.stdout
    proc = _run(ROOT, tmp_path, BUDGET="100", STEPS="env kernel_bench", CAPS="kernel_bench=80", PLAN_ONLY="1")
    assert proc.returncode == 0 and "caps 360s of a 400s budget, x4" in proc.stdout, proc.stdout
    assert "  env: cap 40s\n  kernel_bench: cap 320s\n" in proc.stdout, proc.stdout
    proc = _run(ROOT, tmp_path, STEPS="env", CAPS="kernel_test=80")
    assert proc.returncode == 2 and "unknown step 'kernel_test'" in proc.stdout, proc.stdout
