"""flow_grpo_loss: Triton (interpreter) vs reference vs the clipped-surrogate formula written out."""

import pytest
import torch
from kernel_device import on_device

from spatialcore.kernels import flow_grpo_loss, flow_grpo_loss_reference

flow_grpo_loss = on_device(flow_grpo_loss)


def written(new, old, adv, keep, eps):
    """Per kept (b, t): max(-A r, -A clip(r)); mean over kept samples and timesteps (Python floats)."""
    import math

    terms, clipped = [], 0
    for b in range(len(adv)):
        if not keep[b]:
            continue
        for t in range(len(new[b])):
            r = math.exp(new[b][t] - old[b][t])
            terms.append(max(-adv[b] * r, -adv[b] * min(max(r, 1 - eps), 1 + eps)))
            clipped += abs(r - 1) > eps
    return (sum(terms) / len(terms), clipped / len(terms)) if terms else (0.0, 0.0)


def make(B, T, seed, spread=1e-3):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=g)
    new = old + spread * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    keep = torch.rand(B, generator=g) < 0.6
    keep[0] = True
    return new, old, adv, keep


@pytest.mark.parametrize("B,T", [(1, 1), (5, 1), (7, 3), (24, 4), (300, 2)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_written_formula(B, T, backend):
    new, old, adv, keep = make(B, T, seed=B * 10 + T)
    eps = 1e-3
    out = flow_grpo_loss(new.clone().requires_grad_(True), old, adv, keep, eps, backend=backend)
    loss, clip_frac = written(new.tolist(), old.tolist(), adv.tolist(), keep.tolist(), eps)
    torch.testing.assert_close(out.loss.detach(), torch.tensor(loss), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.clip_fraction, torch.tensor(clip_frac), rtol=1e-6, atol=1e-6)
    assert int(out.n_kept) == int(keep.sum())
    approx = (0.5 * (new - old) ** 2)[keep].mean()
    torch.testing.assert_close(out.approx_kl, approx, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("shape", [(9,), (6, 3)])
def test_gradients_match_and_only_kept_samples_get_gradient(shape):
    B = shape[0]
    new, old, adv, keep = make(B, shape[1] if len(shape) == 2 else 1, seed=3, spread=2e-3)
    new, old = new.reshape(shape), old.reshape(shape)
    grads = {}
    for backend in ("torch", "triton"):
        x = new.clone().requires_grad_(True)
        flow_grpo_loss(x, old, adv, keep, 1e-3, backend=backend).loss.backward()
        grads[backend] = x.grad
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-5, atol=1e-8)
    g = grads["triton"].reshape(B, -1)
    assert (g[~keep] == 0).all()
    assert (g[keep] != 0).any()


def test_ratio_one_on_policy_and_no_kept():
    old = torch.randn(4, 2)
    adv = torch.tensor([1.0, -2.0, 0.5, 0.0])
    keep = torch.ones(4, dtype=torch.bool)
    for backend in ("torch", "triton"):
        x = old.clone().requires_grad_(True)
        out = flow_grpo_loss(x, old, adv, keep, 1e-4, backend=backend)
        # On policy: ratio 1, loss = -mean(A), gradient -A / (n T), nothing clipped.
        torch.testing.assert_close(out.loss.detach(), -adv.mean())
        assert float(out.clip_fraction) == 0.0 and float(out.approx_kl) == 0.0
        out.loss.backward()
        torch.testing.assert_close(x.grad, (-adv / 8)[:, None].expand(4, 2))
        none = flow_grpo_loss(old.clone().requires_grad_(True), old, adv, torch.zeros(4, dtype=torch.bool), 1e-4,
                              backend=backend)
        assert float(none.loss.detach()) == 0.0


def test_kl_term():
    g = torch.Generator().manual_seed(4)
    new, old, adv, keep = make(6, 2, seed=5)
    mean_new = torch.randn(6, 2, 3, 4, generator=g)
    mean_ref = mean_new + 0.01 * torch.randn(6, 2, 3, 4, generator=g)
    std = torch.rand(6, 2, generator=g) + 0.5
    expected_kl = (((mean_new - mean_ref) ** 2).mean((2, 3)) / (2 * std**2))[keep].mean()
    # d/dmean_new of beta * sum_{kept b, t} mean_d (m - r)^2 / (2 s^2) / (n T), written out
    n, T, D = int(keep.sum()), 2, 12
    expected_grad = 0.1 * (mean_new - mean_ref) / (std**2)[..., None, None] / D / (n * T) * keep[:, None, None, None]
    for backend in ("torch", "triton"):
        m = mean_new.clone().requires_grad_(True)
        out = flow_grpo_loss(new, old, adv, keep, 1e-3, kl_mean_new=m, kl_mean_ref=mean_ref, kl_std=std,
                             kl_beta=0.1, backend=backend)
        torch.testing.assert_close(out.kl, expected_kl)
        torch.testing.assert_close(out.loss.detach(), out.policy_loss + 0.1 * expected_kl)
        out.loss.backward()
        torch.testing.assert_close(m.grad, expected_grad, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="kl_beta"):
        flow_grpo_loss(new, old, adv, keep, 1e-3, kl_beta=0.1)


@pytest.mark.parametrize("t,tn", [(0.9, 0.8), (1.0, 0.95), (0.4, 0.3)])
def test_kl_conventions_match_flow_grpo_and_the_gaussian_kl(t, tn):
    """flow_grpo: scripts/train_sd3.py computes kl = mean((mean - mean_ref)^2) / (2 std_dev_t^2) with the
    std_dev_t of flow_grpo/diffusers_patch/sd3_sde_with_logprob.py: sqrt(t / (1 - t)) * a for the SDE step
    (1 - sigma_max in the denominator at t = 1), sigma_prev * sin(a pi / 2) for CPS.
    exact: KL(N(m, s^2) || N(r, s^2)) = (m - r)^2 / (2 s^2) per element with s the step's std."""
    import math

    from spatialcore.kernels import kl_std, sde_step_reference

    a, sigma_max = 0.7, 0.95
    g = torch.Generator().manual_seed(7)
    x, v = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    m, r = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    keep = torch.ones(3, dtype=torch.bool)
    zeros = torch.zeros(3)
    for cps in (False, True):
        _, _, _, std = sde_step_reference(x, v, t, tn, a, torch.zeros_like(x), sigma_max=sigma_max, cps=cps)
        if cps:
            std_dev_t = tn * math.sin(a * math.pi / 2)
        else:
            std_dev_t = math.sqrt(t / (1 - (sigma_max if t == 1 else t))) * a
        flow = ((m - r) ** 2).mean((1, 2)) / (2 * std_dev_t**2)
        exact = (((m - r) ** 2) / (2 * std[:, None, None] ** 2)).mean((1, 2))
        for convention, expected in (("flow_grpo", flow), ("exact", exact)):
            s = kl_std(std, t, tn, convention=convention, cps=cps)
            out = flow_grpo_loss(zeros, zeros, zeros, keep, 1e-3, kl_mean_new=m, kl_mean_ref=r, kl_std=s, kl_beta=1.0)
            torch.testing.assert_close(out.kl, expected.mean(), rtol=1e-5, atol=0, msg=f"{convention} cps={cps}")
        if not cps:  # the same beta weighs the exact KL 1/|dt| times more
            torch.testing.assert_close(exact, flow / (t - tn), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="convention"):
        kl_std(std, t, tn, convention="k3")


def test_reference_gradcheck_and_errors():
    new, old, adv, keep = make(4, 2, seed=6)
    x = new.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: flow_grpo_loss_reference(x, old.double(), adv.double(), keep, 0.5).loss, (x,))
    with pytest.raises(ValueError, match="same|both"):
        flow_grpo_loss(new, old[:, :1], adv, keep, 1e-3)
    with pytest.raises(TypeError, match="bool"):
        flow_grpo_loss(new, old, adv, keep.float(), 1e-3)
    with pytest.raises(ValueError, match="clip_range"):
        flow_grpo_loss(new, old, adv, keep, 0.0)
