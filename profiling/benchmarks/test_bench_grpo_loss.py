"""Flow-GRPO clipped loss forward+backward: fused single-launch kernel vs eager and torch.compile."""

import pytest
import torch

from spatialcore.kernels import flow_grpo_loss


def _step(new, old, adv, keep, backend):
    out = flow_grpo_loss(new, old, adv, keep, 1e-4, backend=backend)
    return torch.autograd.grad(out.loss, new)


@pytest.fixture(scope="module")
def compiled():
    return torch.compile(lambda n, o, a, k: _step(n, o, a, k, "torch"))


@pytest.mark.parametrize("impl", ["eager_reference", "compiled_reference", "triton"])
def test_grpo_loss(measure, device, impl, compiled):
    B, T = 48, 8
    new = torch.randn(B, T, device=device, requires_grad=True)
    old = new.detach() + 1e-4 * torch.randn(B, T, device=device)
    adv = torch.randn(B, device=device)
    keep = torch.rand(B, device=device) < 0.5
    if impl == "triton" and device != "cuda":
        pytest.skip("GPU kernel: timed on CUDA only")
    fns = {
        "eager_reference": lambda: _step(new, old, adv, keep, "torch"),
        "compiled_reference": lambda: compiled(new, old, adv, keep),
        "triton": lambda: _step(new, old, adv, keep, "triton"),
    }
    measure(f"grpo loss fwd+bwd B={B} T={T}", impl, fns[impl], baseline=impl == "eager_reference")
