"""The reference configs run as a user launches them, with `random:` models instead of downloaded weights: here at the
tiny shapes on the CPU (the same option and code path the GPU check runs at full size): data, sampling, scoring,
training, evaluation, a checkpoint, a resume after a stop, the export. And the full shapes are the real ones, counted
on the meta device."""

import pytest
import torch

from spatialcore.cli import main


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPATIALCORE_CACHE", str(tmp_path_factory.getbasetemp() / "spatialcore-cache"))


def _run_twice(argv: list[str], capfd) -> str:
    """The command stopped after its first step, then run again: it must resume, finish and export."""
    assert main([*argv, "stop_after=1"]) == 0
    capfd.readouterr()
    assert main(argv) == 0
    return capfd.readouterr().err


def test_reward_reference_config_at_tiny_shapes(tmp_path, capfd):
    out = tmp_path / "reward"
    err = _run_twice(["reward", "train", "--config", "configs/reward/qwen2_5_vl_7b.yaml", "model=random:tiny-qwen",
                      "data.source=stream:easy", "spatialscore.liger=false", "max_steps=2", "optim.warmup_steps=1",
                      "eval_every=2", "save_every=1", "data.eval_pairs=4", "batch_size=4", "micro_batch=2",
                      "data.num_workers=0", "threads=1", "--out", str(out)], capfd)
    assert "resumed from step 1 " in err and "random:tiny-qwen: the tiny-qwen backbone with random weights" in err
    from spatialcore.reward.model import SpatialScore

    model = SpatialScore.from_pretrained(out / "model")  # a LoRA on the random base loads back onto the same base
    assert model.base == "random:tiny-qwen" and (out / "eval.md").is_file()


def test_grpo_reference_config_at_tiny_shapes(tmp_path, capfd):
    out = tmp_path / "grpo"
    err = _run_twice(["grpo", "train", "--config", "configs/grpo/flux_dev_spatial.yaml", "model=random:tiny-flux",
                      "reward.spatialscore.model=random:tiny-qwen", "sampler.image_size=32", "sampler.compile=none",
                      "sampler.steps=4", "sampler.window_size=2", "train_timesteps=2",
                      "group_size=4", "top_k=1", "sample_batch=2", "micro_batch=2", "iterations=2", "eval_every=2",
                      "eval_seeds=1", "save_every=1", "n_stream_prompts=16", "reward.batch=4", "threads=1",
                      "--out", str(out)], capfd)
    assert "resumed from step 1 " in err and "tiny-flux architecture with random weights" in err
    assert (out / "policy" / "pytorch_lora_weights.safetensors").is_file()


def test_sft_reference_config_at_tiny_shapes(easy_pairs, tmp_path, capfd):
    out = tmp_path / "sft"
    err = _run_twice(["sft", "train", "--config", "configs/sft/flux_dev_lora.yaml", "model=random:tiny-flux",
                      f"data.path={easy_pairs}", "image_size=32", "batch_size=4", "micro_batch=2", "steps=2",
                      "eval_every=2", "eval_seeds=1", "sample_steps=2", "save_every=1", "threads=1",
                      "--out", str(out)], capfd)
    assert "resumed from step 1 " in err
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "lora").is_dir()


def test_random_names_are_checked_before_anything_is_built(tmp_path, capsys):
    assert main(["grpo", "train", "model=random:flux.2", "--out", str(tmp_path / "x")]) == 2
    assert "random weights exist for random:flux.1-dev, random:tiny-flux" in capsys.readouterr().err
    assert main(["reward", "train", "model=random:tiny-flux", "data.source=stream:easy", "--out",
                 str(tmp_path / "y")]) == 2
    assert "random:qwen2.5-vl-7b, random:tiny-qwen" in capsys.readouterr().err


def test_the_full_shapes_are_the_real_ones():
    """Built on the meta device (no memory): FLUX.1-dev's transformer has its 11.9 B parameters, Qwen2.5-VL-7B
    without the LM head its 8.3 B - 0.55 B."""
    from spatialcore.shapes import random_flux_pipeline, random_qwen_backbone

    pipe = random_flux_pipeline("flux.1-dev", device="meta", dtype=torch.bfloat16)
    n_flux = sum(p.numel() for p in pipe.transformer.parameters())
    assert n_flux == 11_901_408_320 and pipe.transformer.dtype == torch.bfloat16
    emb, pooled = pipe.random_text(["a", "b"], 512, "cpu", torch.float32)
    assert emb.shape == (2, 512, 4096) and pooled.shape == (2, 768)
    assert torch.equal(pipe.random_text(["a"], 512, "cpu", torch.float32)[0][0], emb[0])  # a function of the prompt
    backbone, _ = random_qwen_backbone("qwen2.5-vl-7b", device="meta", dtype=torch.bfloat16)
    n_qwen = sum(p.numel() for p in backbone.parameters())
    assert abs(n_qwen - (8_292_166_656 - 152064 * 3584)) <= 1e-3 * n_qwen, n_qwen
