"""reward_head and pair_loss: Triton (interpreter) vs reference vs formulas written out."""

import math

import pytest
import torch
from kernel_device import on_device

from spatialcore.kernels import (
    pair_loss,
    pair_loss_reference,
    pairwise_accuracy,
    reward_head,
    reward_head_reference,
)

reward_head, pair_loss = on_device(reward_head), on_device(pair_loss)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H", [(1, 1, 1), (3, 5, 7), (4, 9, 130), (2, 3, 1100)])
def test_reward_head_forward_backward(dtype, B, T, H):
    g = torch.Generator().manual_seed(B * T * H)
    hidden0 = torch.randn(B, T, H, generator=g).to(dtype)
    idx = torch.randint(0, T, (B,), generator=g)
    w0 = (torch.randn(2, H, generator=g) / math.sqrt(H)).to(dtype)
    b0 = torch.randn(2, generator=g).to(dtype)
    gmu, glv = torch.randn(B, generator=g), torch.randn(B, generator=g)
    res = {}
    for backend in ("torch", "triton"):
        hidden, w, b = (t.clone().requires_grad_(True) for t in (hidden0, w0, b0))
        mu, lv = reward_head(hidden, idx, w, b, backend=backend)
        assert mu.dtype == torch.float32 and mu.shape == (B,)
        ((gmu * mu).sum() + (glv * lv).sum()).backward()
        res[backend] = (mu.detach(), lv.detach(), hidden.grad.float(), w.grad.float(), b.grad.float())
    # Written out: mu_b = <hidden[b, idx_b], W0> + b0.
    for i in range(B):
        h = hidden0[i, idx[i]].double()
        assert abs(float(res["triton"][0][i]) - float(h @ w0[0].double() + b0[0].double())) < 1e-4 + TOL[dtype]
    for a, r in zip(res["triton"], res["torch"], strict=True):
        torch.testing.assert_close(a, r, rtol=TOL[dtype], atol=TOL[dtype])
    # Only the gathered rows receive gradient.
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[torch.arange(B), idx] = True
    assert (res["triton"][2][~mask] == 0).all()


def test_reward_head_non_contiguous_and_errors():
    hidden = torch.randn(6, 4, 8)[::2]  # strided batch dim
    idx = torch.tensor([3, 0, 2])
    w, b = torch.randn(2, 8), torch.randn(2)
    for x, y in zip(reward_head(hidden, idx, w, b, backend="triton"), reward_head_reference(hidden, idx, w, b),
                    strict=True):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="last_index values"):
        reward_head(hidden, torch.tensor([4, 0, 0]), w, b)
    with pytest.raises(ValueError, match=r"\[2, H"):
        reward_head(hidden, idx, torch.randn(3, 8), b)
    with pytest.raises(ValueError, match=r"\[B, T, H\]"):
        reward_head(hidden[0], idx, w, b)


def written_pair_loss(mw, lw, ml, ll):
    total = 0.0
    for i in range(len(mw)):
        var = 0.0 if lw is None else math.exp(lw[i]) + math.exp(ll[i])
        z = (mw[i] - ml[i]) / math.sqrt(1 + math.pi / 8 * var)
        total += -math.log(1 / (1 + math.exp(-z)))
    return total / len(mw)


@pytest.mark.parametrize("N", [1, 5, 64, 1500])
@pytest.mark.parametrize("with_var", [False, True])
def test_pair_loss(N, with_var):
    g = torch.Generator().manual_seed(N)
    mw, ml = 3 * torch.randn(N, generator=g), 3 * torch.randn(N, generator=g)
    lw, ll = (torch.randn(N, generator=g), torch.randn(N, generator=g)) if with_var else (None, None)
    expected = written_pair_loss(mw.tolist(), None if lw is None else lw.tolist(), ml.tolist(),
                                 None if ll is None else ll.tolist())
    grads = {}
    for backend in ("torch", "triton"):
        ins = [None if t is None else t.clone().requires_grad_(True) for t in (mw, lw, ml, ll)]
        loss = pair_loss(*ins, backend=backend)
        assert abs(float(loss) - expected) < 1e-5 * max(1.0, expected)
        loss.backward()
        grads[backend] = [t.grad for t in ins if t is not None]
    for a, r in zip(grads["triton"], grads["torch"], strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)


def test_pair_loss_gradcheck_and_bt_limit():
    g = torch.Generator().manual_seed(0)
    ins = [torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(4)]

    assert torch.autograd.gradcheck(lambda *t: pair_loss_reference(*t), ins)
    # A variance head saying "no uncertainty" (very negative log-variance) is Bradley-Terry.
    mw, ml = torch.randn(8), torch.randn(8)
    tiny = torch.full((8,), -30.0)
    torch.testing.assert_close(pair_loss(mw, tiny, ml, tiny, backend="triton"), pair_loss(mw, None, ml, None))
    with pytest.raises(ValueError, match="both"):
        pair_loss(mw, tiny, ml, None)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pair_loss_stays_finite_at_huge_log_variances(backend):
    """exp(lv) overflows float32 above ~88.7 (a randomly initialised 3584-wide head gives |lv| ~ 60-200): the
    loss tends to log 2 and the gradients to 0 as the variance grows, and must not turn into NaN (inf * 0)."""
    mw = torch.tensor([1.0, -2.0, 1.5, 3.0])
    ml = torch.tensor([0.0, 1.0, 0.5, -1.0])
    lw = torch.tensor([120.0, 300.0, -200.0, 0.3])
    ll = torch.tensor([-5.0, 90.0, -300.0, 0.7])
    ins = [t.clone().requires_grad_(True) for t in (mw, lw, ml, ll)]
    loss = pair_loss(*ins, backend=backend)
    loss.backward()
    assert all(t.grad.isfinite().all() for t in ins)
    # the two huge-variance pairs: z = 0 (softplus(0) = log 2) and no gradient to any input of theirs
    # the pair with log-variances -200/-300: Bradley-Terry; the last: the written formula in float64
    expected = (2 * math.log(2) + written_pair_loss([1.5], None, [0.5], None)
                + written_pair_loss([3.0], [0.3], [-1.0], [0.7])) / 4
    assert abs(float(loss) - expected) < 1e-6
    for t in ins:
        assert float(t.grad[:2].abs().max()) < 1e-20
    assert float(ins[1].grad[2]) == 0.0 and float(ins[3].grad[2]) == 0.0  # no variance, no variance gradient
    assert float(ins[0].grad[3]) < 0 < float(ins[1].grad[3])  # raising mu_w lowers the loss; so would a smaller s_w


def test_pairwise_accuracy_ties_count_half():
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])) == 0.625


def test_reward_head_gradcheck_reference():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.tensor([3, 0, 2])
    assert torch.autograd.gradcheck(lambda h, w, b: reward_head_reference(h, idx, w, b), (hidden, w, b))
