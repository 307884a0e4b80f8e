"""Group-relative advantages with Top-k filtering (SPEC §3.1), fused in one launch.

Per group (one row of ``rewards [P, G]``):

    V = {i : r_i finite}
    order V by r descending, ties -> lower index first;  rank_i = position of i in that order
    S = V                                   if top_k is None or 2*top_k >= |V|
      = {i in V : rank_i < k or rank_i >= |V| - k}   otherwise
    T = S (stats_over="kept") or V (stats_over="group")
    m = mean_T r,   s = sqrt( sum_T (r - m)^2 / (|T| - ddof) ),  s = 0 when |T| < 2
    scale = s + eps ("group") | s_batch + eps ("batch", std of all valid rewards) | 1 ("none")
    A_i = (r_i - m) / scale  for i in S, 0 elsewhere;  A <- clamp(A, -clip, clip)
    drop_zero_std: s <= zero_std_tol  =>  A = 0, keep = False for the whole group

Top-k may rank a group by another score than the reward (``rank_by``, e.g. SpatialScore's lower
confidence bound mu - lambda sigma): S is then the Top-k of that score's order (its non-finite entries
invalid), and a sample outside S leaves as a non-finite reward does; statistics and advantages still come
from the rewards. "Off" is spelled one way: ``top_k=None`` (every valid sample kept).

Statistics are accumulated in float64 (a group of equal rewards gives exactly A = 0 whatever
the summation order); outputs are float32.

Backends: ``torch`` (the readable reference below), ``triton`` (one launch: small groups several
per program as one [groups, G] tile, larger ones a program per group; the batch-std mode runs as a
single program that first reduces the whole batch),
``cuda`` (the native extension ``spatialcore._C``, warp per group, when built).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .launch import compiled, launch_settings, resolve_backend, tl, triton

StdMode = Literal["group", "batch", "none"]
StatsOver = Literal["kept", "group"]

# Keyword bundles reproducing each anchor's convention: group_advantages(r, **ADVANTAGE_PRESETS["trl"]).
# Filtering (top_k) is an argument, not part of a bundle; the presets that filter by default are in
# TOPK_PRESETS (preset_top_k gives their K for a group size).
ADVANTAGE_PRESETS: dict[str, dict] = {
    # TRL GRPOTrainer: (r - mean) / (std + 1e-4), torch.std (unbiased), no filtering.
    "trl": {"std": "group", "unbiased": True, "eps": 1e-4, "stats_over": "group"},
    # verl compute_grpo_outcome_advantage: (r - mean) / (std + 1e-6), torch.std (unbiased).
    "verl": {"std": "group", "unbiased": True, "eps": 1e-6, "stats_over": "group"},
    # Flow-GRPO's shipped default (config sample.global_std = True; flow_grpo/stat_tracking.py
    # PerPromptStatTracker): per-prompt mean, np.std of *all* rewards of the batch (biased) + 1e-4,
    # advantages clipped to +-5 in the training loop.
    "flow_grpo": {"std": "batch", "unbiased": False, "eps": 1e-4, "clip": 5.0, "stats_over": "group"},
    # The same tracker with global_std = False: per-prompt std.
    "flow_grpo_per_prompt": {"std": "group", "unbiased": False, "eps": 1e-4, "clip": 5.0, "stats_over": "group"},
    # DanceGRPO best-of-n: statistics over the whole group (torch.std, eps 1e-8), then keep
    # the top-k and bottom-k samples (pass top_k).
    "dancegrpo": {"std": "group", "unbiased": True, "eps": 1e-8, "stats_over": "group"},
    # Spatial-RL: keep top-k and bottom-k (pass top_k), normalise over the kept samples.
    "spatial_rl": {"std": "group", "unbiased": False, "eps": 1e-4, "clip": 5.0, "stats_over": "kept"},
}


# Best-of-n (DanceGRPO) and Spatial-RL keep the top and the bottom quarter of each group: K = G // 4.
TOPK_PRESETS = ("spatial_rl", "dancegrpo")


def preset_top_k(preset: str, group_size: int) -> int | None:
    """The preset's own K for groups of ``group_size`` (None: it keeps every sample)."""
    if preset not in ADVANTAGE_PRESETS:
        raise ValueError(f"unknown advantage preset {preset!r} ({', '.join(ADVANTAGE_PRESETS)})")
    return (group_size // 4 or None) if preset in TOPK_PRESETS else None


@dataclass
class GroupAdvantages:
    """``advantages``/``keep`` shaped like the input rewards; ``mean``/``std`` are ``[P]``."""

    advantages: torch.Tensor
    keep: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def kept_fraction(self) -> torch.Tensor:
        return self.keep.float().mean()


# ----------------------------------------------------------------------------- reference


def topk_keep(key: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[P, G]`` bool: the ``top_k`` highest and ``top_k`` lowest finite entries of each row of ``key`` (ties:
    the lower index ranks higher; every finite entry when ``2 * top_k >= `` their count)."""
    valid = torch.isfinite(key)
    # Descending stable sort puts ties in index order; invalid entries (-inf key) go last.
    order = torch.sort(torch.where(valid, key, float("-inf")), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(key.shape[1], device=key.device).expand_as(order))
    n_valid = valid.sum(1, keepdim=True)
    return valid & ((rank < top_k) | (rank >= n_valid - top_k))


def group_advantages_reference(r: torch.Tensor, *, std: str = "group", unbiased: bool = False, eps: float = 1e-4,
                               clip: float | None = None, top_k: int | None = None, stats_over: str = "kept",
                               drop_zero_std: bool = False, zero_std_tol: float = 0.0):
    """Plain PyTorch SPEC §3.1 on ``r [P, G]``; returns (advantages, keep, mean, std)."""
    P, G = r.shape
    r = r.float()
    valid = torch.isfinite(r)
    kept = valid if top_k is None else topk_keep(r, top_k)
    T = kept if stats_over == "kept" else valid

    def stats(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None):
        x = x.double()
        cnt = mask.sum(dim) if dim is not None else mask.sum()
        total = torch.where(mask, x, 0.0).sum(dim) if dim is not None else torch.where(mask, x, 0.0).sum()
        m = total / cnt
        m_b = m.unsqueeze(-1) if dim is not None else m
        d = torch.where(mask, x - m_b, 0.0)
        ss = (d * d).sum(dim) if dim is not None else (d * d).sum()
        s = torch.sqrt(ss / (cnt - int(unbiased)).clamp(min=1))
        return m, torch.where(cnt >= 2, s, torch.zeros_like(s))

    mean, sd = stats(r, T, dim=1)
    if std == "group":
        scale = sd + eps
    elif std == "batch":
        scale = (stats(r, valid)[1] + eps).expand(P)
    else:
        scale = torch.ones_like(sd)
    adv = torch.where(kept, (r.double() - mean[:, None]) / scale[:, None], 0.0)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    if drop_zero_std:
        flat = (sd <= zero_std_tol)[:, None]
        adv = torch.where(flat, 0.0, adv)
        kept = kept & ~flat
    return adv.float(), kept, mean.float(), sd.float()


# ----------------------------------------------------------------------------- Triton kernel

if triton is not None:

    @triton.jit
    def _group_stats(r, T, UNBIASED: tl.constexpr):
        """Mean and std (float64) of the entries of ``r`` selected by mask ``T``; std 0 if |T| < 2."""
        cnt = tl.sum(T.to(tl.int32), axis=0)
        r64 = r.to(tl.float64)
        mean = tl.sum(tl.where(T, r64, 0.0), axis=0) / cnt
        d = tl.where(T, r64 - mean, 0.0)
        denom = (cnt - 1) if UNBIASED else cnt
        var = tl.sum(d * d, axis=0) / tl.maximum(denom, 1).to(tl.float64)
        std = tl.where(cnt >= 2, tl.sqrt(var), 0.0)
        return mean, std

    @triton.jit
    def _group_advantages_kernel(
        R, A, KEEP, MEAN, STD,
        P, G, top_k, eps, clip, zero_std_tol,
        GRID: tl.constexpr,
        BLOCK_G: tl.constexpr, CHUNK: tl.constexpr,
        HAS_TOPK: tl.constexpr, STATS_KEPT: tl.constexpr, UNBIASED: tl.constexpr,
        SCALE_MODE: tl.constexpr,  # 0 group, 1 batch, 2 none
        HAS_CLIP: tl.constexpr, DROP_ZERO: tl.constexpr,
    ):
        """Advantages of SPEC §3.1 for groups pid, pid + GRID, ...  (see module docstring).

        rank_i = #{j in V : r_j > r_i or (r_j == r_i and j < i)}, computed by comparing
        each sample with all others in CHUNK-wide slices (O(G^2) compares, all in registers).
        For SCALE_MODE == 1 (batch) the launch has a single program that first reduces the
        mean and std of every valid reward in the call (two passes), then does the groups.
        """
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK_G)
        in_row = offs < G

        s_batch = tl.zeros((), dtype=tl.float64)
        if SCALE_MODE == 1:
            tot = tl.zeros((), dtype=tl.float64)
            cnt = tl.zeros((), dtype=tl.int32)
            for g in range(0, P):
                r = tl.load(R + g * G + offs, mask=in_row, other=float("nan")).to(tl.float32)
                ok = in_row & (tl.abs(r) < float("inf"))
                tot += tl.sum(tl.where(ok, r.to(tl.float64), 0.0), axis=0)
                cnt += tl.sum(ok.to(tl.int32), axis=0)
            bmean = tot / cnt
            ss = tl.zeros((), dtype=tl.float64)
            for g in range(0, P):
                r = tl.load(R + g * G + offs, mask=in_row, other=float("nan")).to(tl.float32)
                ok = in_row & (tl.abs(r) < float("inf"))
                d = tl.where(ok, r.to(tl.float64) - bmean, 0.0)
                ss += tl.sum(d * d, axis=0)
            denom = (cnt - 1) if UNBIASED else cnt
            s_batch = tl.where(cnt >= 2, tl.sqrt(ss / tl.maximum(denom, 1).to(tl.float64)), 0.0)

        for g in range(pid, P, GRID):
            base = g * G
            r = tl.load(R + base + offs, mask=in_row, other=float("nan")).to(tl.float32)
            valid = in_row & (tl.abs(r) < float("inf"))
            n_valid = tl.sum(valid.to(tl.int32), axis=0)
            if HAS_TOPK:
                rank = tl.zeros((BLOCK_G,), dtype=tl.int32)
                for j0 in range(0, BLOCK_G, CHUNK):  # a loop, not unrolled: G=1000 would unroll 256 tiles
                    offs_j = j0 + tl.arange(0, CHUNK)
                    rj = tl.load(R + base + offs_j, mask=offs_j < G, other=float("nan")).to(tl.float32)
                    vj = (offs_j < G) & (tl.abs(rj) < float("inf"))
                    ahead = (rj[None, :] > r[:, None]) | ((rj[None, :] == r[:, None]) & (offs_j[None, :] < offs[:, None]))
                    rank += tl.sum((ahead & vj[None, :]).to(tl.int32), axis=1)
                kept = valid & ((rank < top_k) | (rank >= n_valid - top_k))
            else:
                kept = valid
            if STATS_KEPT:
                mean, std = _group_stats(r, kept, UNBIASED)
            else:
                mean, std = _group_stats(r, valid, UNBIASED)
            if SCALE_MODE == 0:
                scale = std + eps
            elif SCALE_MODE == 1:
                scale = s_batch + eps
            else:
                scale = tl.full((), 1.0, tl.float64)
            adv = tl.where(kept, (r.to(tl.float64) - mean) / scale, 0.0)
            if HAS_CLIP:
                adv = tl.minimum(tl.maximum(adv, -clip), clip)
            if DROP_ZERO:
                spread = std > zero_std_tol
                adv = tl.where(spread, adv, 0.0)
                kept = tl.where(spread, kept, tl.zeros_like(kept))
            tl.store(A + base + offs, adv.to(tl.float32), mask=in_row)
            tl.store(KEEP + base + offs, kept.to(tl.int8), mask=in_row)
            tl.store(MEAN + g, mean.to(tl.float32))
            tl.store(STD + g, std.to(tl.float32))


    @triton.jit
    def _group_advantages_rows_kernel(
        R, A, KEEP, MEAN, STD,
        P, G, top_k, eps, clip, zero_std_tol,
        ROWS: tl.constexpr, BLOCK_G: tl.constexpr,
        HAS_TOPK: tl.constexpr, STATS_KEPT: tl.constexpr, UNBIASED: tl.constexpr, SCALE_NONE: tl.constexpr,
        HAS_CLIP: tl.constexpr, DROP_ZERO: tl.constexpr,
    ):
        """The same advantages for ROWS groups at once, a [ROWS, BLOCK_G] tile per program (small groups: one
        program per group of 16 would leave most of a program idle; 65,536 groups are 65,536 launches' worth of
        programs). Ranks compare every pair of a row in a [ROWS, BLOCK_G, BLOCK_G] tile; scale "group" or "none"
        (the batch std needs every group first: the one-program kernel above)."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_G)
        row_ok = rows < P
        m2 = row_ok[:, None] & (cols[None, :] < G)
        ptrs = rows[:, None].to(tl.int64) * G + cols[None, :]
        r = tl.load(R + ptrs, mask=m2, other=float("nan")).to(tl.float32)
        valid = m2 & (tl.abs(r) < float("inf"))
        n_valid = tl.sum(valid.to(tl.int32), axis=1)
        if HAS_TOPK:
            ri = r[:, :, None]
            rj = r[:, None, :]
            ahead = (rj > ri) | ((rj == ri) & (cols[None, None, :] < cols[None, :, None]))
            rank = tl.sum((ahead & valid[:, None, :]).to(tl.int32), axis=2)
            kept = valid & ((rank < top_k) | (rank >= n_valid[:, None] - top_k))
        else:
            kept = valid
        if STATS_KEPT:
            T = kept
        else:
            T = valid
        cnt = tl.sum(T.to(tl.int32), axis=1)
        r64 = r.to(tl.float64)
        mean = tl.sum(tl.where(T, r64, 0.0), axis=1) / cnt
        d = tl.where(T, r64 - mean[:, None], 0.0)
        denom = (cnt - 1) if UNBIASED else cnt
        var = tl.sum(d * d, axis=1) / tl.maximum(denom, 1).to(tl.float64)
        std = tl.where(cnt >= 2, tl.sqrt(var), 0.0)
        if SCALE_NONE:
            scale = tl.full((ROWS,), 1.0, tl.float64)
        else:
            scale = std + eps
        adv = tl.where(kept, (r64 - mean[:, None]) / scale[:, None], 0.0)
        if HAS_CLIP:
            adv = tl.minimum(tl.maximum(adv, -clip), clip)
        if DROP_ZERO:
            spread = std > zero_std_tol
            adv = tl.where(spread[:, None], adv, 0.0)
            kept = kept & spread[:, None]
        tl.store(A + ptrs, adv.to(tl.float32), mask=m2)
        tl.store(KEEP + ptrs, kept.to(tl.int8), mask=m2)
        tl.store(MEAN + rows, mean.to(tl.float32), mask=row_ok)
        tl.store(STD + rows, std.to(tl.float32), mask=row_ok)


ROW_TILE = 4096  # elements of the rows kernel's largest tile (its pairwise compare for Top-k)


def rows_per_program(P: int, block_g: int, top_k: bool) -> int:
    """Groups per program of the rows kernel (1: the one-group kernel serves better, e.g. large groups)."""
    from .launch import next_power_of_2

    per_row = block_g * block_g if top_k else block_g
    return max(1, min(ROW_TILE // per_row, next_power_of_2(P)))


def _launch_triton(r: torch.Tensor, *, std: str, unbiased: bool, eps: float, clip: float | None,
                   top_k: int | None, stats_over: str, drop_zero_std: bool, zero_std_tol: float):
    P, G = r.shape
    adv = torch.empty((P, G), dtype=torch.float32, device=r.device)
    keep = torch.empty((P, G), dtype=torch.int8, device=r.device)
    mean = torch.empty(P, dtype=torch.float32, device=r.device)
    sd = torch.empty(P, dtype=torch.float32, device=r.device)
    if P == 0:
        return adv, keep.bool(), mean, sd
    block_g, warps = launch_settings(G, min_block=2, wide=128)
    chunk = min(block_g, max(2, 4096 // block_g))  # keep the [BLOCK_G, CHUNK] compare tile <= 4096
    scale_mode = {"group": 0, "batch": 1, "none": 2}[std]
    rows = rows_per_program(P, block_g, top_k is not None)
    if scale_mode != 1 and rows > 1:
        _group_advantages_rows_kernel[(triton.cdiv(P, rows),)](
            r, adv, keep, mean, sd, P, G, int(top_k or 0), float(eps), float(clip or 0.0), float(zero_std_tol),
            ROWS=rows, BLOCK_G=block_g, HAS_TOPK=top_k is not None, STATS_KEPT=stats_over == "kept",
            UNBIASED=unbiased, SCALE_NONE=scale_mode == 2, HAS_CLIP=clip is not None, DROP_ZERO=drop_zero_std,
            num_warps=4)
        return adv, keep.view(torch.bool), mean, sd
    grid = 1 if scale_mode == 1 else P
    _group_advantages_kernel[(grid,)](
        r, adv, keep, mean, sd, P, G, int(top_k or 0), float(eps), float(clip or 0.0), float(zero_std_tol),
        GRID=grid, BLOCK_G=block_g, CHUNK=chunk, HAS_TOPK=top_k is not None, STATS_KEPT=stats_over == "kept",
        UNBIASED=unbiased, SCALE_MODE=scale_mode, HAS_CLIP=clip is not None, DROP_ZERO=drop_zero_std,
        num_warps=warps,
    )
    return adv, keep.view(torch.bool), mean, sd


# ----------------------------------------------------------------------------- dispatch


def group_advantages(rewards: torch.Tensor, group_size: int | None = None, *, std: StdMode = "group",
                     unbiased: bool = False, eps: float = 1e-4, clip: float | None = None,
                     top_k: int | None = None, stats_over: StatsOver = "kept", drop_zero_std: bool = False,
                     zero_std_tol: float = 0.0, rank_by: torch.Tensor | None = None,
                     backend: str = "auto") -> GroupAdvantages:
    """Group-relative advantages with optional Top-k filtering (SPEC §3.1).

    Args:
        rewards: ``[P, G]`` (P prompts, G samples each) or flat ``[N]`` with ``group_size=G``;
            any float dtype. NaN/inf rewards never enter statistics and get ``keep=False``.
        top_k: keep the top-k and bottom-k valid samples of each group (None keeps all).
        rank_by: a score shaped like ``rewards`` that Top-k ranks by instead of the reward (module docstring).
        stats_over: ``"kept"`` (Spatial-RL) or ``"group"`` (all valid samples, then filter).
        std: ``"group"`` | ``"batch"`` | ``"none"`` (Dr.GRPO).
        backend: ``"auto"`` (fused kernel on CUDA, reference on CPU), ``"triton"``, ``"torch"``,
            or ``"cuda"`` (native extension).

    Returns:
        :class:`GroupAdvantages` with float32 ``advantages`` and bool ``keep`` shaped like
        ``rewards``, and float32 ``mean``/``std`` of shape ``[P]``.
    """
    if not torch.is_tensor(rewards):
        raise TypeError(f"rewards must be a tensor, got {type(rewards).__name__}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating-point tensor, got {rewards.dtype}")
    flat = rewards.dim() == 1
    if flat:
        if group_size is None:
            raise ValueError("flat rewards [N] need group_size")
        if group_size < 1 or rewards.numel() % group_size:
            raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
        r = rewards.reshape(-1, group_size)
    elif rewards.dim() == 2:
        if group_size is not None and group_size != rewards.shape[1]:
            raise ValueError(f"group_size={group_size} disagrees with rewards shape {tuple(rewards.shape)}")
        r = rewards
    else:
        raise ValueError(f"rewards must be [P, G] or [N], got shape {tuple(rewards.shape)}")
    G = r.shape[1]
    if std not in ("group", "batch", "none"):
        raise ValueError(f"std must be 'group', 'batch' or 'none', got {std!r}")
    if stats_over not in ("kept", "group"):
        raise ValueError(f"stats_over must be 'kept' or 'group', got {stats_over!r}")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= G):
        raise ValueError(f"top_k must be an int in [1, G={G}] or None, got {top_k!r}")
    if eps < 0 or (clip is not None and clip <= 0):
        raise ValueError("eps must be >= 0 and clip > 0")
    backend = resolve_backend(backend, r, family="advantages", extra=("cuda",))
    kwargs = dict(std=std, unbiased=unbiased, eps=eps, clip=clip, top_k=top_k, stats_over=stats_over,
                  drop_zero_std=drop_zero_std, zero_std_tol=zero_std_tol)
    if rank_by is not None:
        if top_k is None:
            raise ValueError("rank_by orders the Top-k filter: it needs top_k")
        if rank_by.numel() != r.numel():
            raise ValueError(f"rank_by has {rank_by.numel()} entries for {r.numel()} rewards")
        keep = topk_keep(rank_by.reshape(r.shape).float(), top_k).to(r.device) & torch.isfinite(r)
        if stats_over == "kept":  # outside the key's Top-k a sample leaves as a non-finite reward does
            adv, keep, mean, sd = _dispatch(torch.where(keep, r, float("nan")), backend, {**kwargs, "top_k": None})
        else:  # statistics over the whole group, then the filter
            adv, kept, mean, sd = _dispatch(r, backend, {**kwargs, "top_k": None})
            keep = kept & keep
            adv = torch.where(keep, adv, torch.zeros_like(adv))
    else:
        adv, keep, mean, sd = _dispatch(r, backend, kwargs)
    if flat:
        adv, keep = adv.reshape(-1), keep.reshape(-1)
    return GroupAdvantages(adv, keep, mean, sd)


def _dispatch(r: torch.Tensor, backend: str, kwargs: dict):
    if backend == "torch":
        return group_advantages_reference(r, **kwargs)
    if backend == "compiled":
        return compiled(group_advantages_reference)(r, **kwargs)
    if backend == "triton":
        return _launch_triton(r.contiguous(), **kwargs)
    from . import native  # "cuda"

    return native.group_advantages(r.contiguous(), **kwargs)
