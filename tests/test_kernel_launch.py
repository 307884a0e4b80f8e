"""The shared kernel plumbing: backend names, launch settings (compared with Triton's own helper)."""

import pytest
import torch
from spatialcore.kernels import flow_grpo_loss, group_advantages, reward_head, sde_step_logprob
from spatialcore.kernels.launch import HAS_TRITON, launch_settings, next_power_of_2, resolve_backend


def test_backend_names():
    t = torch.zeros(2)
    assert resolve_backend("auto", t) == "torch"  # CPU tensors always take the reference
    assert resolve_backend("torch", t) == "torch"
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'torch', got 'cuda'"):
        resolve_backend("cuda", t)
    assert resolve_backend("cuda", t, extra=("cuda",)) == "cuda"
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
