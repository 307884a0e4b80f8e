import json
import subprocess
import sys

import pytest

from spatialcore.cli import build_parser

COMMANDS = [["tiny"], ["demo"], ["info"], ["config"], ["config", "show"]]


@pytest.mark.parametrize("cmd", [[], *COMMANDS])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*cmd, "--help"])
    assert exit_.value.code == 0
    assert "usage: spatialcore" in capsys.readouterr().out


def test_info_json_runs_without_gpu():
    proc = subprocess.run([sys.executable, "-m", "spatialcore.cli", "info", "--json"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["attention"]["sdpa"] is True
    assert isinstance(report["gpus"], list)


def test_config_show_fills_defaults():
    proc = subprocess.run([sys.executable, "-m", "spatialcore.cli", "config", "show", "tiny", "seed=5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "seed: 5" in proc.stdout and "text_rope_theta: 100.0" in proc.stdout


def test_packaging_has_one_import_root(tmp_path):
    """Installed, only `spatialcore.*` exists: no generic top-level `kernels`/`trainers`/`profiling`."""
    code = (
        "import importlib, importlib.util\n"
        "for name in ('kernels', 'trainers', 'profiling'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
        "    importlib.import_module('spatialcore.' + name)\n"
        "print('ok')\n"
    )
    # A neutral working directory: the repo root itself is not on sys.path.
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_pinned_liger_patch_imports_with_pinned_transformers():
    # liger-kernel 0.8.5's Qwen2.5-VL patch breaks on transformers >= 5.23 (removed output class):
    # the pins in pyproject keep the pair importable.
    import transformers
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2_5_vl

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    assert (major, minor) < (5, 23)
    assert callable(apply_liger_kernel_to_qwen2_5_vl)
