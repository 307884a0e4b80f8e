"""The shared kernel plumbing: backend names, launch settings (compared with Triton's own helper)."""

import pytest
import torch

from spatialcore.kernels import flow_grpo_loss, group_advantages, reward_head, sde_step_logprob
from spatialcore.kernels.launch import (
    AUTO_ON_CUDA,
    HAS_TRITON,
    launch_settings,
    next_power_of_2,
    resolve_backend,
)


def test_backend_names():
    t = torch.zeros(2)
    for family in AUTO_ON_CUDA:
        assert resolve_backend("auto", t, family=family) == "torch"  # CPU tensors always take the reference
    assert resolve_backend("torch", t, family="sde_step") == "torch"
    assert resolve_backend("compiled", t, family="sde_step") == "compiled"
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton', 'torch' or 'compiled', got 'cuda'"):
        resolve_backend("cuda", t, family="advantages")
    assert resolve_backend("cuda", t, family="advantages", extra=("cuda",)) == "cuda"
    # every public op goes through it
    with pytest.raises(ValueError, match="backend must be"):
        group_advantages(torch.zeros(2, 4), backend="fast")
    with pytest.raises(ValueError, match="backend must be"):
        sde_step_logprob(torch.zeros(2, 3), torch.zeros(2, 3), 0.5, 0.4, 0.7, backend="fast")
    with pytest.raises(ValueError, match="backend must be"):
        flow_grpo_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2), torch.ones(2, dtype=torch.bool), 0.2,
                       backend="fast")
    with pytest.raises(ValueError, match="backend must be"):
        reward_head(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, 4), torch.zeros(2),
                    backend="fast")


def test_launch_settings():
    import triton

    assert HAS_TRITON
    for n in [1, 2, 3, 5, 64, 65, 1000, 1024, 1025, 4096, 5000, 65536]:
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        block, warps = launch_settings(n, max_block=4096, min_block=16, wide=1024)
        assert block == min(4096, max(16, triton.next_power_of_2(n))) and warps == (4 if block >= 1024 else 1)
    assert launch_settings(3, min_block=2, wide=128) == (4, 1)
    assert launch_settings(200, min_block=2, wide=128) == (256, 4)


def test_auto_on_cuda_is_the_faster_measured_path():
    """On CUDA tensors "auto" runs, per family, the path docs/PERF.md measured faster in the same run (H200,
    2026-12-04): the compiled reference for the SDE step (29.2 vs 64.0 us) and the GRPO loss (4.57 vs 9.03 us), the
    Triton kernels for the advantages and the reward head (faster than compiled there). A fake CUDA tensor stands
    in: this machine has no GPU."""

    class FakeCuda(torch.Tensor):
        is_cuda = True

    t = torch.zeros(2).as_subclass(FakeCuda)
    chosen = {family: resolve_backend("auto", t, family=family) for family in AUTO_ON_CUDA}
    assert chosen == {"advantages": "triton", "sde_step": "compiled", "grpo_loss": "compiled", "reward_head": "triton"}


def test_the_compiled_backend_is_the_reference():
    """backend="compiled" (torch.compile of the reference, what "auto" runs on CUDA for the SDE step and the GRPO
    loss) gives the reference's numbers, gradients included, on awkward shapes."""
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(3, 5, 7, generator=g) for _ in range(3))
    outs = {b: sde_step_logprob(x, v.clone().requires_grad_(True), 0.8, 0.6, 0.7, noise=noise, backend=b)
            for b in ("torch", "compiled")}
    for a, b in zip(outs["torch"], outs["compiled"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    new = torch.randn(5, 3, generator=g, requires_grad=True)
    old, adv = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    keep = torch.tensor([True, False, True, True, False])
    res = {b: flow_grpo_loss(new, old, adv, keep, 0.2, backend=b) for b in ("torch", "compiled")}
    grads = {b: torch.autograd.grad(r.loss, new)[0] for b, r in res.items()}
    torch.testing.assert_close(res["compiled"].loss, res["torch"].loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads["compiled"], grads["torch"], rtol=1e-6, atol=1e-7)
