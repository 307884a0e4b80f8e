"""Reward head + pair loss forward+backward: fused kernels vs eager gather+linear+loss, torch.compile."""

import pytest
import torch

from spatialcore.gpu import default_dtype
from spatialcore.kernels import pair_loss, reward_head


def _shape(device):
    return (48, 1024, 3584) if device == "cuda" else (8, 128, 256)


def _step(hidden, idx, w, b, backend):
    mu, lv = reward_head(hidden, idx, w, b, backend=backend)
    n = mu.shape[0] // 2
    loss = pair_loss(mu[:n], lv[:n], mu[n:], lv[n:], backend=backend)
    return torch.autograd.grad(loss, (hidden, w, b))


@pytest.fixture(scope="module")
def compiled():
    return torch.compile(lambda h, i, w, b: _step(h, i, w, b, "torch"))


@pytest.mark.parametrize("impl", ["eager_reference", "compiled_reference", "triton"])
def test_reward_head_pair_loss(measure, device, impl, compiled):
    B, T, H = _shape(device)
    dtype = default_dtype(device)
    hidden = torch.randn(B, T, H, device=device, dtype=dtype, requires_grad=True)
    idx = torch.randint(0, T, (B,), device=device)
    w = (torch.randn(2, H, device=device, dtype=dtype) * 0.02).requires_grad_(True)
    b = torch.zeros(2, device=device, dtype=dtype, requires_grad=True)
    if impl == "triton" and device != "cuda":
        pytest.skip("GPU kernel: timed on CUDA only")
    fns = {
        "eager_reference": lambda: _step(hidden, idx, w, b, "torch"),
        "compiled_reference": lambda: compiled(hidden, idx, w, b),
        "triton": lambda: _step(hidden, idx, w, b, "triton"),
    }
    measure(f"head+pair fwd+bwd {(B, T, H)}", impl, fns[impl], baseline=impl == "eager_reference")
