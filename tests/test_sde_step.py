"""sde_step_logprob: Triton (interpreter) vs reference vs the Flow-GRPO formulas written out.

The "sde" and CPS formulas below are written from Flow-GRPO's
``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`` (``sde_step_with_logprob``, sde_type "sde" and
"cps"); the Gaussian CPS log-prob from the transition density N(mean, std^2) itself."""

import math

import pytest
import torch
from kernel_device import DEVICE, on_device

from spatialcore.kernels import ode_step, sde_step_logprob, sde_step_reference

sde_step_logprob = on_device(sde_step_logprob)

SHAPES = [(1, 7), (3, 5, 4), (2, 3, 1, 5), (4, 1)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def flow_grpo_formula(x, v, t, tn, a, noise, sigma_max):
    """The Flow-GRPO sde_step_with_logprob math, per sample, in float64."""
    x, v, noise = x.double(), v.double(), noise.double()
    dt = tn - t
    std_dev_t = math.sqrt(t / (1 - (sigma_max if t == 1 else t))) * a
    mean = x * (1 + std_dev_t**2 / (2 * t) * dt) + v * (1 + std_dev_t**2 * (1 - t) / (2 * t)) * dt
    std = std_dev_t * math.sqrt(-dt)
    prev = mean + std * noise
    lp = -((prev - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
    return prev, lp.mean(), mean


def flow_grpo_cps_formula(x, v, t, tn, a, noise):
    """Flow-GRPO's CPS step: x0/x1 predictions, std = sigma_prev sin(a pi / 2), and the log-prob with
    "all constants removed": -(x' - mean)^2 averaged (no variance scaling)."""
    x, v, noise = x.double(), v.double(), noise.double()
    std = tn * math.sin(a * math.pi / 2)
    x0 = x - t * v
    x1 = x + v * (1 - t)
    mean = x0 * (1 - tn) + x1 * math.sqrt(tn**2 - std**2)
    prev = mean + std * noise
    return prev, (-((prev - mean) ** 2)).mean(), mean


def gaussian_logprob(prev, mean, std):
    """log N(prev; mean, std^2) per element, averaged: the exact transition density."""
    var = std**2
    return (-(prev - mean) ** 2 / (2 * var) - 0.5 * math.log(2 * math.pi * var)).mean()


@pytest.mark.parametrize("cps,logprob", [(False, "gaussian"), (True, "mse"), (True, "gaussian")])
@pytest.mark.parametrize("t,tn", [(0.8, 0.6), (1.0, 0.9), (0.3, 0.0)])
def test_reference_matches_written_formula(cps, logprob, t, tn):
    if cps and tn == 0:
        with pytest.raises(ValueError, match="CPS"):
            sde_step_logprob(torch.zeros(1, 2), torch.zeros(1, 2), t, tn, 0.7, cps=True)
        return
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    prev, lp, mean, std = sde_step_reference(x, v, t, tn, 0.7, noise, cps=cps, logprob=logprob)
    for b in range(2):
        if cps:
            p_ref, lp_ref, m_ref = flow_grpo_cps_formula(x[b], v[b], t, tn, 0.7, noise[b])
            if logprob == "gaussian":
                lp_ref = gaussian_logprob(p_ref, m_ref, tn * math.sin(0.7 * math.pi / 2))
        else:
            p_ref, lp_ref, m_ref = flow_grpo_formula(x[b], v[b], t, tn, 0.7, noise[b], sigma_max=tn)
        torch.testing.assert_close(prev[b], p_ref)
        torch.testing.assert_close(mean[b], m_ref)
        torch.testing.assert_close(lp[b], lp_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cps", [False, True])
def test_triton_matches_reference(dtype, shape, cps):
    _triton_vs_reference(dtype, shape, cps, "gaussian")


@pytest.mark.parametrize("shape", [(2, 4096 * 2 + 5), (1, 3, 4096 + 1)])
def test_triton_multi_block_reduction(shape):
    """D > 4096: several programs per sample, partial sums reduced outside the kernel (every real
    Flux latent takes this path)."""
    _triton_vs_reference(torch.float32, shape, False, "gaussian")
    _triton_vs_reference(torch.float32, shape, True, "mse")


@pytest.mark.parametrize("shape", [(3, 5, 4), (4, 1)])
def test_triton_matches_reference_mse_logprob(shape):
    _triton_vs_reference(torch.float32, shape, True, "mse")


@pytest.mark.parametrize("cps,logprob", [(False, "gaussian"), (True, "mse")])
def test_triton_matches_reference_with_sigmas_shared_by_the_batch(cps, logprob):
    """Python-float sigmas go to the kernels as floats (no per-sample tensors): several samples, several blocks."""
    _triton_vs_reference(torch.float32, (3, 4096 + 7), cps, logprob, shared=True)


@pytest.mark.parametrize("shared", [False, True])
def test_triton_first_step_uses_sigma_max(shared):
    """At sigma = 1 the SDE's denominator is 1 - sigma_max: per-sample tensors and shared floats alike."""
    g = torch.Generator().manual_seed(5)
    x, v, noise = (torch.randn(3, 64, generator=g) for _ in range(3))
    sig = (1.0, 0.75, 0.95) if shared else (torch.ones(3), torch.full((3,), 0.75), torch.full((3,), 0.95))
    outs = [sde_step_logprob(x, v, sig[0], sig[1], 0.7, noise, sigma_max=sig[2], backend=b) for b in ("triton", "torch")]
    for a, b in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    default = sde_step_logprob(x, v, sig[0], sig[1], 0.7, noise, backend="torch")  # sigma_max = sigma_next
    assert not torch.allclose(default[3], outs[1][3])


def _triton_vs_reference(dtype, shape, cps, logprob, shared=False):
    g = torch.Generator().manual_seed(sum(shape))
    x, v, noise = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    B = shape[0]
    sigma = torch.linspace(1.0, 0.5, B) if B > 1 and not shared else 0.9
    sigma_next = (sigma - 0.1) if torch.is_tensor(sigma) else 0.75
    out_t = sde_step_logprob(x, v, sigma, sigma_next, 0.7, noise, cps=cps, logprob=logprob, backend="triton")
    out_r = sde_step_logprob(x, v, sigma, sigma_next, 0.7, noise, cps=cps, logprob=logprob, backend="torch")
    tol = TOL[dtype]
    torch.testing.assert_close(out_t[0].float(), out_r[0].float(), rtol=tol, atol=tol)
    assert out_t[0].dtype == dtype and out_t[2].dtype == torch.float32 and out_t[1].shape == (B,)
    torch.testing.assert_close(out_t[2], out_r[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_t[3], out_r[3], rtol=1e-6, atol=0)
    # The log-prob follows the stored (rounded) sample: at the same sample, fp32 closeness for
    # every input dtype (a 1-ulp bf16 difference in the sample itself moves it by ~ulp/std^2).
    at_same = sde_step_logprob(x, v, sigma, sigma_next, 0.7, prev_sample=out_t[0], cps=cps, logprob=logprob,
                               backend="torch")
    torch.testing.assert_close(out_t[1], at_same[1], rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(out_t[1], out_r[1], rtol=1e-5, atol=1e-5)
    # Given prev_sample: same log-prob, the input returned as is.
    again = sde_step_logprob(x, v, sigma, sigma_next, 0.7, prev_sample=out_t[0], cps=cps, logprob=logprob,
                             backend="triton")
    assert again[0] is out_t[0] or DEVICE.type == "cuda"  # (moved back from the GPU: a copy)
    torch.testing.assert_close(again[1], out_t[1], rtol=1e-5, atol=1e-5)


def test_gradcheck_reference_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    noise = torch.randn(2, 3, 2, dtype=torch.float64, generator=g)
    prev = torch.randn(2, 3, 2, dtype=torch.float64, generator=g)
    for cps in (False, True):
        # Sampling: the sample and the mean. (The log-prob treats the sample as a constant, as
        # Flow-GRPO does, so finite differences through the sample do not apply to it.)
        assert torch.autograd.gradcheck(
            lambda x, v, cps=cps: sde_step_reference(x, v, 0.8, 0.6, 0.7, noise, cps=cps)[0:3:2], (x, v))
        assert torch.autograd.gradcheck(
            lambda x, v, cps=cps: sde_step_reference(x, v, 0.8, 0.6, 0.7, prev_sample=prev, cps=cps)[1], (x, v))
    assert torch.autograd.gradcheck(
        lambda x, v: sde_step_reference(x, v, 0.8, 0.6, 0.7, prev_sample=prev, cps=True, logprob="mse")[1], (x, v))


@pytest.mark.parametrize("given_prev", [False, True])
@pytest.mark.parametrize("cps,logprob", [(False, "gaussian"), (True, "gaussian"), (True, "mse")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared", [False, True])
def test_triton_gradients_match_reference(given_prev, cps, logprob, dtype, shared):
    g = torch.Generator().manual_seed(2)
    shape = (3, 5, 7)
    x0, v0, noise, prev = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    w_lp, w_mean, w_prev = torch.randn(3, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    grads = {}
    for backend in ("torch", "triton"):
        x = x0.clone().requires_grad_(True)
        v = v0.clone().requires_grad_(True)
        sig = (0.9, 0.8) if shared else (torch.tensor([0.9, 0.7, 1.0]), torch.tensor([0.8, 0.5, 0.95]))
        p, lp, mean, _ = sde_step_logprob(x, v, *sig, 0.8,
                                          noise=None if given_prev else noise,
                                          prev_sample=prev if given_prev else None, cps=cps, logprob=logprob,
                                          backend=backend)
        loss = (w_lp * lp).sum() + (w_mean * mean).sum()
        if not given_prev:
            loss = loss + (w_prev * p.float()).sum()
        loss.backward()
        grads[backend] = (x.grad.float(), v.grad.float())
    tol = TOL[dtype]
    torch.testing.assert_close(grads["triton"][0], grads["torch"][0], rtol=tol, atol=tol)
    torch.testing.assert_close(grads["triton"][1], grads["torch"][1], rtol=tol, atol=tol)


def test_only_v_needs_grad():
    v = torch.randn(2, 8, requires_grad=True)
    x = torch.randn(2, 8)
    _, lp, _, _ = sde_step_logprob(x, v, 0.8, 0.7, 0.7, noise=torch.randn(2, 8), backend="triton")
    lp.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()


def test_in_kernel_noise_is_standard_normal_and_reproducible():
    x = torch.zeros(2, 4096)
    v = torch.zeros(2, 4096)
    a = sde_step_logprob(x, v, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(5), backend="triton")
    b = sde_step_logprob(x, v, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(5), backend="triton")
    torch.testing.assert_close(a[0], b[0])
    eps = (a[0] - a[2]) / a[3][:, None]
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05
    assert not torch.allclose(eps[0], eps[1])  # samples get different streams
    ref = sde_step_logprob(x, v, 0.8, 0.6, 0.7, prev_sample=a[0], backend="torch")
    torch.testing.assert_close(a[1], ref[1], rtol=1e-5, atol=1e-5)


def test_ode_step_and_errors():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(ode_step(x, v, 0.8, 0.6), x - 0.2 * v)
    torch.testing.assert_close(ode_step(x, v, torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.5])),
                               torch.stack([x[0] - 0.2 * v[0], x[1]]))
    with pytest.raises(ValueError, match="ode_step"):
        sde_step_logprob(x, v, 0.8, 0.6, 0.0)
    with pytest.raises(ValueError, match="sigma_next"):
        sde_step_logprob(x, v, 0.6, 0.8, 0.7)
    with pytest.raises(ValueError, match="same shape"):
        sde_step_logprob(x, v[:, :2], 0.8, 0.6, 0.7)
    with pytest.raises(ValueError, match=r"\[B\]"):
        sde_step_logprob(x, v, torch.ones(3) * 0.8, 0.6, 0.7)
    with pytest.raises(ValueError, match="logprob"):
        sde_step_logprob(x, v, 0.8, 0.6, 0.7, logprob="l2")


def test_tensors_on_another_device_are_named():
    from spatialcore.kernels import sde_step_logprob as unwrapped  # on_device would move the meta tensor

    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="prev_sample is on meta, x on cpu"):
        unwrapped(x, torch.randn(2, 8), 0.8, 0.6, 0.7, prev_sample=torch.empty(2, 8, device="meta"), backend="triton")


def test_on_device_moves_keyword_tensors_too(monkeypatch):
    """The GPU harness: a kernel test's keyword tensors (prev_sample=, noise=) reach the kernel's device."""
    import kernel_device

    monkeypatch.setattr(kernel_device, "DEVICE", torch.device("meta"))
    seen = {}

    def op(x, *, prev_sample=None, backend=None):
        seen.update(x=x.device.type, prev_sample=prev_sample.device.type)

    kernel_device.on_device(op)(torch.ones(2), prev_sample=torch.ones(2), backend="triton")
    assert seen == {"x": "meta", "prev_sample": "meta"}
