import os

# Must be set before any @triton.jit function is defined: the kernels run on the CPU through
# Triton's interpreter in these tests.
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
