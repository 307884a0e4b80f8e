"""Spatial-RL: sampler vs the stock pipeline, log-prob recomputation, on-policy ratio, Top-k
gradient flow, SIGKILL + resume, torchrun group statistics, oracle reward, sample CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from spatialcore.kernels.grpo_loss import flow_grpo_loss_reference
from spatialcore.trainers import grpo as grpo_mod
from spatialcore.trainers.grpo import TIME_KEYS, GRPOTrainConfig, policy_gradient, train

from spatialcore import kernels
from spatialcore.config import ConfigError, load_config
from spatialcore.policy import Policy
from spatialcore.rewards import oracle_reward
from spatialcore.sampler import FluxSampler, SamplerConfig, load_pipeline

LEFT = "the red circle is to the left of the blue square"
RIGHT = "the red circle is to the right of the blue square"


@pytest.fixture()
def pipe(tiny_dir):
    return load_pipeline(tiny_dir / "flux")


def _overrides(tiny_dir, out, **extra):
    base = {"model": str(tiny_dir / "flux"), "out": str(out), "prompts": [LEFT, RIGHT], "group_size": 4,
            "prompts_per_iter": 2, "top_k": 1, "iterations": 4, "eval_every": 2, "eval_seeds": 2, "save_every": 2,
            "sampler.steps": 4, "sampler.image_size": 32, "lr": 1e-2, "lora_rank": 4, "lora_alpha": 4,
            "threads": 1}
    base.update(extra)
    return base


def _cfg(tiny_dir, out, **extra):
    return load_config(GRPOTrainConfig, None, [f"{k}={json.dumps(v) if isinstance(v, list) else v}"
                                               for k, v in _overrides(tiny_dir, out, **extra).items()])


def _metrics(path):
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIME_KEYS and k != "time"} for r in recs]


def test_ode_sampler_equals_stock_pipeline(pipe):
    s = FluxSampler(pipe, SamplerConfig(steps=5, image_size=32))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, s.channels, s.latent_hw, s.latent_hw, generator=g)
    lat = pipe._pack_latents(x, 1, s.channels, s.latent_hw, s.latent_hw)
    stock = pipe(LEFT, height=32, width=32, num_inference_steps=5, guidance_scale=3.5, latents=lat,
                 output_type="pt", max_sequence_length=64).images
    ours = s.sample([LEFT], [3], sde=False).images
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sde_type,window", [("sde", (0, 0)), ("cps", (1, 3))])
def test_stored_logprobs_equal_recomputation(pipe, sde_type, window):
    cfg = SamplerConfig(steps=5, image_size=32, sde_type=sde_type, window_start=window[0], window_size=window[1])
    s = FluxSampler(pipe, cfg)
    prompts, seeds = [LEFT, RIGHT, LEFT], [1, 2, 3]
    traj = s.sample(prompts, seeds)
    w0, w1 = cfg.window()
    assert traj.log_probs.shape == (3, w1 - w0) and traj.latents.shape[1] == w1 - w0 + 1
    for j in range(w1 - w0):
        lp, _, _ = s.step_logprob(traj.latents, j, traj.sigmas, traj.prompt_embeds, traj.pooled)
        torch.testing.assert_close(lp, traj.log_probs[:, j], rtol=0, atol=1e-6)
        # a different row layout (a subset, as the trainer does) recomputes the same numbers
        lp1, _, _ = s.step_logprob(traj.latents[1:2], j, traj.sigmas, traj.prompt_embeds[1:2], traj.pooled[1:2])
        torch.testing.assert_close(lp1, traj.log_probs[1:2, j], rtol=0, atol=1e-5)
    if w0:  # steps before the window are the deterministic ODE
        ode = s.sample(prompts, seeds, sde=False)
        x = s.noise(seeds)[0]
        emb, pooled = s.encode(prompts)
        for i in range(w0):
            x = kernels.ode_step(x, s.velocity(x, float(s.sigmas[i]), emb, pooled), float(s.sigmas[i]),
                                 float(s.sigmas[i + 1]))
        torch.testing.assert_close(traj.latents[:, 0], x, rtol=0, atol=1e-6)
        assert not torch.equal(ode.final, traj.final)


def test_sampling_is_a_function_of_the_seed(pipe):
    s = FluxSampler(pipe, SamplerConfig(steps=4, image_size=32))
    a = s.sample([LEFT, LEFT], [5, 6])
    b = s.sample([LEFT], [6])
    torch.testing.assert_close(a.final[1:], b.final, rtol=0, atol=1e-6)
    assert not torch.allclose(a.final[0], a.final[1])


def test_first_inner_step_has_ratio_one_and_later_steps_use_stored(pipe, monkeypatch):
    policy = Policy(pipe.transformer, lora_rank=4)
    s = FluxSampler(pipe, SamplerConfig(steps=4, image_size=32))
    traj = s.sample([LEFT] * 4, [1, 2, 3, 4])
    ratios = []
    real = kernels.flow_grpo_loss

    def spy(new, old, *a, **k):
        ratios.append(torch.exp(new.detach() - old))
        return real(new, old, *a, **k)

    monkeypatch.setattr(kernels, "flow_grpo_loss", spy)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    opt = torch.optim.SGD(list(policy.params.values()), lr=0.5)
    args = (s, policy, traj.latents, traj.log_probs, traj.prompt_embeds, traj.pooled, adv, [0, 1, 2, 3], traj.sigmas)
    stats = policy_gradient(*args, n_kept_global=4, clip_range=1e-4, kl_beta=0.0, on_policy=True, micro_batch=0)
    assert all(torch.equal(r, torch.ones_like(r)) for r in ratios) and len(ratios) == 4
    assert stats["logp_drift"] < 1e-5 and stats["clip_fraction"] == 0.0
    opt.step()
    opt.zero_grad()
    ratios.clear()
    stats = policy_gradient(*args, n_kept_global=4, clip_range=1e-4, kl_beta=0.0, on_policy=False, micro_batch=3)
    assert any(not torch.allclose(r, torch.ones_like(r), rtol=0, atol=1e-7) for r in ratios)
    assert stats["logp_drift"] > 0


def test_gradient_equals_kept_only_reference(pipe):
    """The trainer's gradient (only kept samples forwarded, micro-batched) equals the gradient of the
    SPEC §3.3 reference loss over all samples with the keep mask (dropped samples contribute 0), and
    moving a dropped sample's latents does not change it."""
    from spatialcore.kernels import ADVANTAGE_PRESETS, group_advantages

    policy = Policy(pipe.transformer, lora_rank=4)
    with torch.no_grad():  # a non-zero adapter, so every LoRA matrix has a gradient
        for p in policy.params.values():
            p.copy_(torch.randn_like(p) * 0.05)
    s = FluxSampler(pipe, SamplerConfig(steps=3, image_size=32))
    traj = s.sample([LEFT] * 6, list(range(6)))
    rewards = torch.tensor([[0.3, -0.1, 0.7, 0.2, -0.4, 0.05]])
    res = group_advantages(rewards, top_k=2, **{k: v for k, v in ADVANTAGE_PRESETS["spatial_rl"].items()})
    keep, adv = res.keep[0], res.advantages[0]
    assert int(keep.sum()) == 4
    idx = keep.nonzero().squeeze(1)
    steps = [0, 2]

    def grads():
        g = {n: p.grad.clone() for n, p in policy.params.items()}
        for p in policy.params.values():
            p.grad = None
        return g

    policy_gradient(s, policy, traj.latents[idx], traj.log_probs[idx], traj.prompt_embeds[idx], traj.pooled[idx],
                    adv[idx], steps, traj.sigmas, n_kept_global=4, clip_range=0.2, kl_beta=0.0, on_policy=False,
                    micro_batch=3)
    ours = grads()
    lps = torch.stack([s.step_logprob(traj.latents, j, traj.sigmas, traj.prompt_embeds, traj.pooled)[0]
                       for j in steps], 1)
    flow_grpo_loss_reference(lps, traj.log_probs[:, steps], adv, keep, 0.2).loss.backward()
    ref = grads()
    for n in ours:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-4, atol=1e-7, msg=n)
    assert sum(float(g.abs().sum()) for g in ours.values()) > 0
    moved = traj.latents.clone()
    dropped = (~keep).nonzero().squeeze(1)
    moved[dropped] += 1.0
    keep_idx = idx
    policy_gradient(s, policy, moved[keep_idx], traj.log_probs[keep_idx], traj.prompt_embeds[keep_idx],
                    traj.pooled[keep_idx], adv[keep_idx], steps, traj.sigmas, n_kept_global=4, clip_range=0.2,
                    kl_beta=0.0, on_policy=False, micro_batch=0)
    for n, g in grads().items():
        torch.testing.assert_close(g, ours[n], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_kl_reference_is_the_frozen_policy(pipe, lora_rank):
    """The KL term compares against the adapter-disabled model (LoRA) or the frozen copy (full)."""
    policy = Policy(pipe.transformer, lora_rank=lora_rank, need_reference=True)
    s = FluxSampler(pipe, SamplerConfig(steps=3, image_size=32))
    traj = s.sample([LEFT] * 2, [1, 2])
    args = (traj.latents, 0, traj.sigmas, traj.prompt_embeds, traj.pooled)
    with torch.no_grad():
        for p in policy.params.values():
            p.add_(torch.randn_like(p) * 0.05)
        _, mean_new, _ = s.step_logprob(*args)
        with policy.reference() as ref:
            _, mean_ref, _ = s.step_logprob(*args, ref)
        _, mean_again, _ = s.step_logprob(*args)
    assert not torch.allclose(mean_new, mean_ref, atol=1e-4)
    torch.testing.assert_close(mean_again, mean_new, rtol=0, atol=0)  # the policy is back after the context
    stats = policy_gradient(s, policy, traj.latents, traj.log_probs, traj.prompt_embeds, traj.pooled,
                            torch.tensor([1.0, -1.0]), [0, 1], traj.sigmas, n_kept_global=2, clip_range=1e-4,
                            kl_beta=0.1, on_policy=True, micro_batch=0)
    assert stats["kl"] > 0


def test_training_forwards_only_kept_samples(tiny_dir, tmp_path, monkeypatch):
    seen = []
    real = grpo_mod.policy_gradient

    def spy(sampler, policy, latents, *a, **k):
        seen.append(latents.shape[0])
        return real(sampler, policy, latents, *a, **k)

    monkeypatch.setattr(grpo_mod, "policy_gradient", spy)
    train(_cfg(tiny_dir, tmp_path / "run", iterations=2, save_grids=False, warmup_prompts=[LEFT],
               warmup_iterations=1))
    recs = _metrics(tmp_path / "run" / "metrics.jsonl")
    prompts = [r["group_prompts"] for r in recs if "group_prompts" in r]
    assert prompts[0] == [LEFT, LEFT] and sorted(prompts[1]) == [LEFT, RIGHT]  # warm-up, then both
    kept = [r["kept_fraction"] for r in recs if "kept_fraction" in r]
    assert kept == [0.5, 0.5]  # top_k=1 of G=4 keeps 2 of 4 in each group
    assert seen == [4, 4]  # 2 groups x 2 kept samples per iteration reach the backward pass


def test_killed_run_resumes_to_the_same_weights_and_metrics(tiny_dir, tmp_path):
    straight = tmp_path / "straight"
    train(_cfg(tiny_dir, straight, iterations=8, save_every=2, ema_decay=0.9))
    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "spatialcore.cli", "grpo", "train"] + [
        f"{k}={json.dumps(v) if isinstance(v, list) else v}"
        for k, v in _overrides(tiny_dir, killed, iterations=8, save_every=2, ema_decay=0.9).items()]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_00000004").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "policy").exists(), "the run finished before it was killed"
    train(_cfg(tiny_dir, killed, iterations=8, save_every=2, ema_decay=0.9))
    a = load_file(straight / "policy" / "pytorch_lora_weights.safetensors")
    b = load_file(killed / "policy" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert _metrics(straight / "metrics.jsonl") == _metrics(killed / "metrics.jsonl")
    for png in ("reward.png", "reward_vs_time.png", "samples_before.png", "samples_after.png"):
        assert (killed / png).is_file(), png


def test_torchrun_two_ranks_same_group_statistics(tiny_dir, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun
    extra = {"iterations": 2, "eval_every": 2, "save_every": 2, "group_size": 5, "top_k": 2, "save_grids": False}
    train(_cfg(tiny_dir, tmp_path / "one", **extra))
    args = [torchrun, "--nproc_per_node", "2", "--master_port", "29541", "-m", "spatialcore.cli", "grpo", "train"] + [
        f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in _overrides(tiny_dir, tmp_path / "two",
                                                                                     **extra).items()]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _metrics(tmp_path / "one" / "metrics.jsonl"), _metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for k in ("group_mean", "group_std", "reward_mean", "reward_std", "eval_reward"):
            if k in a:
                np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
        if "kept_fraction" in a:
            assert a["kept_fraction"] == b["kept_fraction"] == 0.8
            np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4, atol=1e-7)
    proc = subprocess.run([sys.executable, "-m", "spatialcore.cli", "grpo", "compare", f"one={tmp_path / 'one'}",
                           f"two={tmp_path / 'two'}", "--out", str(tmp_path / "cmp.png")], capture_output=True, text=True)
    assert proc.returncode == 0 and (tmp_path / "cmp.png").stat().st_size > 0, proc.stderr[-2000:]
    wa = load_file(tmp_path / "one" / "policy" / "pytorch_lora_weights.safetensors")
    wb = load_file(tmp_path / "two" / "policy" / "pytorch_lora_weights.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


def test_common_noise_pairs_groups_of_different_prompts(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path, group_size=3, prompts_per_iter=3, top_k=0)
    groups = np.array([0, 1, 0])
    plain = grpo_mod.iteration_seeds(cfg, 5, groups, list(range(9)))
    assert len(set(plain)) == 9
    cfg.common_noise = True
    common = grpo_mod.iteration_seeds(cfg, 5, groups, list(range(9)))
    assert common[0:3] == common[3:6]  # first group of prompt 0 and of prompt 1: same noise
    assert len(set(common[6:9]) & set(common[0:3])) == 0  # prompt 0's second group differs
    assert grpo_mod.iteration_seeds(cfg, 6, groups, [0]) != common[:1]


@pytest.mark.parametrize("form,least", [("moment", 0.1), ("centroid", 0.3)])
def test_oracle_reward_reads_the_relation(form, least):
    img = torch.full((3, 3, 32, 32), 0.5)
    img[:, :, 12:20, 2:10] = torch.tensor([220, 30, 30]).view(3, 1, 1) / 255  # red on the left
    img[:, :, 12:20, 22:30] = torch.tensor([30, 60, 220]).view(3, 1, 1) / 255  # blue on the right
    up = "the red circle is above the blue square"
    r = oracle_reward(img, [LEFT, RIGHT, up], form=form)
    assert r[0] > least and r[1] < -least and abs(float(r[0] + r[1])) < 1e-6
    assert abs(float(r[2])) < 1e-3  # same height: no vertical evidence either way
    if form == "moment":  # more contrast (more coloured mass in place) is more evidence
        faint = 0.5 + 0.5 * (img - 0.5)
        assert oracle_reward(faint[:1], [LEFT], form=form)[0] < r[0]
    with pytest.raises(ValueError, match="synthetic-grammar"):
        oracle_reward(img[:1], ["a photo of a cat"])


def test_config_errors_name_the_key(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="top_k"):
        _cfg(tiny_dir, tmp_path, top_k=3).check()
    with pytest.raises(ConfigError, match="window_size"):
        _cfg(tiny_dir, tmp_path, **{"sampler.sde_type": "cps", "sampler.window_size": 4})
    with pytest.raises(ConfigError, match="reward_model"):
        _cfg(tiny_dir, tmp_path, reward="spatialscore").check()
    proc = subprocess.run([sys.executable, "-m", "spatialcore.cli", "grpo", "train", f"model={tiny_dir / 'flux'}",
                           "prompts=[\"x\"]", "group_size=4", "top_k=3"], capture_output=True, text=True)
    assert proc.returncode == 2 and "top_k" in proc.stderr


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_sample_cli_with_trained_policy(tiny_dir, tmp_path, lora_rank):
    run = tmp_path / "run"
    train(_cfg(tiny_dir, run, iterations=2, lr=0.05 if lora_rank else 1e-2, lora_rank=lora_rank, save_grids=False))
    assert (run / "policy" / ("pytorch_lora_weights.safetensors" if lora_rank else "transformer")).exists()
    outs = {}
    for name, extra in (("base", []), ("policy", ["--lora", str(run / "policy")])):
        proc = subprocess.run([sys.executable, "-m", "spatialcore.cli", "sample", "--model", str(tiny_dir / "flux"),
                               "--prompt", LEFT, "--out", str(tmp_path / name), "-n", "2", "--steps", "4", "--size",
                               "32", "--dtype", "float32", *extra], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = [json.loads(x) for x in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
        assert len(rows) == 2
        from PIL import Image

        outs[name] = np.stack([np.asarray(Image.open(r["image"])) for r in rows])
    assert np.abs(outs["base"].astype(int) - outs["policy"].astype(int)).max() > 0


def test_cosine_learning_rate_is_a_function_of_the_iteration(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path, lr=1e-3, lr_schedule="cosine", min_lr_ratio=0.1, iterations=11)
    lrs = [grpo_mod.lr_at(cfg, i) for i in range(11)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4) and lrs[5] == pytest.approx(5.5e-4)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert grpo_mod.lr_at(_cfg(tiny_dir, tmp_path, lr=1e-3), 7) == 1e-3


def test_config_files_load():
    import glob

    files = sorted(glob.glob("configs/grpo/*.yaml"))
    assert len(files) >= 5
    for f in files:
        cfg = load_config(GRPOTrainConfig, f)
        assert cfg.group_size >= 2 * cfg.top_k
