"""group_advantages: Triton (interpreter) and reference vs an independent pure-Python oracle."""

import math
import random

import pytest
import torch
from kernel_device import on_device

from spatialcore.kernels import ADVANTAGE_PRESETS, group_advantages

group_advantages = on_device(group_advantages)


def oracle(rows, *, std="group", unbiased=False, eps=1e-4, clip=None, top_k=None, stats_over="kept",
           drop_zero_std=False, zero_std_tol=0.0):
    """SPEC §3.1 written out with Python lists and floats, one group at a time."""

    def mean_std(xs):
        if not xs:
            return math.nan, 0.0
        m = sum(xs) / len(xs)
        if len(xs) < 2:
            return m, 0.0
        return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - (1 if unbiased else 0)))

    all_valid = [x for row in rows for x in row if math.isfinite(x)]
    s_batch = mean_std(all_valid)[1]
    out_a, out_k, out_m, out_s = [], [], [], []
    for row in rows:
        V = [i for i, x in enumerate(row) if math.isfinite(x)]
        order = sorted(V, key=lambda i: (-row[i], i))
        if top_k is None or 2 * top_k >= len(V):
            S = set(V)
        else:
            S = set(order[:top_k]) | set(order[-top_k:])
        T = S if stats_over == "kept" else set(V)
        m, s = mean_std([row[i] for i in sorted(T)])
        scale = {"group": s + eps, "batch": s_batch + eps, "none": 1.0}[std]
        adv = [(row[i] - m) / scale if i in S else 0.0 for i in range(len(row))]
        if clip is not None:
            adv = [min(max(a, -clip), clip) for a in adv]
        keep = [i in S for i in range(len(row))]
        if drop_zero_std and s <= zero_std_tol:
            adv, keep = [0.0] * len(row), [False] * len(row)
        out_a.append(adv)
        out_k.append(keep)
        out_m.append(m)
        out_s.append(s)
    return out_a, out_k, out_m, out_s


def make_rewards(P, G, seed, *, ties=False, bad=False, flat_group=False):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(P, G, generator=gen)
    if ties:
        r = torch.round(r * 2) / 2  # many exact ties
    if bad and P * G > 2:
        idx = torch.randperm(P * G, generator=gen)[: max(1, P * G // 7)]
        vals = torch.tensor([float("nan"), float("inf"), float("-inf")])
        r.view(-1)[idx] = vals[torch.arange(len(idx)) % 3]
    if flat_group:
        r[0] = 0.3
    return r


def check(r, backend, **kw):
    res = group_advantages(r, backend=backend, **kw)
    a, k, m, s = oracle(r.tolist(), **kw)
    torch.testing.assert_close(res.advantages, torch.tensor(a, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    assert res.keep.dtype == torch.bool
    assert res.keep.tolist() == k
    torch.testing.assert_close(res.mean, torch.tensor(m, dtype=torch.float32), rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(res.std, torch.tensor(s, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    return res


GROUP_SIZES = [1, 2, 3, 7, 24, 100]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("G", GROUP_SIZES)
def test_top_k_regimes(backend, G):
    P = 3
    for top_k in [None, *sorted({1, max(1, G // 4), max(1, (G - 1) // 2), (G + 1) // 2, G})]:
        for stats_over in ("kept", "group"):
            r = make_rewards(P, G, seed=G * 31 + (top_k or 0), ties=G > 3, bad=G >= 7, flat_group=True)
            check(r, backend, top_k=top_k, stats_over=stats_over, unbiased=G % 2 == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("std", ["group", "batch", "none"])
def test_scale_modes_clip_and_drop(backend, std):
    for G, P in ((7, 5), (24, 2)):
        r = make_rewards(P, G, seed=G + P, ties=True, bad=True, flat_group=True)
        check(r, backend, std=std, clip=1.5, top_k=2, drop_zero_std=True)
        check(r, backend, std=std, unbiased=True, eps=1e-6, zero_std_tol=0.3, drop_zero_std=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_presets_match_oracle(backend):
    r = make_rewards(4, 24, seed=7, bad=True)
    for name, preset in ADVANTAGE_PRESETS.items():
        top_k = 6 if name in ("dancegrpo", "spatial_rl") else None
        assert "top_k" not in preset
        check(r, backend, top_k=top_k, **preset)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_edge_groups(backend):
    # All-NaN group, single valid sample, all-equal group, large G with many groups.
    r = torch.tensor([[float("nan")] * 5, [1.0, float("nan"), float("inf"), float("nan"), float("-inf")],
                      [2.0] * 5, [5.0, -1.0, 3.0, 3.0, 0.0]])
    res = check(r, backend, top_k=1)
    assert res.keep[0].sum() == 0 and res.keep[1].tolist() == [True, False, False, False, False]
    assert res.advantages[2].abs().max() == 0  # equal rewards: exactly zero, not eps noise
    res = check(r, backend, drop_zero_std=True)
    assert not res.keep[2].any() and not res.keep[1].any()
    check(make_rewards(37, 256, seed=3, ties=True), backend, top_k=32)


def test_tie_rule_lower_index_first():
    r = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0]])
    # order: 5 (2.0), 0, 1, 2, 3 (ties in index order), 4 (0.0); top-1 = {5}, bottom-1 = {4}.
    res = group_advantages(r, top_k=1, backend="torch")
    assert res.keep.tolist() == [[False, False, False, False, True, True]]
    # top-2 = {5, 0}, bottom-2 = {4, 3}
    res = group_advantages(r, top_k=2, backend="torch")
    assert res.keep.tolist() == [[True, False, False, True, True, True]]
    assert group_advantages(r, top_k=2, backend="triton").keep.tolist() == res.keep.tolist()


def test_flat_input_and_dtypes():
    r = make_rewards(3, 8, seed=1).reshape(-1)
    res = group_advantages(r, group_size=8, top_k=2)
    assert res.advantages.shape == (24,) and res.keep.shape == (24,) and res.mean.shape == (3,)
    ref = group_advantages(r.reshape(3, 8), top_k=2)
    torch.testing.assert_close(res.advantages.reshape(3, 8), ref.advantages)
    half = group_advantages(r.to(torch.bfloat16), group_size=8, backend="triton")
    ref = group_advantages(r.to(torch.bfloat16).float(), group_size=8, backend="torch")
    torch.testing.assert_close(half.advantages, ref.advantages, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    r = torch.randn(2, 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r.reshape(-1))
    with pytest.raises(ValueError, match="do not split"):
        group_advantages(r.reshape(-1), group_size=3)
    with pytest.raises(ValueError, match="top_k"):
        group_advantages(r, top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        group_advantages(r, top_k=0)
    with pytest.raises(ValueError, match="std must be"):
        group_advantages(r, std="global")
    with pytest.raises(TypeError, match="floating"):
        group_advantages(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="backend"):
        group_advantages(r, backend="numpy")


# ---- each preset against the anchor's own formula, written independently of the kernel


def test_preset_trl_formula():
    r = make_rewards(5, 8, seed=11)
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True)  # TRL: torch.std, unbiased
    expected = (r - mean) / (std + 1e-4)
    got = group_advantages(r, **ADVANTAGE_PRESETS["trl"], backend="triton").advantages
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_preset_verl_formula():
    r = make_rewards(6, 5, seed=12)
    scores = r.reshape(-1).tolist()
    expected = []
    for g in range(6):  # verl: per-uid lists, torch.mean / torch.std, eps 1e-6
        group = torch.tensor(scores[g * 5:(g + 1) * 5])
        expected.append((group - group.mean()) / (group.std() + 1e-6))
    got = group_advantages(r.reshape(-1), 5, **ADVANTAGE_PRESETS["verl"], backend="triton").advantages
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_preset_flow_grpo_formula():
    """Written from Flow-GRPO's flow_grpo/stat_tracking.py (PerPromptStatTracker.update, type 'grpo')
    and scripts/train_sd3.py (advantages clamped to +-adv_clip_max = 5): per-prompt mean; std is
    np.std over all rewards of the batch (global_std=True, the shipped default) or over the prompt's
    own rewards (global_std=False); + 1e-4."""
    import numpy as np

    r = make_rewards(3, 12, seed=13) * 4
    r[1] = r[1] * 0.1  # groups of different spread: batch std and per-prompt std differ
    rows = r.numpy().astype(np.float64)
    for preset, global_std in (("flow_grpo", True), ("flow_grpo_per_prompt", False)):
        expected = []
        for row in rows:
            std = (rows.std() if global_std else row.std()) + 1e-4
            expected.append(np.clip((row - row.mean()) / std, -5, 5))
        for backend in ("torch", "triton"):
            got = group_advantages(r, **ADVANTAGE_PRESETS[preset], backend=backend).advantages
            torch.testing.assert_close(got, torch.tensor(np.array(expected), dtype=torch.float32), rtol=1e-5,
                                       atol=1e-5, msg=f"{preset} {backend}")


def test_preset_dancegrpo_best_of_n_formula():
    r = make_rewards(2, 12, seed=14)
    k = 3
    res = group_advantages(r, **ADVANTAGE_PRESETS["dancegrpo"], top_k=k, backend="triton")
    for g in range(2):
        row = r[g]
        adv = (row - row.mean()) / (row.std() + 1e-8)  # stats over the whole group first
        idx = torch.argsort(row, descending=True, stable=True)
        chosen = torch.cat([idx[:k], idx[-k:]])  # then best-k and worst-k are trained
        mask = torch.zeros(12, dtype=torch.bool)
        mask[chosen] = True
        assert res.keep[g].tolist() == mask.tolist()
        torch.testing.assert_close(res.advantages[g], torch.where(mask, adv, 0.0), rtol=1e-5, atol=1e-5)


def test_preset_spatial_rl_formula():
    r = make_rewards(2, 24, seed=15)
    k = 6
    res = group_advantages(r, **ADVANTAGE_PRESETS["spatial_rl"], top_k=k, backend="triton")
    for g in range(2):
        row = r[g]
        idx = torch.argsort(row, descending=True, stable=True)
        kept = torch.cat([idx[:k], idx[-k:]])
        sub = row[kept].double()
        adv = ((sub - sub.mean()) / (sub.std(unbiased=False) + 1e-4)).clamp(-5, 5).float()
        expected = torch.zeros(24)
        expected[kept] = adv
        torch.testing.assert_close(res.advantages[g], expected, rtol=1e-5, atol=1e-5)
        assert res.keep[g].sum() == 2 * k


@pytest.mark.parametrize("G,top_k", [(7, 2), (16, 4), (16, None), (3, 1)])
def test_many_small_groups_several_per_program(G, top_k):
    """Enough groups that the rows kernel spreads them over several programs, the last one partly empty."""
    from spatialcore.kernels.advantages import rows_per_program
    from spatialcore.kernels.launch import launch_settings

    rows = rows_per_program(10**6, launch_settings(G, min_block=2, wide=128)[0], top_k is not None)
    assert rows > 1
    P = 3 * rows + 5
    r = make_rewards(P, G, seed=G, ties=True, bad=True, flat_group=True)
    for kw in (dict(top_k=top_k), dict(top_k=top_k, std="none", clip=1.0, stats_over="group", drop_zero_std=True)):
        check(r, "triton", **kw)


def test_random_fuzz_against_oracle():
    rng = random.Random(0)
    for trial in range(12):
        G = rng.choice([1, 2, 3, 5, 9, 24, 33])
        P = rng.randint(1, 4)
        kw = dict(std=rng.choice(["group", "batch", "none"]), unbiased=rng.random() < 0.5,
                  top_k=rng.choice([None, 1, 2, 5, G]) if G >= 1 else None, stats_over=rng.choice(["kept", "group"]),
                  clip=rng.choice([None, 2.0]), drop_zero_std=rng.random() < 0.5)
        if kw["top_k"] is not None and kw["top_k"] > G:
            kw["top_k"] = G
        r = make_rewards(P, G, seed=trial, ties=rng.random() < 0.5, bad=rng.random() < 0.5)
        check(r, "triton", **kw)
        check(r, "torch", **kw)
