"""Flow-matching SDE step with per-sample log-probability (SPEC §3.2), forward and backward fused.

Per sample b with t = sigma[b], t' = sigma_next[b], dt = t' - t < 0, noise level a, velocity v:

    "sde" (Flow-GRPO):
        s_t  = a * sqrt(t / (1 - t))            (t == 1: 1 - sigma_max in the denominator)
        mean = x * (1 + s_t^2 dt / (2t)) + v * (1 + s_t^2 (1 - t) / (2t)) * dt
        std  = s_t * sqrt(-dt)
    "cps" (coefficients-preserving):
        std  = t' * sin(a pi / 2)
        mean = (x - t v) (1 - t') + (x + (1 - t) v) * t' cos(a pi / 2)

    x' = mean + std * eps                                   (or the given prev_sample)
    log p = mean_{non-batch dims} [ -(x' - mean)^2 / (2 std^2) - log std - log(2 pi) / 2 ]   ("gaussian")
          = mean_{non-batch dims} [ -(x' - mean)^2 ]                                          ("mse")

"mse" is Flow-GRPO's CPS log-prob (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py: "remove all
constants"): no variance scaling, so its ratios and clip ranges are not comparable with the
Gaussian's. Both are ``w_b * (-sum (x' - mean)^2) / D + c_b`` with w = 1/(2 std^2), c = -log std -
log(2 pi)/2 (gaussian) or w = 1, c = 0 (mse).

Both variants are ``mean = c1 * x + c2 * v`` with per-sample c1, c2, std, so one kernel
serves both. Math is float32 whatever the input dtype; ``prev_sample`` is returned in
``x.dtype`` and the log-probability is computed from that rounded value (so a later
recomputation from the stored sample gives the same number); ``mean`` is float32 (a KL
term on mean differences needs the precision). ``x'`` enters the log-prob detached, as in
Flow-GRPO, so gradients reach v (and x) through ``mean``:

    dL/dmean_i = gmean_i + gprev_i + glogp_b * 2 w_b (x'_i - mean_i) / D
    dL/dv = c2 * dL/dmean,   dL/dx = c1 * dL/dmean

Forward reads x, v and the noise (or draws it in-kernel with Philox when none is given, which
saves a full write+read of a noise tensor) or prev_sample; writes x', mean and one partial
log-prob sum per block (a [B, D / BLOCK] grid: every SM busy whatever B); a second launch sums
each sample's partials in a fixed order and writes log p and std, so a step is two launches with
no PyTorch epilogue (scalar sigmas go to the kernels as floats: no tensors are built for them).
Backward reads mean, x' and the incoming gradients and writes dv/dx.
"""

from __future__ import annotations

import math

import torch

from .launch import compiled, launch_settings, next_power_of_2, resolve_backend, tl, triton

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
MODE_NOISE, MODE_RNG, MODE_PREV = 0, 1, 2
LOGPROBS = ("gaussian", "mse")


def _per_sample(value, B: int, device, name: str) -> torch.Tensor:
    if torch.is_tensor(value):
        if value.dim() == 0:
            return value.to(device=device, dtype=torch.float32).expand(B).contiguous()
        if value.shape != (B,):
            raise ValueError(f"{name} must be a float or a [B]={B} tensor, got shape {tuple(value.shape)}")
        return value.to(device=device, dtype=torch.float32).contiguous()
    return torch.full((B,), float(value), device=device, dtype=torch.float32)


def _check_sigmas(sigma, sigma_next) -> None:
    # Values can only be checked without a device sync when they are Python numbers.
    if not torch.is_tensor(sigma) and not torch.is_tensor(sigma_next):
        if not (0.0 < sigma <= 1.0):
            raise ValueError(f"sigma must be in (0, 1], got {sigma}")
        if not (0.0 <= sigma_next < sigma):
            raise ValueError(f"sigma_next must be in [0, sigma), got {sigma_next} (sigma={sigma})")


def step_coefficients(t: torch.Tensor, tn: torch.Tensor, noise_level: float, sigma_max: torch.Tensor,
                      cps: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c1, c2, std) per sample such that mean = c1 * x + c2 * v (float32 [B] each)."""
    dt = tn - t
    if cps:
        std = tn * math.sin(noise_level * math.pi / 2)
        k = tn * math.cos(noise_level * math.pi / 2)
        return (1 - tn) + k, -t * (1 - tn) + (1 - t) * k, std
    denom = torch.where(t >= 1, 1 - sigma_max, 1 - t)
    s = noise_level * torch.sqrt(t / denom)
    c1 = 1 + s * s * dt / (2 * t)
    c2 = (1 + s * s * (1 - t) / (2 * t)) * dt
    return c1, c2, s * torch.sqrt(-dt)


# ----------------------------------------------------------------------------- reference


def sde_step_reference(x, v, sigma, sigma_next, noise_level, noise=None, prev_sample=None, *, sigma_max=None,
                       cps=False, generator=None, logprob="gaussian"):
    """Plain PyTorch SPEC §3.2; returns (prev_sample, log_prob [B], mean fp32, std [B])."""
    B = x.shape[0]
    f = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 only for gradcheck
    t = _per_sample(sigma, B, x.device, "sigma").to(f)
    tn = _per_sample(sigma_next, B, x.device, "sigma_next").to(f)
    smax = _per_sample(sigma_next if sigma_max is None else sigma_max, B, x.device, "sigma_max").to(f)
    c1, c2, std = step_coefficients(t, tn, noise_level, smax, cps)
    shape = (B,) + (1,) * (x.dim() - 1)
    mean = c1.view(shape) * x.to(f) + c2.view(shape) * v.to(f)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=f)
        prev_sample = (mean + std.view(shape) * noise.to(f)).to(x.dtype)
    dims = tuple(range(1, x.dim()))
    sq = (prev_sample.detach().to(f) - mean) ** 2
    if logprob == "mse":
        log_prob = (-sq).mean(dims)
    else:
        log_prob = (-sq / (2 * std.view(shape) ** 2)).mean(dims) - torch.log(std) - LOG_SQRT_2PI
    return prev_sample, log_prob, mean, std


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _coefficients(SIG, SIGN, SMAX, t_f, tn_f, smax_f, b, a, CPS: tl.constexpr, PER_SAMPLE: tl.constexpr):
        """(c1, c2, std) of the module docstring for sample b (float32 scalars); the sigmas are per-sample
        tensors (PER_SAMPLE) or the scalars t_f, tn_f, smax_f shared by the batch (no tensor is built for them)."""
        if PER_SAMPLE:
            t = tl.load(SIG + b)
            tn = tl.load(SIGN + b)
        else:
            t = t_f
            tn = tn_f
        dt = tn - t
        if CPS:
            std = tn * tl.sin(a * 1.5707963267948966)
            k = tn * tl.cos(a * 1.5707963267948966)
            c1 = (1.0 - tn) + k
            c2 = -t * (1.0 - tn) + (1.0 - t) * k
        else:
            if PER_SAMPLE:
                smax = tl.load(SMAX + b)
            else:
                smax = smax_f
            denom = tl.where(t >= 1.0, 1.0 - smax, 1.0 - t)
            s = a * tl.sqrt(t / denom)
            c1 = 1.0 + s * s * dt / (2.0 * t)
            c2 = (1.0 + s * s * (1.0 - t) / (2.0 * t)) * dt
            std = s * tl.sqrt(-dt)
        return c1, c2, std

    @triton.jit
    def _sde_fwd_kernel(X, V, NOISE, PREV, MEAN, PART, SIG, SIGN, SMAX, t_f, tn_f, smax_f, D, S, a, seed,
                        MODE: tl.constexpr, CPS: tl.constexpr, MSE: tl.constexpr, PER_SAMPLE: tl.constexpr,
                        BLOCK: tl.constexpr):
        """mean = c1 x + c2 v; x' = mean + std * eps (MODE 0: given eps, 1: Philox eps, 2: x' given);
        PART[b, s] = w_b * sum over this block of -(x' - mean)^2, w = 1 (MSE) or 1 / (2 std^2)."""
        b = tl.program_id(0)
        s = tl.program_id(1)
        c1, c2, std = _coefficients(SIG, SIGN, SMAX, t_f, tn_f, smax_f, b, a, CPS, PER_SAMPLE)
        offs = s * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        row = b.to(tl.int64) * D
        x = tl.load(X + row + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + row + offs, mask=mask, other=0.0).to(tl.float32)
        mean = c1 * x + c2 * v
        if MODE == 2:
            prev = tl.load(PREV + row + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            if MODE == 0:
                eps = tl.load(NOISE + row + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                eps = tl.randn(seed, row + offs)
            prev_q = (mean + std * eps).to(PREV.dtype.element_ty)
            tl.store(PREV + row + offs, prev_q, mask=mask)
            prev = prev_q.to(tl.float32)
        tl.store(MEAN + row + offs, mean, mask=mask)
        diff = tl.where(mask, prev - mean, 0.0)
        if MSE:
            tl.store(PART + b * S + s, -tl.sum(diff * diff, axis=0))
        else:
            tl.store(PART + b * S + s, -tl.sum(diff * diff, axis=0) / (2.0 * std * std))

    @triton.jit
    def _sde_logprob_kernel(PART, LP, STD, SIG, SIGN, SMAX, t_f, tn_f, smax_f, D, S, a, CPS: tl.constexpr,
                            MSE: tl.constexpr, PER_SAMPLE: tl.constexpr, BLOCK_S: tl.constexpr):
        """Per sample b: log p = sum_s PART[b, s] / D (- log std - log(2 pi) / 2 for the Gaussian), and std: the
        epilogue in one launch, summed in a fixed order (the same number every run)."""
        b = tl.program_id(0)
        _, _, std = _coefficients(SIG, SIGN, SMAX, t_f, tn_f, smax_f, b, a, CPS, PER_SAMPLE)
        total = 0.0
        for start in range(0, S, BLOCK_S):
            offs = start + tl.arange(0, BLOCK_S)
            total += tl.sum(tl.load(PART + b * S + offs, mask=offs < S, other=0.0), axis=0)
        lp = total / D
        if not MSE:
            lp = lp - tl.log(std) - 0.9189385332046727
        tl.store(LP + b, lp)
        tl.store(STD + b, std)

    @triton.jit
    def _sde_bwd_kernel(MEAN, PREV, GMEAN, GPREV, GLP, GX, GV, SIG, SIGN, SMAX, t_f, tn_f, smax_f, D, a,
                        HAS_GMEAN: tl.constexpr, HAS_GPREV: tl.constexpr, NEED_GX: tl.constexpr,
                        CPS: tl.constexpr, MSE: tl.constexpr, PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
        """g = gmean + gprev + glogp_b 2 w_b (x' - mean) / D;  gv = c2 g,  gx = c1 g."""
        b = tl.program_id(0)
        s = tl.program_id(1)
        c1, c2, std = _coefficients(SIG, SIGN, SMAX, t_f, tn_f, smax_f, b, a, CPS, PER_SAMPLE)
        offs = s * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        row = b.to(tl.int64) * D
        mean = tl.load(MEAN + row + offs, mask=mask, other=0.0)
        prev = tl.load(PREV + row + offs, mask=mask, other=0.0).to(tl.float32)
        glp = tl.load(GLP + b)
        if MSE:
            g = glp * 2.0 * (prev - mean) / D
        else:
            g = glp * (prev - mean) / (std * std * D)
        if HAS_GMEAN:
            g += tl.load(GMEAN + row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GPREV:
            g += tl.load(GPREV + row + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(GV + row + offs, (c2 * g).to(GV.dtype.element_ty), mask=mask)
        if NEED_GX:
            tl.store(GX + row + offs, (c1 * g).to(GX.dtype.element_ty), mask=mask)


def _settings(D: int) -> tuple[int, int]:
    return launch_settings(D, max_block=4096, min_block=16, wide=1024)


class _SDEStepTriton(torch.autograd.Function):
    """Two launches forward (the step with per-block partial sums, then the per-sample epilogue), one backward; the
    sigmas are ``sig = (t, tn, smax)``: three ``[B]`` float32 tensors, or three floats shared by the batch."""

    @staticmethod
    def forward(ctx, x, v, sig, noise, prev_in, a, cps, seed, mse):
        B = x.shape[0]
        D = x.numel() // B
        block, warps = _settings(D)
        S = triton.cdiv(D, block)
        mode = MODE_PREV if prev_in is not None else (MODE_NOISE if noise is not None else MODE_RNG)
        mean = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        part = torch.empty((B, S), dtype=torch.float32, device=x.device)
        lp_std = torch.empty((2, B), dtype=torch.float32, device=x.device)
        prev = prev_in if prev_in is not None else torch.empty_like(x)
        ptrs, floats, per_sample = _sigma_args(sig, mean)
        _sde_fwd_kernel[(B, S)](
            x, v, noise if noise is not None else mean, prev, mean, part, *ptrs, *floats, D, S, float(a), seed,
            MODE=mode, CPS=cps, MSE=mse, PER_SAMPLE=per_sample, BLOCK=block, num_warps=warps)
        _sde_logprob_kernel[(B,)](part, lp_std[0], lp_std[1], *ptrs, *floats, D, S, float(a), CPS=cps, MSE=mse,
                                  PER_SAMPLE=per_sample, BLOCK_S=min(1024, next_power_of_2(S)))
        log_prob, std = lp_std[0], lp_std[1]
        ctx.save_for_backward(mean, prev, *(ptrs if per_sample else ()))
        ctx.floats, ctx.per_sample = floats, per_sample
        ctx.a, ctx.cps, ctx.mse, ctx.sampled, ctx.dtypes = a, cps, mse, prev_in is None, (x.dtype, v.dtype)
        ctx.mark_non_differentiable(std)
        out_prev = prev if prev_in is None else torch.empty(0, device=x.device)
        if prev_in is not None:
            ctx.mark_non_differentiable(out_prev)
        return out_prev, log_prob, mean, std

    @staticmethod
    def backward(ctx, g_prev, g_lp, g_mean, _g_std):
        mean, prev, *ptrs = ctx.saved_tensors
        if not ctx.per_sample:
            ptrs = [mean] * 3
        B = mean.shape[0]
        D = mean.numel() // B
        block, warps = _settings(D)
        S = triton.cdiv(D, block)
        need_gx = ctx.needs_input_grad[0]
        gv = torch.empty(mean.shape, dtype=ctx.dtypes[1], device=mean.device)
        gx = torch.empty(mean.shape, dtype=ctx.dtypes[0], device=mean.device) if need_gx else gv
        has_gprev = ctx.sampled and g_prev is not None
        if g_lp is None:
            g_lp = torch.zeros(B, dtype=torch.float32, device=mean.device)
        _sde_bwd_kernel[(B, S)](
            mean, prev, g_mean.contiguous() if g_mean is not None else mean,
            g_prev.contiguous() if has_gprev else mean, g_lp.float().contiguous(), gx, gv, *ptrs, *ctx.floats, D,
            float(ctx.a), HAS_GMEAN=g_mean is not None, HAS_GPREV=has_gprev, NEED_GX=need_gx, CPS=ctx.cps,
            MSE=ctx.mse, PER_SAMPLE=ctx.per_sample, BLOCK=block, num_warps=warps)
        return (gx if need_gx else None), gv, None, None, None, None, None, None, None


def _sigma_args(sig, dummy: torch.Tensor) -> tuple[list, list[float], bool]:
    """(the kernels' three sigma pointers, their three float stand-ins, PER_SAMPLE)."""
    if all(torch.is_tensor(t) for t in sig):
        return list(sig), [0.0, 0.0, 0.0], True
    return [dummy] * 3, [float(t) for t in sig], False


# ----------------------------------------------------------------------------- dispatch


def sde_step_logprob(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, noise_level: float,
                     noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None, *,
                     sigma_max=None, cps: bool = False, generator: torch.Generator | None = None,
                     logprob: str = "gaussian", backend: str = "auto"):
    """One SDE step with its log-probability (SPEC §3.2).

    Args:
        x, v: ``[B, ...]`` latents and predicted velocity (fp32/bf16/fp16; math in fp32).
        sigma, sigma_next: Python floats or ``[B]`` tensors, ``sigma_next < sigma``.
        noise_level: ``a`` (> 0; use :func:`ode_step` for deterministic steps).
        noise: standard-normal tensor shaped like ``x`` for reproducible sampling. Without it the
            reference draws from ``generator`` and the Triton kernel draws Philox numbers in-kernel
            from a seed taken from ``generator`` (no noise tensor is materialised).
        prev_sample: when given, evaluate its log-probability instead of sampling.
        sigma_max: schedule sigma used in the denominator when ``sigma == 1`` (default ``sigma_next``,
            which is the schedule's sigma_1 at the first step).
        cps: coefficients-preserving variant.
        logprob: ``"gaussian"`` (the exact transition density) or ``"mse"`` (Flow-GRPO's CPS form
            ``-mean((x' - mean)^2)``; its clip ranges only compare with its own).

    Returns:
        ``(prev_sample [x.dtype], log_prob [B] fp32, mean fp32, std [B] fp32)``; differentiable
        w.r.t. ``v`` and ``x``.
    """
    if x.shape != v.shape:
        raise ValueError(f"x and v must have the same shape, got {tuple(x.shape)} and {tuple(v.shape)}")
    if x.dim() < 2:
        raise ValueError(f"x must be [B, ...] with at least one non-batch dim, got {tuple(x.shape)}")
    for name, other in (("v", v), ("noise", noise), ("prev_sample", prev_sample)):
        if other is not None and other.shape != x.shape:
            raise ValueError(f"{name} must be shaped like x {tuple(x.shape)}, got {tuple(other.shape)}")
        if other is not None and other.device != x.device:
            raise ValueError(f"{name} is on {other.device}, x on {x.device}: move them to one device")
    if not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 for an SDE step (got {noise_level}); use ode_step")
    if logprob not in LOGPROBS:
        raise ValueError(f"logprob must be one of {LOGPROBS}, got {logprob!r}")
    _check_sigmas(sigma, sigma_next)
    if cps and not torch.is_tensor(sigma_next) and sigma_next == 0:
        raise ValueError("CPS has no noise at sigma_next=0 (no density); use ode_step for the last step")
    backend = resolve_backend(backend, x, family="sde_step")
    if backend in ("torch", "compiled"):
        fn = sde_step_reference if backend == "torch" else compiled(sde_step_reference)
        return fn(x, v, sigma, sigma_next, noise_level, noise, prev_sample, sigma_max=sigma_max, cps=cps,
                  generator=generator, logprob=logprob)
    B = x.shape[0]
    smax = sigma_next if sigma_max is None else sigma_max
    if any(torch.is_tensor(t) for t in (sigma, sigma_next, smax)):  # else the kernels take the floats themselves
        sig = (_per_sample(sigma, B, x.device, "sigma"), _per_sample(sigma_next, B, x.device, "sigma_next"),
               _per_sample(smax, B, x.device, "sigma_max"))
    else:
        sig = (float(sigma), float(sigma_next), float(smax))
    seed = 0
    if noise is None and prev_sample is None:
        device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device).item())
    prev, log_prob, mean, std = _SDEStepTriton.apply(
        x.contiguous(), v.contiguous(), sig, None if noise is None else noise.contiguous(),
        None if prev_sample is None else prev_sample.contiguous(), float(noise_level), bool(cps), seed,
        logprob == "mse")
    if prev_sample is not None:
        prev = prev_sample
    return prev, log_prob, mean, std


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Deterministic Euler step x + (sigma_next - sigma) v (the SDE step with s_t = 0)."""
    B = x.shape[0]
    if torch.is_tensor(sigma) or torch.is_tensor(sigma_next):
        dt = (_per_sample(sigma_next, B, x.device, "sigma_next") - _per_sample(sigma, B, x.device, "sigma"))
        return (x.float() + dt.view((B,) + (1,) * (x.dim() - 1)) * v.float()).to(x.dtype)
    return (x.float() + (float(sigma_next) - float(sigma)) * v.float()).to(x.dtype)
