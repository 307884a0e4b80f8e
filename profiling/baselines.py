"""Baselines written from the anchors' documented formulas, for same-run comparisons.

* ``trl_style``: TRL GRPOTrainer's grouped mean/std with ``repeat_interleave`` and eager
  ops, plus a Top-k filter in the same eager style (sort, rank, mask).
* ``verl_style``: verl's vectorised GRPO outcome advantage: prompt ids -> ``torch.unique``
  (a host sync), scatter-add sums and counts per group, gather back, and a second host sync
  for the number of kept samples that an eager trainer reads to size its backward batch.

Both follow SPEC §3.1 with stats over the kept samples when ``top_k`` is given (Spatial-RL),
so they produce the same numbers as ``spatialcore.kernels.group_advantages`` (tested).
"""

from __future__ import annotations

import torch


def trl_style(rewards: torch.Tensor, G: int, top_k: int | None = None, eps: float = 1e-4):
    r = rewards.reshape(-1)
    grouped = r.view(-1, G)
    if top_k is not None and 2 * top_k < G:
        order = torch.argsort(grouped, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(G, device=r.device).repeat(grouped.shape[0], 1))
        keep = (rank < top_k) | (rank >= G - top_k)
    else:
        keep = torch.ones_like(grouped, dtype=torch.bool)
    kept = torch.where(keep, grouped, torch.zeros_like(grouped))
    n = keep.sum(dim=1)
    mean_grouped = kept.sum(dim=1) / n
    mean = mean_grouped.repeat_interleave(G, dim=0)
    sq = torch.where(keep, (grouped - mean_grouped.unsqueeze(1)) ** 2, torch.zeros_like(grouped))
    std_grouped = torch.sqrt(sq.sum(dim=1) / n)
    std = std_grouped.repeat_interleave(G, dim=0)
    advantages = r - mean
    advantages = advantages / (std + eps)
    advantages = advantages * keep.reshape(-1)
    return advantages.clamp(-5.0, 5.0), keep.reshape(-1)


def verl_style(rewards: torch.Tensor, index: torch.Tensor, top_k: int | None = None, eps: float = 1e-4):
    r = rewards.reshape(-1)
    uniq, inverse = torch.unique(index, return_inverse=True)  # host sync: number of groups
    P = uniq.numel()
    G = r.numel() // P
    if top_k is not None and 2 * top_k < G:
        order = torch.argsort(r.view(P, G), dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(G, device=r.device).expand(P, G))
        keep = ((rank < top_k) | (rank >= G - top_k)).reshape(-1)
    else:
        keep = torch.ones_like(r, dtype=torch.bool)
    w = keep.to(r.dtype)
    count = torch.zeros(P, device=r.device, dtype=r.dtype).index_add_(0, inverse, w)
    total = torch.zeros(P, device=r.device, dtype=r.dtype).index_add_(0, inverse, r * w)
    mean = total / count
    dev = (r - mean[inverse]) * w
    var = torch.zeros(P, device=r.device, dtype=r.dtype).index_add_(0, inverse, dev * dev) / count
    adv = dev / (torch.sqrt(var)[inverse] + eps)
    n_kept = int(keep.sum())  # host sync: size of the backward batch
    return adv.clamp(-5.0, 5.0), keep, n_kept
