"""Every kernel on a CUDA device against its reference (large, awkward shapes).

These run where a GPU exists (profiling/gpu_check.sh); without one they are skipped with
that reason. The same comparisons run on CPU through the Triton interpreter in the other
test files.
"""

import pytest
import torch

from spatialcore.kernels import (
    flow_grpo_loss,
    group_advantages,
    native,
    pair_loss,
    reward_head,
    sde_step_logprob,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run profiling/gpu_check.sh)"),
]


@pytest.mark.parametrize("G", [1, 2, 3, 7, 24, 100, 256, 1000])
@pytest.mark.parametrize("P", [1, 48, 4099])
def test_group_advantages_cuda(G, P):
    r = torch.randn(P, G, device="cuda")
    r[0, 0] = float("nan")
    r = torch.round(r * 4) / 4
    backends = ["triton"] + (["cuda"] if native.available() else [])
    for top_k in (None, 1, max(1, G // 4), G):
        for stats_over in ("kept", "group"):
            ref = group_advantages(r, top_k=top_k, stats_over=stats_over, backend="torch", drop_zero_std=True)
            for backend in backends:
                out = group_advantages(r, top_k=top_k, stats_over=stats_over, backend=backend, drop_zero_std=True)
                torch.testing.assert_close(out.advantages, ref.advantages, rtol=1e-5, atol=1e-5)
                assert torch.equal(out.keep, ref.keep)
                torch.testing.assert_close(out.std, ref.std, rtol=1e-5, atol=1e-6)
    out = group_advantages(r, std="batch", top_k=1, backend="triton")
    ref = group_advantages(r, std="batch", top_k=1, backend="torch")
    torch.testing.assert_close(out.advantages, ref.advantages, rtol=1e-5, atol=1e-5)


def test_group_advantages_cuda_graph_capture():
    r = torch.randn(48, 24, device="cuda")
    group_advantages(r, top_k=6, backend="triton")  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = group_advantages(r, top_k=6, backend="triton")
    r.copy_(torch.randn(48, 24, device="cuda"))
    g.replay()
    ref = group_advantages(r, top_k=6, backend="torch")
    torch.testing.assert_close(out.advantages, ref.advantages, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sde_step_cuda(dtype):
    x, v, noise = (torch.randn(6, 1000, 17, device="cuda", dtype=dtype) for _ in range(3))
    sig = torch.linspace(1.0, 0.3, 6, device="cuda")
    a = sde_step_logprob(x, v, sig, sig - 0.05, 0.7, noise, backend="triton")
    b = sde_step_logprob(x, v, sig, sig - 0.05, 0.7, prev_sample=a[0], backend="torch")
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-5)


def test_losses_and_head_cuda():
    B, T, H = 5, 33, 3584
    hidden = torch.randn(B, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    idx = torch.randint(0, T, (B,), device="cuda")
    w = torch.randn(2, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(2, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    outs = {}
    for backend in ("torch", "triton"):
        mu, lv = reward_head(hidden, idx, w, b, backend=backend)
        loss = pair_loss(mu[:2], lv[:2], mu[2:4], lv[2:4], backend=backend)
        gh, gw = torch.autograd.grad(loss, (hidden, w))
        outs[backend] = (mu, lv, loss, gh.float(), gw.float())
    for x, y in zip(outs["triton"], outs["torch"], strict=True):
        torch.testing.assert_close(x, y, rtol=2e-2, atol=2e-2)
    new = torch.randn(24, 4, device="cuda", requires_grad=True)
    old = new.detach() + 1e-3 * torch.randn(24, 4, device="cuda")
    adv, keep = torch.randn(24, device="cuda"), torch.rand(24, device="cuda") < 0.5
    lt = flow_grpo_loss(new, old, adv, keep, 1e-3, backend="triton")
    lr = flow_grpo_loss(new, old, adv, keep, 1e-3, backend="torch")
    torch.testing.assert_close(lt.loss, lr.loss, rtol=1e-5, atol=1e-6)


def test_failed_graph_capture_leaves_the_generator_usable():
    """A candidate that syncs with the host cannot be captured: the benchmark times it without a graph, and
    random numbers on the device still work afterwards (a failed capture left the default generator in
    capture mode before: 'Offset increment outside graph capture encountered unexpectedly')."""
    from spatialcore.profiling.timing import capture_graph

    x = torch.randn(16, device="cuda")
    assert capture_graph(lambda: float(x.sum()), 3) is None
    assert torch.randn(4, device="cuda").isfinite().all()
    assert capture_graph(lambda: x.mul(2), 3) is not None
