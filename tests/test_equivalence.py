"""One config, any number of ranks: 1 process vs 2 ranks (DDP, FSDP2; and 2 "nodes" x 1 process joined
by c10d rendezvous) vs gradient accumulation give the same pre-clip gradient norm and the same
parameter change under plain SGD without clipping (relative difference <= 1e-5) — so a gradient
summed instead of averaged, or divided by the wrong count, fails here even though AdamW would hide
it. Every collective of the multi-process runs goes through tests/dist_guard.py, which checks that
the backend of a CUDA run would serve its tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file

from runs import cli_args, records, relative_difference, torchrun
from spatialcore.config import ConfigError, load_config
from spatialcore.dist import backend_for, served_devices
from spatialcore.trainers import grpo as grpo_mod
from spatialcore.trainers import reward as reward_mod
from spatialcore.trainers.grpo import GRPOTrainConfig
from spatialcore.trainers.reward import RewardTrainConfig

LEFT = "the red circle is to the left of the blue square"
RIGHT = "the red circle is to the right of the blue square"
REL = 1e-5


def _close(a: float, b: float, what: str) -> None:
    assert abs(a - b) <= REL * abs(a), f"{what}: {a} vs {b}"


def _guarded(log, world: int) -> dict:
    """Collective calls the guard checked, summed over ranks (so it cannot have been bypassed)."""
    calls: dict = {}
    for r in range(world):
        for name, n in json.loads(log.with_name(f"{log.name}.{r}.json").read_text()).items():
            calls[name] = calls.get(name, 0) + n
    return calls


def test_the_cuda_process_group_serves_host_tensors():
    assert {"cpu", "cuda"} <= served_devices(backend_for("cuda"))
    assert served_devices("nccl") == {"cuda"} and served_devices("gloo") == {"cpu"}


# ----------------------------------------------------------------------------- Spatial-RL


def test_grpo_same_gradient_on_one_rank_two_nodes_and_with_accumulation(tiny_dir, tmp_path):
    from diffusers import FluxTransformer2DModel

    overrides = {"model": str(tiny_dir / "flux"), "prompts": [LEFT, RIGHT], "group_size": 4, "prompts_per_iter": 2,
                 "top_k": 1, "iterations": 1, "eval_every": 1, "eval_seeds": 1, "save_grids": False,
                 "sampler.steps": 4, "sampler.image_size": 32, "policy.lora_rank": 0, "optim.name": "sgd",
                 "optim.grad_clip": 0, "optim.lr": 1000.0, "threads": 1}

    def run(name, **extra):
        return cli_args({**overrides, "out": str(tmp_path / name), **extra})

    grpo_mod.train(load_config(GRPOTrainConfig, None, run("one")))
    grpo_mod.train(load_config(GRPOTrainConfig, None, run("accum", micro_batch=1)))
    guard = tmp_path / "guard"
    torchrun(["grpo", "train", *run("nodes")], nnodes=2, guard_log=guard)
    calls = _guarded(guard, 2)
    assert calls.get("all_gather", 0) >= 2 and calls.get("all_reduce", 0) >= 2, calls

    base = dict(FluxTransformer2DModel.from_pretrained(tiny_dir / "flux" / "transformer").state_dict())
    first = [r for r in records(tmp_path / "one") if r["step"] == 1][0]
    w_one = load_file(tmp_path / "one" / "policy" / "transformer" / "diffusion_pytorch_model.safetensors")
    for name in ("accum", "nodes"):
        rec = [r for r in records(tmp_path / name) if r["step"] == 1][0]
        assert rec["group_mean"] == pytest.approx(first["group_mean"], abs=1e-6)
        assert rec["kept_fraction"] == first["kept_fraction"] == 0.5
        _close(first["grad_norm"], rec["grad_norm"], f"{name} grad_norm")
        assert abs(first["loss"] - rec["loss"]) <= 1e-6  # on-policy: -mean(A) ~ 0, so compared absolutely
        w = load_file(tmp_path / name / "policy" / "transformer" / "diffusion_pytorch_model.safetensors")
        rel, moved = relative_difference(w_one, w, base)
        assert moved > 1e-2 and rel <= REL, (name, rel, moved)


FSDP_RUN = {"prompts": [LEFT, RIGHT], "group_size": 4, "prompts_per_iter": 2, "top_k": 1, "iterations": 2,
            "eval_every": 2, "eval_seeds": 1, "save_every": 1, "save_grids": False, "sampler.steps": 4,
            "sampler.image_size": 32, "micro_batch": 1, "threads": 1}


def test_grpo_fsdp2_full_fine_tuning_equals_one_rank_and_resumes_across_rank_counts(tiny_dir, tmp_path):
    """Full fine-tuning with the KL reference copy and the EMA, sharded over 2 ranks (FSDP2), = one process
    (plain SGD, no clipping: a gradient averaged instead of summed would move the weights half as far), through a
    checkpoint written by 2 sharded ranks and resumed by 1 process, and the other way round; the exported (EMA)
    transformer is the same."""
    from diffusers import FluxTransformer2DModel

    overrides = {**FSDP_RUN, "model": str(tiny_dir / "flux"), "policy.lora_rank": 0, "policy.ema_decay": 0.5,
                 "kl_beta": 0.05, "optim.name": "sgd", "optim.grad_clip": 0, "optim.lr": 200.0}

    def run(name, **extra):
        return cli_args({**overrides, "out": str(tmp_path / name), "parallel": "fsdp2", **extra})

    grpo_mod.train(load_config(GRPOTrainConfig, None, run("one")))
    guard = tmp_path / "guard"
    torchrun(["grpo", "train", *run("two_then_one"), "stop_after=1"], guard_log=guard)
    assert not (tmp_path / "two_then_one" / "policy").exists()
    grpo_mod.train(load_config(GRPOTrainConfig, None, run("two_then_one")))
    grpo_mod.train(load_config(GRPOTrainConfig, None, run("one_then_two", stop_after=1)))
    torchrun(["grpo", "train", *run("one_then_two")], guard_log=guard)
    calls = _guarded(guard, 2)
    assert calls.get("reduce_scatter_single", 0) > 0 and calls.get("all_gather_single", 0) > 0, calls

    base = dict(FluxTransformer2DModel.from_pretrained(tiny_dir / "flux" / "transformer").state_dict())
    one = records(tmp_path / "one")
    w_one = load_file(tmp_path / "one" / "policy" / "transformer" / "diffusion_pytorch_model.safetensors")
    for name in ("two_then_one", "one_then_two"):
        recs = records(tmp_path / name)
        for step in (1, 2):
            a = [r for r in one if r["step"] == step and "grad_norm" in r][0]
            b = [r for r in recs if r["step"] == step and "grad_norm" in r][0]
            _close(a["grad_norm"], b["grad_norm"], f"{name} step {step} grad_norm")
        w = load_file(tmp_path / name / "policy" / "transformer" / "diffusion_pytorch_model.safetensors")
        rel, moved = relative_difference(w_one, w, base)
        assert moved > 1e-2 and rel <= REL, (name, rel, moved)


def test_grpo_fsdp2_lora_with_a_rank_that_kept_nothing(tiny_dir, tmp_path):
    """A rank whose samples were all filtered out still joins every gather and reduction of the sharded policy
    (micro-batches of weight 0), and the result is the replicated run's: LoRA, AdamW, EMA, stopped after the first
    iteration and resumed (the sharded optimizer state through the checkpoint); the LoRA file and the merged
    transformer the same as ddp's. The reward puts both ends of every group on rank 0; the evaluation gives rank 0
    one sampler call more than rank 1 (rank 1 draws a throw-away sample in step)."""
    reward = tmp_path / "ends_on_rank0.py"
    reward.write_text("import os\nimport torch\n\n\ndef reward(images, prompts):\n"
                      "    if os.environ.get('RANK', '0') == '0':\n"
                      "        return torch.tensor([1.0, -1.0] * len(images))[:len(images)]\n"
                      "    return torch.zeros(len(images))\n")
    overrides = {**FSDP_RUN, "model": str(tiny_dir / "flux"), "policy.lora_rank": 4, "policy.ema_decay": 0.5,
                 "policy.export_merged": True, "reward.name": "python", "reward.python.function": f"{reward}:reward",
                 "optim.lr": 1e-2, "sample_batch": 1,  # 3 held-out samples in calls of 1: 2 calls on rank 0, 1 on rank 1
                 "eval_prompts": [LEFT, RIGHT, "the blue square is above the red circle"]}

    def run(name, **extra):
        return cli_args({**overrides, "out": str(tmp_path / name), **extra})

    torchrun(["grpo", "train", *run("ddp")])
    torchrun(["grpo", "train", *run("fsdp2", parallel="fsdp2"), "stop_after=1"])
    torchrun(["grpo", "train", *run("fsdp2", parallel="fsdp2")])
    for rec_a, rec_b in zip(records(tmp_path / "ddp"), records(tmp_path / "fsdp2"), strict=False):
        if "kept_fraction" in rec_a:
            assert rec_a["kept_fraction"] == rec_b["kept_fraction"] == 0.5
            _close(rec_a["grad_norm"], rec_b["grad_norm"], f"step {rec_a['step']} grad_norm")
    for file in ("pytorch_lora_weights.safetensors", "transformer/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "ddp" / "policy" / file), load_file(tmp_path / "fsdp2" / "policy" / file)
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"{file} {k}")


# ----------------------------------------------------------------------------- SpatialScore


REWARD = {"batch_size": 4, "max_steps": 2, "optim.warmup_steps": 0, "eval_every": 2, "data.eval_pairs": 4,
          "save_every": 1, "log_every": 1, "optim.name": "sgd", "optim.lr": 1.0, "optim.head_lr": 1.0,
          "optim.grad_clip": 0, "threads": 1}


@pytest.fixture(scope="module")
def reward_baseline(tiny_dir, easy_pairs, tmp_path_factory):
    """One process, no accumulation, and the weights every run starts from."""
    from spatialcore.reward.model import SpatialScore

    out = tmp_path_factory.mktemp("reward") / "one"
    reward_mod.train(load_config(RewardTrainConfig, None, cli_args(
        {**REWARD, "model": str(tiny_dir / "reward"), "data.source": str(easy_pairs), "out": str(out)})))
    start = {n: p.detach().clone() for n, p in SpatialScore.from_backbone(tiny_dir / "reward", variance_head=True).named_parameters()
             if n.startswith("backbone.")}
    return out, start


def _compare_reward_runs(baseline, other) -> None:
    one, start = baseline
    a, b = records(one), records(other)
    for step in (1, 2):
        ra = [r for r in a if r["step"] == step and "loss" in r][0]
        rb = [r for r in b if r["step"] == step and "loss" in r][0]
        _close(ra["grad_norm"], rb["grad_norm"], f"step {step} grad_norm")
        _close(ra["loss"], rb["loss"], f"step {step} loss")
    for step in (1, 2):
        name = f"checkpoints/step_{step:08d}/weights.safetensors"
        rel, moved = relative_difference(load_file(one / name), load_file(other / name), start)
        # float32 sums in another order (4 pairs at once vs 4 micro-batches of 1) differ by ~1e-5 of the
        # move after two SGD steps at lr 1; a gradient summed or averaged wrongly differs by O(1)
        assert moved > 1e-2 and rel <= 3 * REL, (step, rel, moved)


def test_reward_gradient_accumulation(baseline_args, reward_baseline, tmp_path):
    reward_mod.train(load_config(RewardTrainConfig, None, baseline_args(tmp_path / "accum", micro_batch=1)))
    _compare_reward_runs(reward_baseline, tmp_path / "accum")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_reward_two_ranks(baseline_args, reward_baseline, tmp_path, parallel):
    """2 ranks x 2 pairs = 1 rank x 4 pairs. FSDP2 also stops after step 1 and resumes (sharded optimizer
    state through the full checkpoint)."""
    args = baseline_args(tmp_path / "two", parallel=parallel)
    guard = tmp_path / "guard"
    if parallel == "fsdp2":
        torchrun(["reward", "train", *args, "stop_after=1"], guard_log=guard)
        assert not (tmp_path / "two" / "model").exists()
    torchrun(["reward", "train", *args], guard_log=guard)
    assert _guarded(guard, 2), "the guard saw no collective"
    _compare_reward_runs(reward_baseline, tmp_path / "two")
    assert (tmp_path / "two" / "model" / "spatialscore.json").is_file()


@pytest.fixture()
def baseline_args(tiny_dir, easy_pairs):
    def args(out, **extra):
        return cli_args({**REWARD, "model": str(tiny_dir / "reward"), "data.source": str(easy_pairs), "out": str(out),
                         **extra})

    return args


def test_a_global_batch_that_does_not_divide_fails_before_any_model(tiny_dir, easy_pairs, tmp_path, monkeypatch):
    import spatialcore.dist
    from spatialcore.dist import split_batch

    assert split_batch(128, 4, 8) == (4, 4) and split_batch(128, 0, 8) == (16, 1) and split_batch(16, 2, 1) == (2, 8)
    with pytest.raises(ConfigError, match="batch_size"):
        split_batch(16, 0, 3)
    with pytest.raises(ConfigError, match="micro_batch"):
        split_batch(16, 3, 2)
    monkeypatch.setattr(spatialcore.dist, "init", lambda: (0, 3, torch.device("cpu")))
    monkeypatch.setattr(reward_mod, "_build_model", None)  # building a model would fail loudly
    cfg = load_config(RewardTrainConfig, None, cli_args({**REWARD, "model": str(tiny_dir / "reward"),
                                                         "data.source": str(easy_pairs), "out": str(tmp_path / "x")}))
    with pytest.raises(ConfigError, match="batch_size=4 cannot be split evenly over 3 ranks"):
        reward_mod.RewardTrainer(cfg)
    with pytest.raises(ConfigError, match="grad_accum.*replaced by 'micro_batch"):
        load_config(RewardTrainConfig, None, ["grad_accum=2"])


# ----------------------------------------------------------------------------- flow-matching SFT


def test_sft_same_update_on_one_rank_two_ranks_and_with_accumulation(tiny_dir, tmp_path):
    """One VAE step then one transformer step (full fine-tuning), plain SGD without clipping: 2 ranks x
    2 items and 1 rank with micro-batches of 1 move the VAE, its measured latent factors and the
    transformer like 1 rank x 4 items."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from spatialcore.trainers import sft as sft_mod
    from spatialcore.trainers.sft import SFTTrainConfig

    overrides = {"model": str(tiny_dir / "flux"), "image_size": 32, "vae.steps": 1, "vae.batch_size": 4,
                 "vae.lr": 1.0, "vae.calibration_images": 8, "steps": 1, "batch_size": 4, "save_every": 1,
                 "eval_every": 1, "eval_prompts": 1, "eval_seeds": 2, "sample_steps": 2, "policy.lora_rank": 0,
                 "optim.name": "sgd", "optim.grad_clip": 0, "optim.lr": 10.0, "log_every": 1, "threads": 1}

    def run(name, **extra):
        return cli_args({**overrides, "out": str(tmp_path / name), **extra})

    sft_mod.train(load_config(SFTTrainConfig, None, run("one")))
    sft_mod.train(load_config(SFTTrainConfig, None, run("accum", micro_batch=1)))
    guard = tmp_path / "guard"
    torchrun(["sft", "train", *run("two")], guard_log=guard)
    assert _guarded(guard, 2).get("all_reduce", 0) >= 4

    flux = tiny_dir / "flux"
    start = {**{f"vae.{k}": v for k, v in AutoencoderKL.from_pretrained(flux / "vae").state_dict().items()},
             **{f"transformer.{k}": v for k, v in
                FluxTransformer2DModel.from_pretrained(flux / "transformer").state_dict().items()}}
    one = records(tmp_path / "one")
    for name in ("accum", "two"):
        other = records(tmp_path / name)
        for step in (1, 2):
            a = [r for r in one if r["step"] == step][0]
            b = [r for r in other if r["step"] == step][0]
            _close(a["grad_norm"], b["grad_norm"], f"{name} step {step} grad_norm")
            _close(a["loss"], b["loss"], f"{name} step {step} loss")
        for step, prefix in ((1, "vae."), (2, "transformer.")):
            ck = f"checkpoints/step_{step:08d}/weights.safetensors"
            wa, wb = load_file(tmp_path / "one" / ck), load_file(tmp_path / name / ck)
            base = {k: v for k, v in start.items() if k.startswith(prefix) and k in wa}
            rel, moved = relative_difference(wa, wb, base)
            assert moved > 1e-3 and rel <= REL, (name, step, rel, moved)
        ca, cb = (json.loads((tmp_path / r / "pipeline" / "vae" / "config.json").read_text()) for r in ("one", name))
        _close(ca["scaling_factor"], cb["scaling_factor"], f"{name} scaling_factor")
        assert abs(ca["shift_factor"] - cb["shift_factor"]) <= 1e-5
