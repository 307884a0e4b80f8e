"""Spatial-RL: sampler vs the stock pipeline, log-prob recomputation, on-policy ratio, Top-k
gradient flow, LoRA export, non-finite rewards, conventions, oracle reward, sample CLI.
(Resume: test_resume.py; ranks, accumulation and nodes: test_equivalence.py.)"""

import json

import numpy as np
import pytest
import torch

from runs import cli_args, records
from spatialcore import kernels
from spatialcore.cli import main
from spatialcore.config import ConfigError, load_config
from spatialcore.errors import TrainingError
from spatialcore.kernels.grpo_loss import flow_grpo_loss_reference
from spatialcore.rl.policy import Policy
from spatialcore.rl.reward_fns import oracle_reward
from spatialcore.rl.sampler import FluxSampler, SamplerConfig, load_pipeline
from spatialcore.trainers import grpo as grpo_mod
from spatialcore.trainers.grpo import GRPOTrainConfig, policy_gradient, train

LEFT = "the red circle is to the left of the blue square"
RIGHT = "the red circle is to the right of the blue square"


@pytest.fixture()
def pipe(tiny_dir):
    return load_pipeline(tiny_dir / "flux")


def _overrides(tiny_dir, out, **extra):
    base = {"model": str(tiny_dir / "flux"), "out": str(out), "prompts": [LEFT, RIGHT], "group_size": 4,
            "prompts_per_iter": 2, "top_k": 1, "iterations": 4, "eval_every": 2, "eval_seeds": 2, "save_every": 2,
            "sampler.steps": 4, "sampler.image_size": 32, "optim.lr": 1e-2, "policy.lora_rank": 4, "policy.lora_alpha": 4,
            "threads": 1}
    base.update(extra)
    return base


def _cfg(tiny_dir, out, **extra):
    return load_config(GRPOTrainConfig, None, cli_args(_overrides(tiny_dir, out, **extra)))


def test_ode_sampler_equals_stock_pipeline(pipe):
    s = FluxSampler(pipe, SamplerConfig(steps=5, image_size=32))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, s.channels, s.latent_hw, s.latent_hw, generator=g)
    lat = pipe._pack_latents(x, 1, s.channels, s.latent_hw, s.latent_hw)
    stock = pipe(LEFT, height=32, width=32, num_inference_steps=5, guidance_scale=3.5, latents=lat,
                 output_type="pt", max_sequence_length=64).images
    ours = s.sample([LEFT], [3], sde=False).images
    # the sampler runs a single row as two (BLAS matrix-matrix instead of matrix-vector path, see
    # FluxSampler.velocity): float32 rounding of a few 1e-6 in pixel values, nothing more
    torch.testing.assert_close(ours, stock, rtol=0, atol=5e-6)


@pytest.mark.parametrize("sde_type,window,compile", [("sde", (0, 0), "none"), ("cps", (1, 3), "none"),
                                                      ("sde", (0, 0), "regional")])
def test_stored_logprobs_equal_recomputation_bit_for_bit(pipe, sde_type, window, compile):
    """The training recomputation of every stored log-prob, in micro-batches of 1, 3 and G rows (the
    trainer's layouts), eager and compiled: the same float32 number in the sampler's layout, within a
    few ulp in the others (bit-identical where the CPU's GEMM does not depend on the row count; an
    AMD EPYC's differs by 1 ulp). The trainer's first PPO ratio is exactly 1 either way: it uses the
    recomputed log-prob as the old one (test_first_inner_step_has_ratio_one_and_later_steps_use_stored)."""
    cfg = SamplerConfig(steps=5, image_size=32, sde_type=sde_type, window_start=window[0], window_size=window[1],
                        compile=compile)
    s = FluxSampler(pipe, cfg)
    G = 6
    prompts, seeds = [LEFT, RIGHT] * 3, list(range(1, G + 1))
    traj = s.sample(prompts, seeds)
    w0, w1 = cfg.window()
    assert traj.log_probs.shape == (G, w1 - w0) and traj.latents.shape[1] == w1 - w0 + 1
    # compiled: no 3-row layout (each row count is one more compilation of every block; 1 and G cover both cases)
    for mb in (1, 3, G) if compile == "none" else (1, G):
        for j in range(w1 - w0):
            for start in range(0, G, mb):
                rows = slice(start, start + mb)
                lp, _, _ = s.step_logprob(traj.latents[rows], j, traj.sigmas, traj.prompt_embeds[rows],
                                          traj.pooled[rows])
                if mb == G:  # the sampler's own layout: the same float32 numbers
                    assert torch.equal(lp, traj.log_probs[rows, j]), (mb, j, start)
                else:  # other row counts: as close as the CPU's GEMM is batch-size invariant (AMD EPYC: 1 ulp)
                    torch.testing.assert_close(lp, traj.log_probs[rows, j], rtol=0, atol=5e-7, msg=str((mb, j, start)))
    if w0:  # steps before the window are the deterministic ODE
        ode = s.sample(prompts, seeds, sde=False)
        x = s.noise(seeds)[0]
        emb, pooled = s.encode(prompts)
        for i in range(w0):
            x = kernels.ode_step(x, s.velocity(x, float(s.sigmas[i]), emb, pooled), float(s.sigmas[i]),
                                 float(s.sigmas[i + 1]))
        assert torch.equal(traj.latents[:, 0], x)
        assert not torch.equal(ode.final, traj.final)


def test_cps_logprob_convention_is_a_sampler_key(pipe):
    """sampler.cps_logprob: Flow-GRPO's -mean((x' - mean)^2) by default, the Gaussian density on request."""
    trajs = {}
    for convention in ("flow_grpo", "gaussian"):
        s = FluxSampler(pipe, SamplerConfig(steps=4, image_size=32, sde_type="cps", window_size=2,
                                            cps_logprob=convention))
        trajs[convention] = s.sample([LEFT, RIGHT], [1, 2])
    flow, gauss = trajs["flow_grpo"], trajs["gaussian"]
    assert torch.equal(flow.latents, gauss.latents)  # same samples, different densities
    x, x_next = flow.latents[:, 0], flow.latents[:, 1]
    with torch.no_grad():
        v = s.velocity(x, float(flow.sigmas[0]), flow.prompt_embeds, flow.pooled)
    _, _, mean, std = kernels.sde_step_reference(x, v, float(flow.sigmas[0]), float(flow.sigmas[1]), 0.7,
                                                 prev_sample=x_next, cps=True)
    sq = (x_next.float() - mean) ** 2
    torch.testing.assert_close(flow.log_probs[:, 0], -sq.mean((1, 2)), rtol=1e-6, atol=0)
    gaussian = -sq / (2 * std[:, None, None] ** 2) - torch.log(std[:, None, None]) - 0.5 * np.log(2 * np.pi)
    torch.testing.assert_close(gauss.log_probs[:, 0], gaussian.mean((1, 2)), rtol=1e-6, atol=1e-6)


def test_sampling_is_a_function_of_the_seed(pipe):
    s = FluxSampler(pipe, SamplerConfig(steps=4, image_size=32))
    a = s.sample([LEFT, LEFT], [5, 6])
    b = s.sample([LEFT], [6])
    assert torch.equal(a.final[1:], b.final)  # whatever the batch it was drawn in
    assert not torch.allclose(a.final[0], a.final[1])


def test_a_single_row_duplicates_only_the_conditioning_not_the_tokens(pipe):
    """A batch of one runs its conditioning linears on two identical rows (test_sampling_is_a_function_of_the_seed)
    but its image and text tokens once: its FLOPs are half of two rows' plus one more row of conditioning, a sliver.
    (The whole transformer on two rows would make them equal to two rows'.)"""
    from torch.utils.flop_counter import FlopCounterMode

    s = FluxSampler(pipe, SamplerConfig(steps=2, image_size=64))
    emb, pooled = s.encode([LEFT, RIGHT])
    x = s.noise([1, 2])[0]
    counts = {}
    for b in (1, 2):
        with torch.no_grad(), FlopCounterMode(display=False) as c:
            s.velocity(x[:b], 0.5, emb[:b], pooled[:b])
        counts[b] = c.get_total_flops()
    assert counts[2] / 2 < counts[1] < 0.6 * counts[2], counts


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
    keep = torch.ones(4, dtype=torch.bool)
    args = (s, policy, traj.latents, traj.log_probs, traj.prompt_embeds, traj.pooled, adv, keep, [0, 1, 2, 3],
            traj.sigmas)
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
    """The trainer's gradient (all rows passed, only kept ones forwarded, micro-batched) equals the
    gradient of the SPEC §3.3 reference loss with the keep mask; a dropped sample cannot leak into it,
    whatever its latents or the advantage it is handed."""
    from spatialcore.kernels import ADVANTAGE_PRESETS, group_advantages

    policy = Policy(pipe.transformer, lora_rank=4)
    with torch.no_grad():  # a non-zero adapter, so every LoRA matrix has a gradient
        for p in policy.params.values():
            p.copy_(torch.randn_like(p) * 0.05)
    s = FluxSampler(pipe, SamplerConfig(steps=3, image_size=32))
    traj = s.sample([LEFT] * 6, list(range(6)))
    rewards = torch.tensor([[0.3, -0.1, 0.7, 0.2, -0.4, 0.05]])
    res = group_advantages(rewards, top_k=2, **ADVANTAGE_PRESETS["spatial_rl"])
    keep, adv = res.keep[0], res.advantages[0]
    assert int(keep.sum()) == 4
    steps = [0, 2]

    def grads(latents, advantages, micro_batch):
        policy_gradient(s, policy, latents, traj.log_probs, traj.prompt_embeds, traj.pooled, advantages, keep, steps,
                        traj.sigmas, n_kept_global=4, clip_range=0.2, kl_beta=0.0, on_policy=False,
                        micro_batch=micro_batch)
        g = {n: p.grad.clone() for n, p in policy.params.items()}
        for p in policy.params.values():
            p.grad = None
        return g

    ours = grads(traj.latents, adv, 3)
    lps = torch.stack([s.step_logprob(traj.latents, j, traj.sigmas, traj.prompt_embeds, traj.pooled)[0]
                       for j in steps], 1)
    flow_grpo_loss_reference(lps, traj.log_probs[:, steps], adv, keep, 0.2).loss.backward()
    ref = {n: p.grad.clone() for n, p in policy.params.items()}
    for p in policy.params.values():
        p.grad = None
    for n in ours:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-4, atol=1e-7, msg=n)
    assert sum(float(g.abs().sum()) for g in ours.values()) > 0
    # dropped rows moved and handed large advantages: not a bit of difference
    moved, loud = traj.latents.clone(), adv.clone()
    moved[~keep] += 1.0
    loud[~keep] = 3.0
    for n, g in grads(moved, loud, 0).items():
        torch.testing.assert_close(g, ours[n], rtol=1e-5, atol=1e-8, msg=n)


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
                            torch.tensor([1.0, -1.0]), torch.ones(2, dtype=torch.bool), [0, 1], traj.sigmas,
                            n_kept_global=2, clip_range=1e-4, kl_beta=0.1, on_policy=True, micro_batch=0)
    assert stats["kl"] > 0


def test_training_forwards_only_kept_samples(tiny_dir, tmp_path, monkeypatch):
    """In the trainer, the rows that reach the policy's forward pass are exactly the kept samples of
    the iteration (checked row by row against the sampled latents and the advantage kernel's keep)."""
    sampled, kept, forwarded = [], [], []
    real_sample, real_step, real_adv = FluxSampler.sample, FluxSampler.step_logprob, kernels.group_advantages

    def sample(self, prompts, seeds, **kw):
        traj = real_sample(self, prompts, seeds, **kw)
        if kw.get("sde", True):
            sampled.append(traj.latents)
        return traj

    def step_logprob(self, latents, j, *a, **kw):
        if j == 0:
            forwarded[-1].append(latents)
        return real_step(self, latents, j, *a, **kw)

    def group_advantages(*a, **kw):
        res = real_adv(*a, **kw)
        kept.append(res.keep.reshape(-1))
        forwarded.append([])
        return res

    monkeypatch.setattr(FluxSampler, "sample", sample)
    monkeypatch.setattr(FluxSampler, "step_logprob", step_logprob)
    monkeypatch.setattr(kernels, "group_advantages", group_advantages)
    train(_cfg(tiny_dir, tmp_path / "run", iterations=2, save_grids=False, warmup_prompts=[LEFT],
               warmup_iterations=1, micro_batch=3, train_timesteps=4))
    prompts = [r["group_prompts"] for r in records(tmp_path / "run") if "group_prompts" in r]
    assert prompts[0] == [LEFT, LEFT] and sorted(prompts[1]) == [LEFT, RIGHT]  # warm-up, then both
    assert len(sampled) == len(kept) == len(forwarded) == 2
    for latents, keep, rows in zip(sampled, kept, forwarded, strict=True):
        assert int(keep.sum()) == 4  # top_k=1 of G=4 keeps 2 of 4 in each of 2 groups
        assert torch.equal(torch.cat(rows), latents[keep])  # micro-batches of 3: 3 + 1 rows, in order


def test_common_noise_pairs_groups_of_different_prompts(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path, group_size=3, prompts_per_iter=3, top_k=None)
    groups = np.array([0, 1, 0])
    plain = grpo_mod.iteration_seeds(cfg, 5, groups, list(range(9)))
    assert len(set(plain)) == 9
    cfg.common_noise = True
    common = grpo_mod.iteration_seeds(cfg, 5, groups, list(range(9)))
    assert common[0:3] == common[3:6]  # first group of prompt 0 and of prompt 1: same noise
    assert len(set(common[6:9]) & set(common[0:3])) == 0  # prompt 0's second group differs
    assert grpo_mod.iteration_seeds(cfg, 6, groups, [0]) != common[:1]


def test_shared_initial_noise_per_group(tiny_dir, tmp_path, monkeypatch):
    """init_noise=per_group (DanceGRPO's shared initialisation): the samples of a group start from one initial
    latent and differ by their SDE noise; groups differ; per_sample (the default) gives every sample its own."""
    seen = []
    real = FluxSampler.sample

    def spy(self, prompts, seeds, **kw):
        traj = real(self, prompts, seeds, **kw)
        if kw.get("sde", True):
            seen.append(traj)
        return traj

    monkeypatch.setattr(FluxSampler, "sample", spy)
    for mode in ("per_group", "per_sample"):
        seen.clear()
        train(_cfg(tiny_dir, tmp_path / mode, iterations=1, eval_every=5, init_noise=mode, group_size=3))
        (traj,) = seen
        start, end = traj.latents[:, 0], traj.final
        if mode == "per_group":
            assert torch.equal(start[0], start[1]) and torch.equal(start[0], start[2])
            assert not torch.equal(start[0], start[3]) and torch.equal(start[3], start[5])
        else:
            assert all(not torch.equal(start[0], start[k]) for k in range(1, 6))
        assert all(not torch.equal(end[0], end[k]) for k in (1, 2))  # the SDE noise still differs


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


def test_config_errors_name_the_key(tiny_dir, tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="top_k"):
        _cfg(tiny_dir, tmp_path, top_k=3).check()
    with pytest.raises(ConfigError, match="window_size"):
        _cfg(tiny_dir, tmp_path, **{"sampler.sde_type": "cps", "sampler.window_size": 4})
    with pytest.raises(ConfigError, match=r"reward\.spatialscore\.model"):
        _cfg(tiny_dir, tmp_path, **{"reward.name": "spatialscore"}).check()
    # the former flat keys name their new place; a section given a value says it is a section
    with pytest.raises(ConfigError, match=r"'reward_model'.*was replaced by 'reward\.spatialscore\.model'"):
        _cfg(tiny_dir, tmp_path, reward_model="x")
    with pytest.raises(ConfigError, match=r"'lr'.*was replaced by 'optim\.lr'"):
        _cfg(tiny_dir, tmp_path, lr=0.1)
    with pytest.raises(ConfigError, match=r"'reward'.*is a section \(name, batch, oracle, spatialscore, python, weights\)"):
        _cfg(tiny_dir, tmp_path, reward="oracle")
    assert main(["grpo", "train", f"model={tiny_dir / 'flux'}", "prompts=[\"x\"]", "group_size=4", "top_k=3"]) == 2
    assert "top_k" in capsys.readouterr().err
    # 2 x 4 samples per iteration cannot be spread evenly over 3 ranks: refused before any model
    import spatialcore.dist
    import spatialcore.rl.sampler

    monkeypatch.setattr(spatialcore.dist, "init", lambda: (0, 3, torch.device("cpu")))
    monkeypatch.setattr(spatialcore.rl.sampler, "load_pipeline", None)  # building a model would fail loudly
    with pytest.raises(ConfigError, match="prompts_per_iter"):
        grpo_mod.GRPOTrainer(_cfg(tiny_dir, tmp_path / "three"))


def test_top_k_follows_the_preset_unless_given(tiny_dir, tmp_path):
    """top_k: preset (the default) is the advantage preset's K; null is off, the one spelling the kernel has
    too; 0 is refused naming the key."""
    assert _cfg(tiny_dir, tmp_path, top_k="preset", advantage="flow_grpo").resolved_top_k() is None
    assert _cfg(tiny_dir, tmp_path, top_k="preset", advantage="spatial_rl", group_size=24).resolved_top_k() == 6
    assert GRPOTrainConfig().top_k == "preset"
    assert _cfg(tiny_dir, tmp_path, top_k=None, advantage="spatial_rl").resolved_top_k() is None
    assert _cfg(tiny_dir, tmp_path, top_k=2, advantage="trl", group_size=8).resolved_top_k() == 2
    with pytest.raises(ConfigError, match=r"'top_k'.*top_k: null to keep every sample"):
        _cfg(tiny_dir, tmp_path, top_k=0)
    assert GRPOTrainConfig().drop_zero_std and GRPOTrainConfig().kl_convention == "flow_grpo"


def test_nonfinite_rewards_train_on_the_rest_and_a_bad_streak_stops(tiny_dir, tmp_path, monkeypatch):
    """Iteration 1: a NaN in group 0, an inf in group 1 whose finite rewards are all equal (zero std):
    the three finite samples of group 0 train (flow_grpo preset: no Top-k, which would keep two;
    zero-std groups dropped), metrics stay finite and count the bad rewards. Iterations 2-3: no finite reward at all -> stop after max_bad_iterations
    with the iteration-1 checkpoint intact and no checkpoint written during the streak."""
    calls = []

    def reward(images, prompts):
        if len(prompts) == 2:  # held-out evaluation (2 prompts x 1 seed)
            return torch.zeros(2)
        calls.append(len(prompts))
        if len(calls) == 1:
            return torch.tensor([float("nan"), 0.3, 0.1, -0.2, float("inf"), 0.5, 0.5, 0.5])
        return torch.full((8,), float("nan"))

    monkeypatch.setattr(grpo_mod, "make_reward", lambda *a, **k: reward)
    run = tmp_path / "run"
    cfg = _cfg(tiny_dir, run, iterations=5, advantage="flow_grpo", top_k=None, save_every=1, eval_every=100,
               eval_seeds=1, max_bad_iterations=2, save_grids=False)
    with pytest.raises(TrainingError, match="2 iterations in a row without a finite reward"):
        train(cfg)
    recs = [r for r in records(run) if r["step"] > 0]
    assert [r["step"] for r in recs] == [1, 2]  # the third iteration raised before logging
    first = recs[0]
    assert first["nonfinite"] == 2 and first["kept_fraction"] == 3 / 8 and first["zero_std_fraction"] == 0.5
    assert first["grad_norm"] > 0 and np.isfinite([first["reward_mean"], first["reward_std"], first["loss"]]).all()
    assert recs[1]["nonfinite"] == 8 and recs[1]["kept_fraction"] == 0
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000001"] and (run / "checkpoints" / "latest").read_text() == "step_00000001"


def test_lora_export_round_trip(tiny_dir, tmp_path):
    """The saved policy in a stock FluxPipeline (load_lora_weights; or the merged transformer) draws
    the in-memory policy's images for the same seeds. alpha != rank, so a lost LoRA scale shows."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    pipe = load_pipeline(tiny_dir / "flux")
    policy = Policy(pipe.transformer, lora_rank=4, lora_alpha=12)
    with torch.no_grad():
        for p in policy.params.values():
            p.add_(torch.randn_like(p) * 0.05)
    ema = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in policy.params.items()}  # exported, not the live
    s = FluxSampler(pipe, SamplerConfig(steps=4, image_size=32))
    seeds = [3, 4]
    with policy.swapped(ema):
        ours = s.sample([LEFT, RIGHT], seeds, sde=False).images
    policy.save(tmp_path / "policy", ema, merged=True)

    def stock(pipeline):
        x = s.noise(seeds)[0]
        return pipeline([LEFT, RIGHT], height=32, width=32, num_inference_steps=4, guidance_scale=3.5, latents=x,
                        output_type="pt", max_sequence_length=64).images

    lora = FluxPipeline.from_pretrained(tiny_dir / "flux")
    lora.load_lora_weights(tmp_path / "policy")
    merged = FluxPipeline.from_pretrained(
        tiny_dir / "flux", transformer=FluxTransformer2DModel.from_pretrained(tmp_path / "policy" / "transformer"))
    base = stock(FluxPipeline.from_pretrained(tiny_dir / "flux"))
    assert (ours - base).abs().max() > 1e-3  # the policy draws something else than the base model
    for name, other in (("load_lora_weights", lora), ("merged transformer", merged)):
        assert float((stock(other) - ours).abs().max()) <= 1e-5, name


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_sample_cli_with_trained_policy(tiny_dir, tmp_path, lora_rank):
    from PIL import Image

    run = tmp_path / "run"
    train(_cfg(tiny_dir, run, iterations=2, save_grids=False,
               **{"optim.lr": 0.05 if lora_rank else 1e-2, "policy.lora_rank": lora_rank}))
    assert (run / "policy" / ("pytorch_lora_weights.safetensors" if lora_rank else "transformer")).exists()
    outs = {}
    for name, extra in (("base", []), ("policy", ["--lora", str(run / "policy")])):
        assert main(["sample", "--model", str(tiny_dir / "flux"), "--prompt", LEFT, "--out", str(tmp_path / name),
                     "-n", "2", "--steps", "4", "--size", "32", "--dtype", "float32", *extra]) == 0
        rows = [json.loads(x) for x in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
        assert len(rows) == 2
        outs[name] = np.stack([np.asarray(Image.open(r["image"])) for r in rows])
    assert np.abs(outs["base"].astype(int) - outs["policy"].astype(int)).max() > 0


def test_the_learning_rate_schedule_is_a_function_of_the_step(tiny_dir, tmp_path):
    """The one schedule of every trainer, against its formula: a linear warm-up (step + 1) / w, then a cosine from
    lr to min_lr_ratio x lr over the T - w steps after it (or constant)."""
    import math

    from spatialcore.trainers.optim import lr_factor

    cfg = _cfg(tiny_dir, tmp_path, iterations=11, **{"optim.lr": 1e-3, "optim.schedule": "cosine",
                                                     "optim.min_lr_ratio": 0.1, "optim.warmup_steps": 3})
    lrs = [cfg.optim.lr * lr_factor(cfg.optim, i, 11) for i in range(11)]
    want = [1e-3 * (i + 1) / 3 for i in range(3)] + [1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (i - 3) / 8))
                                                     for i in range(3, 11)]
    assert lrs == pytest.approx(want, rel=1e-12)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    constant = _cfg(tiny_dir, tmp_path, **{"optim.lr": 1e-3}).optim
    assert [lr_factor(constant, i, 11) for i in (0, 7, 10)] == [1.0, 1.0, 1.0]


def test_config_files_load():
    import glob

    files = sorted(glob.glob("configs/grpo/*.yaml"))
    assert len(files) >= 5
    for f in files:
        cfg = load_config(GRPOTrainConfig, f)
        assert cfg.group_size >= 2 * (cfg.resolved_top_k() or 0)


# ----------------------------------------------------------------------------- uncertainty-aware rewards


def _lcb_topk_reference(mu, sigma, lam, k, *, stats_over, unbiased, eps, clip):
    """Written from the definition: per group rank by mu - lam*sigma (stable, descending), keep the first
    k and the last k; advantages from mu over the kept samples (or the whole group), clipped."""
    P, G = mu.shape
    adv, keep = np.zeros((P, G)), np.zeros((P, G), dtype=bool)
    for p in range(P):
        lcb = [mu[p, j] - lam * sigma[p, j] for j in range(G)]
        order = sorted(range(G), key=lambda j: -lcb[j])  # sorted() is stable: ties in index order
        kept = set(order[:k]) | set(order[-k:])
        stats = sorted(kept) if stats_over == "kept" else list(range(G))
        vals = np.array([mu[p, j] for j in stats], dtype=np.float64)
        sd = vals.std(ddof=1 if unbiased else 0)
        for j in kept:
            keep[p, j] = True
            adv[p, j] = np.clip((mu[p, j] - vals.mean()) / (sd + eps), -clip, clip)
    return adv, keep


@pytest.mark.parametrize("preset", ["spatial_rl", "dancegrpo"])
def test_sigma_aware_top_k_ranks_by_the_lower_bound(preset):
    """Top-k ranked by mu - lambda*sigma keeps other samples than Top-k by mu (the example is built so),
    and the kept samples' advantages come from mu: checked against a loop written from the definition."""
    from spatialcore.kernels import ADVANTAGE_PRESETS, group_advantages

    g = torch.Generator().manual_seed(3)
    mu = torch.randn(3, 7, generator=g)
    sigma = torch.rand(3, 7, generator=g) * 2.0
    sigma[0, mu[0].argmax()] = 10.0  # the best mu is the least certain: its bound ranks it last
    lam, k, kw = 0.7, 2, ADVANTAGE_PRESETS[preset]
    res = group_advantages(mu, top_k=k, rank_by=mu - lam * sigma, drop_zero_std=True, **kw)
    adv, keep = _lcb_topk_reference(mu.double().numpy(), sigma.double().numpy(), lam, k,
                                    stats_over=kw["stats_over"], unbiased=kw["unbiased"], eps=kw["eps"],
                                    clip=kw.get("clip", np.inf))
    assert torch.equal(res.keep, torch.from_numpy(keep))
    np.testing.assert_allclose(res.advantages.numpy(), adv, rtol=1e-5, atol=1e-6)
    plain = group_advantages(mu, top_k=k, drop_zero_std=True, **kw)
    assert not torch.equal(plain.keep, res.keep)


def test_spatialscore_reward_forms():
    from spatialcore.rl.reward_fns import SpatialScoreReward

    class Model:
        def score(self, prompts, images, batch_size):
            return torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.1, 2.0, 0.5])

    images = torch.zeros(3, 3, 8, 8)
    for form, want in [("mu", [0.5, -1.0, 2.0]), ("lcb", [0.5 - 0.3 * 0.1, -1.0 - 0.3 * 2.0, 2.0 - 0.3 * 0.5])]:
        r = SpatialScoreReward.__new__(SpatialScoreReward)
        r.model, r.batch_size, r.form, r.sigma_weight = Model(), 4, form, 0.3
        np.testing.assert_allclose(r(images, ["p"] * 3).numpy(), want, rtol=1e-6)
    with pytest.raises(ValueError, match="form"):
        SpatialScoreReward("unused", form="ucb")


def test_trainer_keeps_the_lower_bound_top_k(tiny_dir, tmp_path, monkeypatch):
    """In the trainer with reward.spatialscore.topk_by=lcb (reward: mu): the logged rewards are mu and
    the samples that reach the update are the lower bound's Top-k, which differ from mu's Top-k here."""

    mu = torch.tensor([0.9, 0.1, 0.5, 0.2, -0.3, 0.8, 0.0, 0.4])
    sigma = torch.tensor([2.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 3.0])
    made = {}

    class Reward:
        def scores(self, images, prompts):
            return (mu, sigma) if len(prompts) == 8 else (torch.zeros(len(prompts)), torch.zeros(len(prompts)))

        def reward(self, m, s):
            return m

        def __call__(self, images, prompts):
            return self.reward(*self.scores(images, prompts))

    kept = []
    real_adv = kernels.group_advantages

    def group_advantages(*a, **kw):
        res = real_adv(*a, **kw)
        kept.append(res.keep.reshape(-1).clone())
        return res

    monkeypatch.setattr(grpo_mod, "make_reward", lambda r, device, name=None: made.update(r=r) or Reward())
    monkeypatch.setattr(kernels, "group_advantages", group_advantages)
    train(_cfg(tiny_dir, tmp_path / "run", iterations=1, save_grids=False, eval_every=100, eval_seeds=1,
               **{"reward.name": "spatialscore", "reward.spatialscore.model": str(tmp_path / "unused"),
                  "reward.spatialscore.sigma_weight": 0.5, "reward.spatialscore.topk_by": "lcb"}))
    assert made["r"].spatialscore.form == "mu" and made["r"].spatialscore.sigma_weight == 0.5
    lcb, by_mu = (mu - 0.5 * sigma).view(2, 4), mu.view(2, 4)
    want, plain = torch.zeros(2, 4, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)
    for p in range(2):  # top_k=1 of 4: the highest and the lowest of each group
        want[p, int(lcb[p].argmax())] = want[p, int(lcb[p].argmin())] = True
        plain[p, int(by_mu[p].argmax())] = plain[p, int(by_mu[p].argmin())] = True
    assert not torch.equal(want, plain)
    assert torch.equal(kept[0], want.reshape(-1))
    rec = [r for r in records(tmp_path / "run") if "reward_mean" in r][0]
    assert rec["reward_mean"] == pytest.approx(float(mu.mean()), rel=1e-6)
    # how much sigma reordered the groups, counted by hand: group 0 (0.9, 0.1, 0.5, 0.2) by the bound
    # (-0.1, 0.05, 0.45, 0.15) flips (0,1), (0,2), (0,3); group 1 (-0.3, 0.8, 0, 0.4) by (-0.35, 0.75, -0.05, -1.1)
    # flips (0,3) and (2,3): 5 of 12 pairs
    assert rec["sigma_flips"] == pytest.approx(5 / 12)


def test_order_flips_counts_the_pairs_two_scores_order_differently():
    """Against a loop over every within-group pair; NaN samples leave their pairs out, a one-sided tie counts."""
    from spatialcore.rl.reward_fns import order_flips

    g = torch.Generator().manual_seed(5)
    a = torch.randn(4, 9, generator=g)
    b = a - 1.5 * torch.rand(4, 9, generator=g)
    a[1, 3] = float("nan")
    b[2, 5] = float("inf")
    b[3, 0], b[3, 1] = 0.25, 0.25  # tied in b, not in a
    n = flips = 0
    for p in range(4):
        for i in range(9):
            for j in range(i + 1, 9):
                if all(np.isfinite(float(t[p, x])) for t in (a, b) for x in (i, j)):
                    n += 1
                    flips += np.sign(float(a[p, i] - a[p, j])) != np.sign(float(b[p, i] - b[p, j]))
    assert order_flips(a, b) == pytest.approx(flips / n)
    assert 0 < flips < n and order_flips(a, a) == 0.0
    assert np.isnan(order_flips(torch.full((2, 1), 1.0), torch.full((2, 1), 1.0)))
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        order_flips(a, b[:, :3])


def test_sigma_keys_need_the_spatialscore_reward(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"reward\.spatialscore\.topk_by.*no sigma"):
        _cfg(tiny_dir, tmp_path, **{"reward.spatialscore.topk_by": "lcb"})


def test_sigma_aware_reward_refuses_a_model_without_a_variance_head(tiny_dir, tmp_path):
    """A SpatialScore trained with variance_head: false has sigma = 0: mu - lambda x sigma would silently be mu."""
    from spatialcore.reward.model import SpatialScore

    SpatialScore.from_backbone(tiny_dir / "reward", variance_head=False).save_pretrained(tmp_path / "bt")
    SpatialScore.from_backbone(tiny_dir / "reward", variance_head=True).save_pretrained(tmp_path / "gauss")
    for key in ("reward.spatialscore.form", "reward.spatialscore.topk_by"):
        cfg = _cfg(tiny_dir, tmp_path / "run", iterations=1, **{"reward.name": "spatialscore", key: "lcb",
                                                                 "reward.spatialscore.model": str(tmp_path / "bt")})
        with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*variance head"):
            train(cfg)
    ok = _cfg(tiny_dir, tmp_path / "run2", iterations=1, eval_every=100, save_grids=False, **{"reward.name": "spatialscore",
                                                             "reward.spatialscore.form": "lcb",
                                                             "reward.spatialscore.model": str(tmp_path / "gauss")})
    train(ok)  # a Gaussian head is accepted


def test_prompts_from_a_file(tiny_dir, tmp_path, capsys):
    """prompts_file (one per line, or JSON Lines with "prompt") trains on the file's prompts and, without
    held-out ones, evaluates on them; eval_prompts_file gives the held-out set; a bad file is one line, exit 2."""
    text = tmp_path / "train.txt"
    text.write_text(f"{LEFT}\n\n{RIGHT}\n")
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"prompt": "the red circle is above the blue square"}) + "\n")
    out = tmp_path / "run"
    train(_cfg(tiny_dir, out, prompts=[], prompts_file=str(text), eval_prompts_file=str(held), iterations=1,
               eval_every=1))
    assert set(next(r for r in records(out) if "group_prompts" in r)["group_prompts"]) <= {LEFT, RIGHT}
    trainer = grpo_mod.GRPOTrainer(_cfg(tiny_dir, tmp_path / "again", prompts=[], prompts_file=str(text),
                                              eval_prompts_file=str(held)))
    assert trainer.train_prompts == [LEFT, RIGHT]
    assert trainer.eval_prompts == ["the red circle is above the blue square"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"caption": "no prompt"}\n')
    capsys.readouterr()
    for args, key in (([f"prompts_file={bad}"], "line 2"), ([f"prompts_file={tmp_path / 'none.txt'}"], "not a file"),
                      ([f"prompts_file={text}", "prompt_stream=easy"], "prompt_stream")):
        code = main(["grpo", "train", *cli_args(_overrides(tiny_dir, tmp_path / "x", prompts=[])), *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and key in err, err


USER_REWARD = '''
import torch

def redness(images, prompts):
    return images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))

def wrong_shape(images, prompts):
    return torch.zeros(len(prompts) + 1)
'''


def test_user_and_weighted_rewards(tiny_dir, tmp_path, capsys):
    """reward.name=python calls the user's function; weighted sums parts and logs each: reward_mean is the
    weighted sum of the parts' means; a bad function is a one-line error."""
    from spatialcore.rl.reward_fns import oracle_reward

    user = tmp_path / "my_reward.py"
    user.write_text(USER_REWARD)
    out = tmp_path / "w"
    train(_cfg(tiny_dir, out, iterations=2, eval_every=5, **{"reward.name": "weighted",
          "reward.weights": {"oracle": 1.0, "python": 0.5}, "reward.python.function": f"{user}:redness"}))
    recs = [r for r in records(out) if "reward_mean" in r]
    for r in recs:
        assert r["reward_mean"] == pytest.approx(r["reward_oracle_mean"] + 0.5 * r["reward_python_mean"], abs=1e-6)
    img = torch.rand(2, 3, 8, 8)
    fn = grpo_mod.GRPOTrainer(_cfg(tiny_dir, tmp_path / "p", **{"reward.name": "python",
                              "reward.python.function": f"{user}:redness"})).reward_fn
    assert torch.allclose(fn(img, [LEFT, RIGHT]), img[:, 0].mean((1, 2)) - img[:, 2].mean((1, 2)))
    both = grpo_mod.GRPOTrainer(_cfg(tiny_dir, tmp_path / "q", **{"reward.name": "weighted", "reward.weights":
                                {"oracle": 2.0, "python": -1.0}, "reward.python.function": f"{user}:redness"})).reward_fn
    assert torch.allclose(both(img, [LEFT, RIGHT]), 2 * oracle_reward(img, [LEFT, RIGHT]) - fn(img, [LEFT, RIGHT]))
    capsys.readouterr()
    for extra, code, key in (({"reward.name": "python", "reward.python.function": "nope"}, 2, "reward.python.function"),
                             ({"reward.name": "python", "reward.python.function": f"{user}:missing"}, 2, "missing"),
                             ({"reward.name": "weighted", "reward.weights": {"pickscore": 1.0}}, 2, "reward.weights"),
                             ({"reward.name": "python", "reward.python.function": f"{user}:wrong_shape"}, 1, "shape")):
        assert main(["grpo", "train", *cli_args(_overrides(tiny_dir, tmp_path / key, **extra))]) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert key in err[-1] and not any("Traceback" in e for e in err), err


def test_judge_reward_is_the_evaluations_verdict():
    """form='judge' on rendered easy_grid pairs against the perfect prompt: the perfect image 1, a flipped
    relation 0, a dropped object -1 (the values of spatialcore eval's judge, which is tested by value)."""
    import numpy as np

    from spatialcore.config import from_dict
    from spatialcore.data.synth import DIFFICULTIES, SynthConfig, make_pair
    from spatialcore.eval.judge import judge_reward

    cfg = from_dict(SynthConfig, DIFFICULTIES["easy_grid"], "stream")
    by_type = {}
    for i in range(60):
        pair = make_pair(cfg, "judge-test", i)
        by_type.setdefault(pair.record["perturbations"][0], pair)
    assert {"flip", "drop"} <= set(by_type)

    def t(im):
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)

    flip, drop = by_type["flip"], by_type["drop"]
    images = torch.stack([t(flip.chosen), t(flip.rejected), t(drop.rejected)])
    prompts = [flip.record["prompt"], flip.record["prompt"], drop.record["prompt"]]
    assert judge_reward(images, prompts).tolist() == [1.0, 0.0, -1.0]
    with pytest.raises(ValueError, match="synthetic-grammar"):
        judge_reward(images[:1], ["a photo of a cat"])


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_the_export_is_in_the_base_dtype_and_loads_in_stock_diffusers(tmp_path, capfd, lora_rank):
    """A policy trained in float32 from the committed float16 generator is exported in float16 (the weights are
    the trained ones rounded), says so in spatialcore_export.json and the final log line, and the stock pipeline
    loaded the way that line says draws with it."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import load_file

    from spatialcore.checkpoint import load_checkpoint, resume_checkpoint

    base = "assets/tiny_generator"
    run = tmp_path / "run"
    train(load_config(GRPOTrainConfig, None, cli_args({
        "model": base, "out": str(run), "prompts": [LEFT, RIGHT], "group_size": 4, "top_k": 1, "iterations": 1,
        "eval_every": 1, "eval_seeds": 1, "save_grids": False, "sampler.steps": 3, "sampler.image_size": 32,
        "sampler.max_sequence_length": 32, "optim.lr": 1e-3, "policy.lora_rank": lora_rank, "threads": 1})))
    policy = run / "policy"
    assert json.loads((policy / "spatialcore_export.json").read_text()) == {
        "kind": "lora" if lora_rank else "full", "dtype": "float16"}
    assert "(float16); with stock diffusers: " in capfd.readouterr().err
    trained = load_checkpoint(resume_checkpoint(run))[0]
    if lora_rank:
        saved = load_file(policy / "pytorch_lora_weights.safetensors")
        assert all(t.dtype == torch.float16 for t in saved.values()) and len(saved) == len(trained)
        pipe = FluxPipeline.from_pretrained(base, dtype=torch.float16)
        pipe.load_lora_weights(policy)
    else:
        saved = load_file(policy / "transformer" / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(saved[k], v.half()) for k, v in trained.items()) and len(saved) == len(trained)
        pipe = FluxPipeline.from_pretrained(base, transformer=FluxTransformer2DModel.from_pretrained(
            policy / "transformer", dtype=torch.float16), dtype=torch.float16)
    img = pipe(LEFT, height=32, width=32, num_inference_steps=3, max_sequence_length=32, output_type="pt").images
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()


def test_every_sampler_call_is_bounded_by_sample_batch(tiny_dir, tmp_path, monkeypatch):
    """Training and held-out evaluation both draw through calls of at most sample_batch samples (the evaluation of
    the reference config samples 256 images per rank: at once, its decode alone would not fit a GPU), and the
    evaluation's numbers do not depend on the batch."""
    sizes, real = [], FluxSampler.sample

    def spy(self, prompts, seeds, **kw):
        sizes.append((kw.get("sde", True), len(prompts)))
        return real(self, prompts, seeds, **kw)

    monkeypatch.setattr(FluxSampler, "sample", spy)
    runs = {}
    for batch in (0, 3):
        sizes.clear()
        train(_cfg(tiny_dir, tmp_path / str(batch), iterations=1, eval_every=1, eval_seeds=4, sample_batch=batch,
                   save_grids=False))
        runs[batch] = [r for r in records(tmp_path / str(batch)) if "eval_reward" in r]
        evals = [n for sde, n in sizes if not sde]
        assert sum(evals) == 2 * 2 * 4  # before and after the iteration: 2 prompts x 4 seeds each
        assert max(n for _, n in sizes) == (8 if batch == 0 else 3)
    for a, b in zip(runs[0], runs[3], strict=True):
        assert a["eval_reward"] == pytest.approx(b["eval_reward"], abs=1e-5)


def test_the_text_embedding_cache_is_bounded(pipe):
    """The sampler keeps the embeddings of the last text_cache prompts only (FLUX.1-dev's are ~4 MiB each: a run
    over thousands of prompts would otherwise fill the GPU), and an evicted prompt is encoded again to the same
    numbers."""
    s = FluxSampler(pipe, SamplerConfig(steps=2, image_size=32, text_cache=2))
    prompts = [LEFT, RIGHT, "the red circle is above the blue square", "the red circle is below the blue square"]
    first = [s.encode([p]) for p in prompts]
    assert list(s._text_cache) == prompts[2:]
    again = s.encode(prompts[:1])
    assert list(s._text_cache) == [prompts[3], prompts[0]]
    torch.testing.assert_close(again, first[0], rtol=0, atol=1e-6)
    assert len(FluxSampler(pipe, SamplerConfig(steps=2, image_size=32, text_cache=0)).encode(prompts)[0]) == 4
