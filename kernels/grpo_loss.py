"""Clipped GRPO policy loss for flow models with an optional KL term (SPEC §3.3).

For samples b (only ``keep[b]``) and trained timesteps t:

    ratio = exp(logp_new - logp_old)
    L_bt  = max(-A_b * ratio, -A_b * clamp(ratio, 1 - eps, 1 + eps))
    KL_bt = mean_{latent dims} (mean_new - mean_ref)^2 / (2 s_bt^2)
    loss  = sum_{kept b, t} (L_bt + beta * KL_bt) / (n_kept * T)

    dloss/dlogp_new_bt = keep_b * [ -A_b * ratio  if the unclipped branch is the max, else 0 ] / (n_kept * T)

Diagnostics over kept (b, t): ``clip_fraction`` = share with |ratio - 1| > eps,
``approx_kl`` = mean 0.5 (logp_new - logp_old)^2, ``kl`` = mean KL_bt (before beta).
With no kept sample the loss is 0 (still connected to the graph, gradient 0).

``s`` is a convention (:func:`kl_std`): "exact" uses the step's std sigma_t sqrt(-dt) (the true
KL of the two Gaussian transitions); "flow_grpo" uses what Flow-GRPO's training loop divides by
(scripts/train_sd3.py with flow_grpo/diffusers_patch/sd3_sde_with_logprob.py): sigma_t without
sqrt(-dt) for the SDE step, so the same beta weighs the KL 1/|dt| times less than "exact"; for CPS
both are the step's std.

The surrogate is launch-bound (B*T is a few hundred numbers), so the Triton path is one
program that counts the kept samples, computes the loss, the diagnostics and the gradient
w.r.t. ``logp_new`` in a single launch that writes every returned tensor (no copy or cast after it);
backward is one multiply. The KL term is a
bandwidth-bound reduction over latents done with PyTorch ops in both backends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .launch import compiled, resolve_backend, tl, triton

KL_CONVENTIONS = ("flow_grpo", "exact")


def kl_std(std: torch.Tensor, sigma: float, sigma_next: float, *, convention: str, cps: bool = False) -> torch.Tensor:
    """The ``s`` of the KL term for a step from ``sigma`` to ``sigma_next`` whose std is ``std``
    (``[B]``, as returned by ``sde_step_logprob``), under ``convention`` (module docstring)."""
    if convention not in KL_CONVENTIONS:
        raise ValueError(f"kl convention must be one of {KL_CONVENTIONS}, got {convention!r}")
    if convention == "exact" or cps:
        return std
    return std / (float(sigma) - float(sigma_next)) ** 0.5


@dataclass
class GRPOLoss:
    loss: torch.Tensor  # scalar, differentiable w.r.t. logp_new (and kl_mean_new)
    policy_loss: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    n_kept: torch.Tensor


# ----------------------------------------------------------------------------- reference


def _kl_per_sample(mean_new, mean_ref, std, shape_bt):
    """KL_bt = mean over latent dims of (mean_new - mean_ref)^2 / (2 std^2), shaped [B, T]."""
    B, T = shape_bt
    diff = (mean_new.float() - mean_ref.float()).reshape(B, T, -1)
    std = torch.as_tensor(std, dtype=torch.float32, device=diff.device)
    std = std.expand(B, T) if std.dim() == 0 else std.reshape(B, -1).expand(B, T)
    return (diff * diff).mean(-1) / (2 * std * std)


def flow_grpo_loss_reference(logp_new, logp_old, advantages, keep, clip_range, *, kl_mean_new=None,
                             kl_mean_ref=None, kl_std=None, kl_beta=0.0) -> GRPOLoss:
    """Plain PyTorch SPEC §3.3."""
    B = logp_new.shape[0]
    new = logp_new.reshape(B, -1)
    old = logp_old.reshape(B, -1).to(new.dtype)
    T = new.shape[1]
    A = advantages.to(new.dtype).reshape(B, 1)
    w = keep.reshape(B, 1).to(new.dtype).expand(B, T)
    n = keep.sum()
    denom = (n * T).clamp(min=1).to(new.dtype)
    ratio = torch.exp(new - old.detach())
    unclipped = -A * ratio
    clipped = -A * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    policy = (torch.maximum(unclipped, clipped) * w).sum() / denom
    clip_frac = (((ratio - 1).abs() > clip_range).to(new.dtype) * w).sum().detach() / denom
    approx_kl = (0.5 * (new - old) ** 2 * w).sum().detach() / denom
    kl = torch.zeros((), dtype=new.dtype, device=new.device)
    loss = policy
    if kl_mean_new is not None:
        kl = (_kl_per_sample(kl_mean_new, kl_mean_ref, kl_std, (B, T)) * w).sum() / denom
        loss = loss + kl_beta * kl
    return GRPOLoss(loss, policy.detach(), kl.detach(), clip_frac, approx_kl, n)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _grpo_loss_kernel(NEW, OLD, ADV, KEEP, GRAD, OUT, LOSS, NKEPT, B, T, clip, BLOCK: tl.constexpr):
        """One program: LOSS = policy loss, OUT = [policy_loss, clip_fraction, approx_kl], NKEPT = n_kept (int64);
        GRAD[b, t] = dloss/dlogp_new (see module docstring). Every output the caller returns is written here, so
        the forward is this one launch."""
        offs = tl.arange(0, BLOCK)
        n = tl.zeros((), dtype=tl.int32)
        for b0 in range(0, B, BLOCK):
            k = tl.load(KEEP + b0 + offs, mask=b0 + offs < B, other=0)
            n += tl.sum((k != 0).to(tl.int32), axis=0)
        denom = tl.maximum(n * T, 1).to(tl.float32)
        loss = tl.zeros((), dtype=tl.float32)
        clipped_n = tl.zeros((), dtype=tl.float32)
        akl = tl.zeros((), dtype=tl.float32)
        N = B * T
        for i0 in range(0, N, BLOCK):
            i = i0 + offs
            m = i < N
            b = i // T
            new = tl.load(NEW + i, mask=m, other=0.0).to(tl.float32)
            old = tl.load(OLD + i, mask=m, other=0.0).to(tl.float32)
            a = tl.load(ADV + b, mask=m, other=0.0).to(tl.float32)
            kept = (tl.load(KEEP + b, mask=m, other=0) != 0) & m
            ratio = tl.exp(new - old)
            un = -a * ratio
            cl = -a * tl.minimum(tl.maximum(ratio, 1.0 - clip), 1.0 + clip)
            per = tl.maximum(un, cl)
            loss += tl.sum(tl.where(kept, per, 0.0), axis=0)
            clipped_n += tl.sum(tl.where(kept & (tl.abs(ratio - 1.0) > clip), 1.0, 0.0), axis=0)
            d = new - old
            akl += tl.sum(tl.where(kept, 0.5 * d * d, 0.0), axis=0)
            g = tl.where(kept & (un >= cl), un, 0.0) / denom
            tl.store(GRAD + i, g, mask=m)
        tl.store(LOSS, loss / denom)
        tl.store(OUT + 0, loss / denom)
        tl.store(OUT + 1, clipped_n / denom)
        tl.store(OUT + 2, akl / denom)
        tl.store(NKEPT, n.to(tl.int64))


class _GRPOLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, new, old, adv, keep, clip):
        B, T = new.shape
        grad = torch.empty((B, T), dtype=torch.float32, device=new.device)
        out = torch.empty(3, dtype=torch.float32, device=new.device)
        loss = torch.empty((), dtype=torch.float32, device=new.device)
        n_kept = torch.empty((), dtype=torch.int64, device=new.device)
        _grpo_loss_kernel[(1,)](new, old, adv, keep, grad, out, loss, n_kept, B, T, float(clip), BLOCK=256,
                                num_warps=4)
        ctx.save_for_backward(grad)
        ctx.dtype = new.dtype
        ctx.mark_non_differentiable(out, n_kept)
        return loss, out, n_kept

    @staticmethod
    def backward(ctx, g_loss, _g_out, _g_n):
        (grad,) = ctx.saved_tensors
        return (grad * g_loss).to(ctx.dtype), None, None, None, None


# ----------------------------------------------------------------------------- dispatch


def flow_grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, keep: torch.Tensor,
                   clip_range: float, *, kl_mean_new: torch.Tensor | None = None,
                   kl_mean_ref: torch.Tensor | None = None, kl_std=None, kl_beta: float = 0.0,
                   backend: str = "auto") -> GRPOLoss:
    """GRPO clipped surrogate (+ beta * KL) averaged over kept samples and timesteps.

    Args:
        logp_new: ``[B]`` or ``[B, T]`` log-probs under the current policy (differentiable).
        logp_old: same shape, from sampling (treated as constants).
        advantages: ``[B]``; keep: bool ``[B]`` (only kept samples contribute).
        clip_range: epsilon of the ratio clip (1e-4 ... 1e-3 for flow models).
        kl_mean_new, kl_mean_ref: ``[B, ...]`` (or ``[B, T, ...]``) step means under the policy and
            the reference; kl_std: scalar, ``[B]`` or ``[B, T]`` step std; kl_beta: weight.

    Returns:
        :class:`GRPOLoss` (``.loss`` scalar; ``.clip_fraction``, ``.approx_kl``, ``.kl`` diagnostics).
    """
    if logp_new.shape != logp_old.shape or logp_new.dim() not in (1, 2):
        raise ValueError(f"logp_new/logp_old must both be [B] or [B, T], got {tuple(logp_new.shape)} "
                         f"and {tuple(logp_old.shape)}")
    B = logp_new.shape[0]
    if advantages.shape != (B,) or keep.shape != (B,):
        raise ValueError(f"advantages and keep must be [B]={B}, got {tuple(advantages.shape)}, {tuple(keep.shape)}")
    if keep.dtype != torch.bool:
        raise TypeError(f"keep must be a bool tensor, got {keep.dtype}")
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if kl_beta and (kl_mean_new is None or kl_mean_ref is None or kl_std is None):
        raise ValueError("kl_beta > 0 needs kl_mean_new, kl_mean_ref and kl_std")
    backend = resolve_backend(backend, logp_new, family="grpo_loss")
    kl_args = dict(kl_mean_new=kl_mean_new, kl_mean_ref=kl_mean_ref, kl_std=kl_std, kl_beta=kl_beta)
    if backend in ("torch", "compiled"):
        fn = flow_grpo_loss_reference if backend == "torch" else compiled(flow_grpo_loss_reference)
        return fn(logp_new, logp_old, advantages, keep, clip_range, **(kl_args if kl_beta else {}))
    new = logp_new.reshape(B, -1)
    T = new.shape[1]
    loss, out, n_kept = _GRPOLossTriton.apply(new.contiguous(), logp_old.reshape(B, -1).detach().contiguous(),
                                      advantages.contiguous(), keep.contiguous().view(torch.int8), clip_range)
    policy = loss.detach()
    kl = torch.zeros((), dtype=torch.float32, device=new.device)
    if kl_beta:
        w = keep.reshape(B, 1).float().expand(B, T)
        kl_full = (_kl_per_sample(kl_mean_new, kl_mean_ref, kl_std, (B, T)) * w).sum() / (keep.sum() * T).clamp(min=1)
        loss = loss + kl_beta * kl_full
        kl = kl_full.detach()
    return GRPOLoss(loss, policy, kl, out[1], out[2], n_kept)
