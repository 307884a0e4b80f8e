"""Group advantages + Top-k: fused kernels vs eager reference, torch.compile, TRL- and verl-style."""

import pytest
import torch

from spatialcore.kernels import ADVANTAGE_PRESETS, group_advantages, native
from spatialcore.profiling.baselines import trl_style, verl_style

G = 24
K = 6
PRESET = ADVANTAGE_PRESETS["spatial_rl"]


def _groups(device):
    return [48, 65536] if device == "cuda" else [48, 4096]


@pytest.fixture(scope="module")
def compiled_reference():
    return torch.compile(lambda r: group_advantages(r, top_k=K, backend="torch", **PRESET).advantages)


@pytest.mark.parametrize("impl", ["trl_style", "verl_style", "eager_reference", "compiled_reference", "triton", "cuda"])
@pytest.mark.parametrize("groups_idx", [0, 1])
def test_advantages(measure, device, impl, groups_idx, compiled_reference):
    P = _groups(device)[groups_idx]
    r = torch.randn(P, G, device=device)
    index = torch.arange(P, device=device).repeat_interleave(G)
    if impl in ("triton", "cuda") and device != "cuda":
        pytest.skip("GPU kernel: timed on CUDA only (CPU runs it through the interpreter)")
    if impl == "cuda" and not native.available():
        pytest.skip("native extension not built (make cuda)")
    fns = {
        "trl_style": lambda: trl_style(r, G, top_k=K),
        "verl_style": lambda: verl_style(r, index, top_k=K),
        "eager_reference": lambda: group_advantages(r, top_k=K, backend="torch", **PRESET),
        "compiled_reference": lambda: compiled_reference(r),
        "triton": lambda: group_advantages(r, top_k=K, backend="triton", **PRESET),
        "cuda": lambda: group_advantages(r, top_k=K, backend="cuda", **PRESET),
    }
    measure(f"advantages G={G} P={P}", impl, fns[impl], baseline=impl == "trl_style",
            note="host syncs" if impl == "verl_style" else "")
