import os

# The Triton kernels run on the CPU through Triton's interpreter only where there is no GPU: on a CUDA
# machine `make test` tests the compiled kernels. Must be decided before any @triton.jit function is
# defined.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPATIALCORE_PROGRESS", "0")

import pytest  # noqa: E402

from spatialcore.logs import quiet_third_party  # noqa: E402

quiet_third_party()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Tiny Qwen2.5-VL + Flux checkpoints, built once per test session (seed 0)."""
    from spatialcore.tiny import TinyConfig, build_tiny

    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    build_tiny(TinyConfig(seed=0), out)
    return out


@pytest.fixture(scope="session")
def easy_pairs(tmp_path_factory):
    """80 synthetic pairs of the easy preset (20 % test split), written once per test session."""
    from spatialcore.config import from_dict
    from spatialcore.data.synth import DIFFICULTIES, SynthConfig, synth_pair_set

    out = tmp_path_factory.mktemp("pairs") / "easy"
    synth_pair_set(out, 80, 0, from_dict(SynthConfig, {**DIFFICULTIES["easy"], "test_fraction": 0.2}),
                   progress=False, workers=1)
    return out


def pytest_runtest_logreport(report):
    """With SPATIALCORE_FAILURE_LOG set (profiling/gpu_check.sh does), each failure's report is appended to
    that file the moment it happens: a run stopped at its time limit keeps what failed and why."""
    path = os.environ.get("SPATIALCORE_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
