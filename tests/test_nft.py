"""DiffusionNFT as the Spatial-RL trainer's `objective: nft`: the loss against a formula written from the authors'
code (NVlabs/DiffusionNFT scripts/train_nft_sd3.py, the policy loss and its adaptive weighting), the optimality and
the old policy's decay, and the step in the trainer: the same update on one rank, with accumulation and on two
"nodes", and a resume that restores the old policy."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from runs import cli_args, records, relative_difference, torchrun
from spatialcore.config import ConfigError, load_config
from spatialcore.trainers.grpo import GRPOTrainConfig, train
from spatialcore.trainers.nft import NFTConfig, nft_loss, optimality

LEFT = "the red circle is to the left of the blue square"
RIGHT = "the red circle is to the right of the blue square"


def _reference_loss(v, v_old, x_t, x0, t, r, beta, c, v_ref, kl):
    """One sample at a time, in float64, from the source: positive = beta*v + (1-beta)*old, negative =
    (1+beta)*old - beta*v; x0_pred = x_t - t*pred; each term divided by its detached mean |x0_pred - x0| (>= 1e-5);
    policy loss r*pos/beta + (1-r)*neg/beta times adv_clip_max; + kl * mean((v - v_ref)^2)."""
    out = []
    for b in range(v.shape[0]):
        terms = []
        for pred in (beta * v[b] + (1 - beta) * v_old[b], (1 + beta) * v_old[b] - beta * v[b]):
            x0_pred = x_t[b] - t[b] * pred
            weight = max(np.abs(x0_pred - x0[b]).mean(), 1e-5)
            terms.append(((x0_pred - x0[b]) ** 2).mean() / weight)
        policy = (r[b] * terms[0] / beta + (1 - r[b]) * terms[1] / beta) * c
        out.append(policy + kl * ((v[b] - v_ref[b]) ** 2).mean())
    return np.array(out)


@pytest.mark.parametrize("beta,kl", [(1.0, 1e-4), (0.1, 0.0), (0.37, 0.5)])
def test_the_loss_is_the_sources_formula(beta, kl):
    g = torch.Generator().manual_seed(int(beta * 100))
    shape = (5, 7, 3)  # [B, tokens, channels]
    v, v_old, v_ref, x0, noise = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(5))
    t = torch.tensor([1.0, 0.8, 0.5, 0.13, 0.0], dtype=torch.float64)
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
    r = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0], dtype=torch.float64)
    got = nft_loss(v, v_old, x_t, x0, t, r, beta=beta, clip_max=5.0, v_ref=v_ref, kl_beta=kl)
    want = _reference_loss(*(x.numpy() for x in (v, v_old, x_t, x0, t, r)), beta, 5.0, v_ref.numpy(), kl)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-6)


def test_the_first_steps_update_follows_the_sign_of_the_advantage():
    """With the old policy equal to the current one, the gradient on v moves towards the clean sample for r > 1/2
    and away from it for r < 1/2 (and vanishes at r = 1/2): the direction the paper's derivation gives."""
    g = torch.Generator().manual_seed(0)
    x0, noise, v0 = (torch.randn(3, 8, 4, generator=g) for _ in range(3))
    t = torch.full((3,), 0.6)
    x_t = (1 - 0.6) * x0 + 0.6 * noise
    target = noise - x0  # the velocity that maps x_t to x0
    for r, sign in ((0.9, 1.0), (0.1, -1.0)):
        v = v0.clone().requires_grad_(True)
        nft_loss(v, v0, x_t, x0, t, torch.full((3,), r), beta=1.0, clip_max=5.0).sum().backward()
        step = -v.grad  # gradient descent's direction
        assert sign * float((step * (target - v0)).sum()) > 0
    v = v0.clone().requires_grad_(True)
    nft_loss(v, v0, x_t, x0, t, torch.full((3,), 0.5), beta=1.0, clip_max=5.0).sum().backward()
    assert float(v.grad.abs().max()) < 1e-6


def test_optimality_and_the_old_policys_decay():
    a = torch.tensor([-12.0, -5.0, -2.5, 0.0, 1.0, 5.0, 7.0])
    assert optimality(a, 5.0).tolist() == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0])
    default = NFTConfig()  # their decay_type 1: min(0.001 step, 0.5)
    assert [default.decay(s) for s in (0, 1, 300, 500, 2000)] == pytest.approx([0.0, 0.001, 0.3, 0.5, 0.5])
    ocr = NFTConfig(old_flat=75, old_uprate=0.0075, old_uphold=0.999)  # their decay_type 2
    assert [ocr.decay(s) for s in (10, 75, 175, 400)] == pytest.approx([0.0, 0.0, 0.75, 0.999])


def _overrides(tiny_dir, **extra):
    return {"model": str(tiny_dir / "flux"), "prompts": [LEFT, RIGHT], "objective": "nft", "group_size": 4,
            "prompts_per_iter": 2, "top_k": 1, "iterations": 1, "eval_every": 1, "eval_seeds": 1, "save_grids": False,
            "sampler.steps": 4, "sampler.image_size": 32, "train_timesteps": 3, "policy.lora_rank": 0,
            "optim.name": "sgd", "optim.grad_clip": 0, "optim.lr": 1000.0, "threads": 1, **extra}


def test_the_same_update_on_one_rank_with_accumulation_and_on_two_nodes(tiny_dir, tmp_path):
    from diffusers import FluxTransformer2DModel

    def run(name, **extra):
        return cli_args({**_overrides(tiny_dir, **extra), "out": str(tmp_path / name)})

    train(load_config(GRPOTrainConfig, None, run("one")))
    train(load_config(GRPOTrainConfig, None, run("accum", micro_batch=1)))
    torchrun(["grpo", "train", *run("nodes")], nnodes=2)
    base = dict(FluxTransformer2DModel.from_pretrained(tiny_dir / "flux" / "transformer").state_dict())
    first = [r for r in records(tmp_path / "one") if r["step"] == 1][0]
    w_one = load_file(tmp_path / "one" / "policy" / "transformer" / "diffusion_pytorch_model.safetensors")
    for name in ("accum", "nodes"):
        rec = [r for r in records(tmp_path / name) if r["step"] == 1][0]
        assert rec["kept_fraction"] == first["kept_fraction"] == 0.5
        assert math.isclose(rec["loss"], first["loss"], rel_tol=1e-5) and math.isclose(rec["r_mean"], first["r_mean"],
                                                                                      rel_tol=1e-6)
        assert math.isclose(rec["grad_norm"], first["grad_norm"], rel_tol=1e-5), name
        w = load_file(tmp_path / name / "policy" / "transformer" / "diffusion_pytorch_model.safetensors")
        rel, moved = relative_difference(w_one, w, base)
        assert moved > 1e-2 and rel <= 1e-5, (name, rel, moved)


@pytest.mark.parametrize("micro_batch", [0, 5])
def test_the_gradient_is_the_mean_over_kept_samples_and_their_timesteps(tiny_dir, tmp_path, micro_batch):
    """The step forwards (sample, timestep) pairs in micro-batches (5: one cut through a sample's timesteps); its
    gradient is, one pair at a time: the loss at each kept sample's K timesteps and noises (drawn from the sample's
    own seed), against the old policy's and the base's velocities, divided by the global kept count times K."""
    from spatialcore.trainers.grpo import GRPOTrainer
    from spatialcore.trainers.nft import noise_seed

    over = _overrides(tiny_dir, group_size=4, micro_batch=micro_batch, **{"nft.kl_beta": 0.05, "nft.beta": 0.7})
    cfg = load_config(GRPOTrainConfig, None, cli_args({**over, "out": str(tmp_path / "g")}))
    tr = GRPOTrainer(cfg)
    obj, sampler, policy, K, it, n_kept = tr.objective, tr.sampler, tr.policy, cfg.train_timesteps, 7, 6
    with torch.no_grad():  # an old policy apart from the trained one
        obj.old = {n: p + 0.05 * torch.randn_like(p) for n, p in tr.params.items()}
        for p in tr.params.values():
            p.add_(0.02 * torch.randn_like(p))
    traj = tr._sample([LEFT] * 4 + [RIGHT] * 4, list(range(8)), None)
    adv = torch.tensor([2.0, -7.0, 0.3, -1.0, 9.0, 0.0, -2.5, 1.0])
    keep = torch.tensor([True, False, True, True, False, False, True, True])
    schedule = sampler.sigmas[:-1]
    for p in tr.params.values():
        p.grad = None
    for n in keep.nonzero().flatten().tolist():
        g = torch.Generator().manual_seed(noise_seed(cfg.seed, it, tr.mine[n]))
        ts = torch.randperm(len(schedule), generator=g)[:K]
        noise = torch.randn(K, *traj.final.shape[1:], generator=g)
        x0, emb, pooled = traj.final[n:n + 1], traj.prompt_embeds[n:n + 1], traj.pooled[n:n + 1]
        r = optimality(adv[n:n + 1], cfg.nft.adv_clip_max)
        for k in range(K):
            t = schedule[ts[k]].view(1)
            x_t = (1 - t) * x0 + t * noise[k:k + 1]
            with torch.no_grad():
                with policy.swapped(obj.old):
                    v_old = sampler.velocity(x_t, t, emb, pooled)
                with policy.reference() as ref:
                    v_ref = sampler.velocity(x_t, t, emb, pooled, ref)
            loss = nft_loss(sampler.velocity(x_t, t, emb, pooled), v_old, x_t, x0, t, r, beta=0.7, clip_max=5.0,
                            v_ref=v_ref, kl_beta=0.05)
            (loss.sum() / (n_kept * K)).backward()
    want = {n: p.grad.clone() for n, p in tr.params.items()}
    for p in tr.params.values():
        p.grad = None
    obj.accumulate(traj, adv, keep, n_kept, it, 0, [])
    worst = max(float((tr.params[n].grad - w).abs().max() / w.abs().max()) for n, w in want.items())
    assert worst < 1e-4, worst
    assert all(float(w.abs().max()) > 0 for w in want.values())


def test_a_stopped_run_resumes_with_its_old_policy(tiny_dir, tmp_path, capfd):
    """Stopped after iteration 2 and resumed: the same weights at iteration 4 as straight through (the old policy,
    which samples and anchors the loss, is part of the checkpoint)."""
    extra = {"iterations": 4, "save_every": 2, "eval_every": 4, "optim.name": "adamw", "optim.lr": 1e-3,
             "optim.grad_clip": 1.0, "nft.old_uprate": 0.3}
    train(load_config(GRPOTrainConfig, None, cli_args({**_overrides(tiny_dir, **extra), "out": str(tmp_path / "a")})))
    stopped = {**_overrides(tiny_dir, **extra), "out": str(tmp_path / "b")}
    assert train(load_config(GRPOTrainConfig, None, cli_args({**stopped, "stop_after": 2}))) == {}
    train(load_config(GRPOTrainConfig, None, cli_args(stopped)))
    assert "resumed from step 2 " in capfd.readouterr().err
    a = load_file(tmp_path / "a" / "checkpoints" / "step_00000004" / "weights.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step_00000004" / "weights.safetensors")
    assert any(k.startswith("old.") for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[f"old.{k}"], a[k]) for k in a if not k.startswith(("old.", "ema.")))


def test_nft_config_rules(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="'init_noise'.*ODE"):
        load_config(GRPOTrainConfig, None, cli_args({**_overrides(tiny_dir), "init_noise": "per_group"}))
    with pytest.raises(ConfigError, match="'train_timesteps'.*sampling steps"):
        load_config(GRPOTrainConfig, None, cli_args({**_overrides(tiny_dir), "train_timesteps": 5}))
    cfg = load_config(GRPOTrainConfig, None, cli_args({**_overrides(tiny_dir), "sampler.noise_level": 0.0}))
    assert cfg.objective == "nft"  # the ODE needs no SDE noise
