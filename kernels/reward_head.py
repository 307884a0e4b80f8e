"""Gaussian reward head on the last prompt token and the uncertainty-aware pair loss (SPEC §3.4).

reward_head:  h_b = hidden[b, last_index[b], :]                       (gathered in-kernel)
              mu_b = <h_b, W[0]> + bias[0],  log_var_b = <h_b, W[1]> + bias[1]   (fp32 accumulation)
    backward: dW[j] = sum_b g_j,b h_b,  dbias[j] = sum_b g_j,b,
              dhidden[b, last_index[b]] = g_mu,b W[0] + g_lv,b W[1]   (every other row 0)

Nothing of size [B, T, H] is created except, in backward, the gradient of ``hidden`` itself
(autograd needs it dense); the forward never copies the gathered rows or makes logits for
other positions.

pair_loss:    var = exp(lv_w) + exp(lv_l)   (0 without a variance head)
              c = sqrt(1 + (pi / 8) var),  z = (mu_w - mu_l) / c
              loss = mean_i softplus(-z_i) = mean_i -log sigmoid(z_i)
    backward: dl/dz = -sigmoid(-z) / N,  dmu_w = dl/dz / c = -dmu_l,
              dlv_w = dl/dz * (-z (pi / 8) exp(lv_w) / (2 c^2))   (likewise for lv_l)
    Both paths compute log c^2 = softplus(logaddexp(lv_w, lv_l) + log(pi / 8)) and exp(lv - log c^2), so a
    large log-variance (exp(89) overflows float32) gives z -> 0 and zero gradients, not NaN.

The pair loss is launch-bound (N pairs), so the Triton path computes the loss and every
gradient in one single-program launch; backward is one multiply per input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .launch import compiled, launch_settings, resolve_backend, tl, triton

PI_OVER_8 = math.pi / 8


# ----------------------------------------------------------------------------- references


def reward_head_reference(hidden: torch.Tensor, last_index: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Plain PyTorch: gather the last prompt token's hidden state, apply the 2-output head."""
    B = hidden.shape[0]
    h = hidden[torch.arange(B, device=hidden.device), last_index]
    f = torch.promote_types(hidden.dtype, torch.float32)
    out = F.linear(h.to(f), weight.to(f), bias.to(f))
    return out[:, 0], out[:, 1]


def pair_loss_reference(mu_w, log_var_w, mu_l, log_var_l):
    """Plain PyTorch: -log sigmoid((mu_w - mu_l) / sqrt(1 + pi/8 (s_w^2 + s_l^2))), mean over pairs."""
    f = torch.promote_types(mu_w.dtype, torch.float32)  # float64 stays float64 (gradcheck)
    delta = mu_w.to(f) - mu_l.to(f)
    if log_var_w is None:
        return -F.logsigmoid(delta).mean()
    # 1 + pi/8 (s_w^2 + s_l^2) = exp(softplus(logaddexp(lv_w, lv_l) + log(pi/8))): the same number, written so that
    # neither it nor its gradient overflows when a log-variance is large (exp(89) is inf in float32)
    log_c2 = F.softplus(torch.logaddexp(log_var_w.to(f), log_var_l.to(f)) + math.log(PI_OVER_8))
    return -F.logsigmoid(delta * torch.exp(-0.5 * log_c2)).mean()


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _head_fwd_kernel(HID, IDX, W, BIAS, MU, LV, T, H, stride_b, stride_t, BLOCK_H: tl.constexpr):
        """mu_b, lv_b = W @ hidden[b, idx_b] + bias (one program per sequence)."""
        b = tl.program_id(0)
        idx = tl.load(IDX + b)
        row = HID + b.to(tl.int64) * stride_b + idx.to(tl.int64) * stride_t
        acc0 = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs = h0 + tl.arange(0, BLOCK_H)
            m = offs < H
            h = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
            acc0 += h * tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
            acc1 += h * tl.load(W + H + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(MU + b, tl.sum(acc0, axis=0) + tl.load(BIAS).to(tl.float32))
        tl.store(LV + b, tl.sum(acc1, axis=0) + tl.load(BIAS + 1).to(tl.float32))

    @triton.jit
    def _head_bwd_kernel(HID, IDX, W, GMU, GLV, GHID, GW, B, H, stride_b, stride_t, gstride_b, gstride_t,
                         NEED_GHID: tl.constexpr, BLOCK_H: tl.constexpr):
        """For one H-slice: GW[j] = sum_b g_j,b h_b and GHID[b, idx_b] = g_mu,b W[0] + g_lv,b W[1]."""
        pid = tl.program_id(0)
        offs = pid * BLOCK_H + tl.arange(0, BLOCK_H)
        m = offs < H
        w0 = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
        w1 = tl.load(W + H + offs, mask=m, other=0.0).to(tl.float32)
        gw0 = tl.zeros((BLOCK_H,), dtype=tl.float32)
        gw1 = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for b in range(0, B):
            idx = tl.load(IDX + b).to(tl.int64)
            gmu = tl.load(GMU + b)
            glv = tl.load(GLV + b)
            h = tl.load(HID + b * stride_b + idx * stride_t + offs, mask=m, other=0.0).to(tl.float32)
            gw0 += gmu * h
            gw1 += glv * h
            if NEED_GHID:
                gh = gmu * w0 + glv * w1
                tl.store(GHID + b * gstride_b + idx * gstride_t + offs, gh.to(GHID.dtype.element_ty), mask=m)
        tl.store(GW + offs, gw0, mask=m)
        tl.store(GW + H + offs, gw1, mask=m)

    @triton.jit
    def _pair_loss_kernel(MUW, LVW, MUL, LVL, G_MUW, G_LVW, OUT, N, HAS_VAR: tl.constexpr, BLOCK: tl.constexpr):
        """OUT = mean softplus(-z); G_* = d OUT / d input (module docstring)."""
        offs = tl.arange(0, BLOCK)
        total = tl.zeros((), dtype=tl.float32)
        for i0 in range(0, N, BLOCK):
            i = i0 + offs
            m = i < N
            d = tl.load(MUW + i, mask=m, other=0.0).to(tl.float32) - tl.load(MUL + i, mask=m, other=0.0).to(tl.float32)
            if HAS_VAR:
                # log c2 = log(1 + pi/8 (exp(lw) + exp(ll))) = softplus(logaddexp(lw, ll) + log(pi/8)), in logs so a
                # large log-variance gives z -> 0 and a zero gradient instead of inf * 0
                lw = tl.load(LVW + i, mask=m, other=0.0).to(tl.float32)
                ll = tl.load(LVL + i, mask=m, other=0.0).to(tl.float32)
                hi = tl.maximum(lw, ll)
                y = hi + tl.log(1.0 + tl.exp(-tl.abs(lw - ll))) - 0.9347116558304358  # + log(pi/8)
                log_c2 = tl.maximum(y, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(y)))
            else:
                log_c2 = tl.zeros((BLOCK,), tl.float32)
            inv_c = tl.exp(-0.5 * log_c2)
            z = d * inv_c
            # softplus(-z) = max(-z, 0) + log(1 + exp(-|z|))
            sp = tl.maximum(-z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
            total += tl.sum(tl.where(m, sp, 0.0), axis=0)
            dz = -1.0 / (1.0 + tl.exp(z)) / N  # -sigmoid(-z) / N
            tl.store(G_MUW + i, dz * inv_c, mask=m)
            if HAS_VAR:
                k = dz * (-z) * 0.5 * 0.39269908169872414  # times exp(lv) / c2 for each side
                tl.store(G_LVW + i, k * tl.exp(lw - log_c2), mask=m)
                tl.store(G_LVW + N + i, k * tl.exp(ll - log_c2), mask=m)
        tl.store(OUT, total / N)


class _RewardHeadTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, last_index, weight, bias):
        B, T, H = hidden.shape
        mu = torch.empty(B, dtype=torch.float32, device=hidden.device)
        lv = torch.empty(B, dtype=torch.float32, device=hidden.device)
        block, warps = launch_settings(H, max_block=1024, wide=512)
        _head_fwd_kernel[(B,)](hidden, last_index, weight, bias, mu, lv, T, H, hidden.stride(0), hidden.stride(1),
                               BLOCK_H=block, num_warps=warps)
        ctx.save_for_backward(hidden, last_index, weight)
        ctx.bias_dtype = bias.dtype
        return mu, lv

    @staticmethod
    def backward(ctx, g_mu, g_lv):
        hidden, last_index, weight = ctx.saved_tensors
        B, T, H = hidden.shape
        g_mu = torch.zeros(B, device=hidden.device) if g_mu is None else g_mu.float().contiguous()
        g_lv = torch.zeros(B, device=hidden.device) if g_lv is None else g_lv.float().contiguous()
        need_ghid = ctx.needs_input_grad[0]
        # Autograd needs the input's gradient dense; only the B gathered rows are non-zero.
        g_hidden = torch.zeros_like(hidden) if need_ghid else None
        g_weight = torch.empty((2, H), dtype=torch.float32, device=hidden.device)
        block, _ = launch_settings(H, max_block=256)
        _head_bwd_kernel[(triton.cdiv(H, block),)](
            hidden, last_index, weight, g_mu, g_lv, g_hidden if need_ghid else hidden, g_weight, B, H,
            hidden.stride(0), hidden.stride(1), g_hidden.stride(0) if need_ghid else 0,
            g_hidden.stride(1) if need_ghid else 0, NEED_GHID=need_ghid, BLOCK_H=block, num_warps=2)
        g_bias = torch.stack([g_mu.sum(), g_lv.sum()]).to(ctx.bias_dtype)
        return g_hidden, None, g_weight.to(weight.dtype), g_bias


class _PairLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu_w, lv_w, mu_l, lv_l):
        N = mu_w.shape[0]
        has_var = lv_w is not None
        g_mu = torch.empty(N, dtype=torch.float32, device=mu_w.device)
        g_lv = torch.empty(2 * N if has_var else 1, dtype=torch.float32, device=mu_w.device)
        out = torch.empty((), dtype=torch.float32, device=mu_w.device)
        _pair_loss_kernel[(1,)](mu_w, lv_w if has_var else mu_w, mu_l, lv_l if has_var else mu_l, g_mu, g_lv, out, N,
                                HAS_VAR=has_var, BLOCK=launch_settings(N, max_block=1024, min_block=16)[0], num_warps=4)
        ctx.save_for_backward(g_mu, g_lv)
        ctx.has_var = has_var
        ctx.dtypes = (mu_w.dtype, None if lv_w is None else lv_w.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        g_mu, g_lv = ctx.saved_tensors
        gm = (g * g_mu).to(ctx.dtypes[0])
        if not ctx.has_var:
            return gm, None, -gm, None
        N = g_mu.shape[0]
        glv = (g * g_lv).to(ctx.dtypes[1])
        return gm, glv[:N], -gm, glv[N:]


# ----------------------------------------------------------------------------- dispatch


def reward_head(hidden: torch.Tensor, last_index: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian head on each sequence's last prompt token.

    Args:
        hidden: ``[B, T, H]`` final hidden states (any float dtype; last dim contiguous).
        last_index: ``[B]`` int64 position of each sequence's last prompt token.
        weight: ``[2, H]`` (``nn.Linear`` layout: row 0 -> mu, row 1 -> log_var); bias: ``[2]``.

    Returns:
        ``(mu [B], log_var [B])`` float32, differentiable w.r.t. hidden, weight and bias.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got {tuple(hidden.shape)}")
    B, T, H = hidden.shape
    if last_index.shape != (B,) or last_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"last_index must be an integer [B]={B} tensor, got {last_index.dtype} "
                         f"{tuple(last_index.shape)}")
    if weight.shape != (2, H) or bias.shape != (2,):
        raise ValueError(f"weight must be [2, H={H}] and bias [2], got {tuple(weight.shape)} and {tuple(bias.shape)}")
    if not last_index.is_cuda and B and (int(last_index.min()) < 0 or int(last_index.max()) >= T):
        raise ValueError(f"last_index values must be in [0, T={T})")
    backend = resolve_backend(backend, hidden, family="reward_head")
    if backend in ("torch", "compiled"):
        fn = reward_head_reference if backend == "torch" else compiled(reward_head_reference)
        return fn(hidden, last_index, weight, bias)
    if hidden.stride(2) != 1:
        hidden = hidden.contiguous()
    return _RewardHeadTriton.apply(hidden, last_index.long().contiguous(), weight.contiguous(), bias.contiguous())


def pair_loss(mu_w: torch.Tensor, log_var_w: torch.Tensor | None, mu_l: torch.Tensor,
              log_var_l: torch.Tensor | None, backend: str = "auto") -> torch.Tensor:
    """Mean pair loss -log p(w beats l) (SPEC §3.4); ``log_var_* = None`` is plain Bradley-Terry.

    All inputs ``[N]``; returns a float32 scalar differentiable w.r.t. every input.
    """
    if mu_w.dim() != 1 or mu_l.shape != mu_w.shape:
        raise ValueError(f"mu_w and mu_l must both be [N], got {tuple(mu_w.shape)} and {tuple(mu_l.shape)}")
    if (log_var_w is None) != (log_var_l is None):
        raise ValueError("give both log_var_w and log_var_l, or neither (Bradley-Terry)")
    if log_var_w is not None and (log_var_w.shape != mu_w.shape or log_var_l.shape != mu_w.shape):
        raise ValueError("log_var_w and log_var_l must be shaped like mu_w")
    if mu_w.shape[0] == 0:
        raise ValueError("pair_loss needs at least one pair")
    backend = resolve_backend(backend, mu_w, family="reward_head")
    if backend in ("torch", "compiled"):
        fn = pair_loss_reference if backend == "torch" else compiled(pair_loss_reference)
        return fn(mu_w, log_var_w, mu_l, log_var_l)
    c = [None if t is None else t.contiguous() for t in (mu_w, log_var_w, mu_l, log_var_l)]
    return _PairLossTriton.apply(*c)


def pairwise_accuracy(mu_w: torch.Tensor, mu_l: torch.Tensor) -> float:
    """Fraction of pairs with mu_w > mu_l; an exact tie counts one half."""
    wins = (mu_w > mu_l).float() + 0.5 * (mu_w == mu_l).float()
    return float(wins.mean()) if wins.numel() else float("nan")
