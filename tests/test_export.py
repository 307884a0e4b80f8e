"""`spatialcore export` writes a diffusers-loadable generator from any checkpoint: the final checkpoint's
export equals what the trainer wrote at the end, an earlier checkpoint gives that step's weights, and a
folder that is no run is one line, exit 2."""

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

from runs import cli_args
from spatialcore.cli import main

LEFT = "the red circle is to the left of the blue square"


def _lora(folder):
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def test_grpo_checkpoints_export_as_loadable_policies(tiny_dir, tmp_path, capsys):
    run = tmp_path / "grpo"
    base = {"model": str(tiny_dir / "flux"), "out": str(run), "prompts": [LEFT], "group_size": 4, "prompts_per_iter": 1,
            "top_k": 1, "iterations": 2, "eval_every": 2, "eval_seeds": 1, "save_every": 1, "sampler.steps": 2,
            "sampler.image_size": 32, "policy.lora_rank": 4, "optim.lr": 0.05, "threads": 1}
    assert main(["grpo", "train", *cli_args(base)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "last"), "--merged"]) == 0
    final, last = _lora(run / "policy"), _lora(tmp_path / "last")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert main(["export", str(run / "checkpoints" / "step_00000001"), "--out", str(tmp_path / "first")]) == 0
    first = _lora(tmp_path / "first")
    assert any(not torch.equal(first[k], final[k]) for k in final)
    pipe = FluxPipeline.from_pretrained(tiny_dir / "flux")
    pipe.load_lora_weights(tmp_path / "first")  # diffusers loads it
    merged = FluxTransformer2DModel.from_pretrained(tmp_path / "last" / "transformer")
    plain = FluxTransformer2DModel.from_pretrained(tiny_dir / "flux" / "transformer")
    assert merged.state_dict().keys() == plain.state_dict().keys()
    capsys.readouterr()
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CHECKPOINT" in err, err


def test_sft_checkpoint_exports_the_pipeline_it_wrote(tiny_dir, tmp_path):
    run = tmp_path / "sft"
    args = {"model": str(tiny_dir / "flux"), "out": str(run), "image_size": 32, "steps": 2, "batch_size": 2,
            "eval_every": 2, "eval_prompts": 1, "eval_seeds": 1, "sample_steps": 2, "save_every": 1,
            "policy.lora_rank": 0, "policy.ema_decay": 0.5, "vae.steps": 1, "vae.batch_size": 2,
            "vae.calibration_images": 8, "threads": 1}
    assert main(["sft", "train", *cli_args(args)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "again")]) == 0
    for part in ("transformer", "vae"):
        a = load_file(str(run / "pipeline" / part / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(tmp_path / "again" / part / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert FluxPipeline.from_pretrained(tmp_path / "again").vae.config.scaling_factor == \
        FluxPipeline.from_pretrained(run / "pipeline").vae.config.scaling_factor
    assert main(["export", str(run), "--out", str(tmp_path / "raw"), "--no-ema"]) == 0
    a = load_file(str(run / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "raw" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the EMA differs from the raw weights
