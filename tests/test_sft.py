"""The flow-matching fine-tuning trainer: its data sources, its config errors (one line naming the key,
exit 2, before any model), and its checkpoint in the stock diffusers loaders. Resume and rank
equivalence are in test_resume.py and test_equivalence.py; the word-level tokenizers here."""

import json

import pytest
import torch
from PIL import Image

from runs import cli_args
from spatialcore.cli import main
from spatialcore.config import load_config


def _sft_cfg(**overrides):
    from spatialcore.trainers.sft import SFTTrainConfig

    return load_config(SFTTrainConfig, None, cli_args(overrides))


def test_every_synthetic_prompt_fits_the_tiny_tokenizers_word_by_word(tiny_dir):
    """No truncation (the longest hard-preset prompt fits both tokenizers and the tiny config's
    max_sequence_length), and one token per word or punctuation mark: nothing is spelled out."""
    import re

    from transformers import CLIPTokenizer, T5Tokenizer

    from spatialcore.config import from_dict
    from spatialcore.data.synth import DIFFICULTIES, SynthConfig, make_pair

    t5 = T5Tokenizer.from_pretrained(tiny_dir / "flux" / "tokenizer_2")
    clip = CLIPTokenizer.from_pretrained(tiny_dir / "flux" / "tokenizer")
    tiny_cfg = json.loads((tiny_dir / "flux" / "text_encoder" / "config.json").read_text())
    longest = 0
    for preset, n in (("easy", 100), ("medium", 100), ("hard", 300)):
        cfg = from_dict(SynthConfig, {**DIFFICULTIES[preset], "size": 32}, "s")
        for i in range(n):
            prompt = make_pair(cfg, 1, i).record["prompt"]
            units = len(re.findall(r"[A-Za-z]+|[^\sA-Za-z]", prompt))
            ids5, idsc = t5(prompt).input_ids, clip(prompt).input_ids
            assert len(ids5) == units + 1, (prompt, t5.convert_ids_to_tokens(ids5))  # + </s>
            assert len(idsc) == units + 2, (prompt, clip.convert_ids_to_tokens(idsc))  # + start/end
            assert t5.unk_token_id not in ids5 and clip.unk_token_id not in idsc[1:-1]
            longest = max(longest, len(ids5), len(idsc))
    assert longest > 64, "the hard preset has prompts longer than the old limit"
    assert longest <= t5.model_max_length and longest <= clip.model_max_length
    assert longest <= tiny_cfg["max_position_embeddings"]


def test_a_prompt_longer_than_max_sequence_length_is_refused_not_cut(tiny_dir):
    from spatialcore.config import ConfigError
    from spatialcore.rl.sampler import FluxSampler, SamplerConfig, load_pipeline

    sampler = FluxSampler(load_pipeline(tiny_dir / "flux"), SamplerConfig(image_size=32, max_sequence_length=8))
    with pytest.raises(ConfigError, match="max_sequence_length=8"):
        sampler.encode(["the red circle is to the left of the blue square"])


def test_sources_give_each_item_the_same_on_every_call(easy_pairs, tmp_path):
    """Pair sets give their train split's chosen images; a folder its metadata.jsonl images; the synthetic
    stream its train split; item k is a pure function of (config, stream, k)."""
    from spatialcore.data.captioned import CaptionedItems, to_tensor
    from spatialcore.data.pairs import scan_pair_set
    from spatialcore.data.scene import parse_prompt

    recs, _ = scan_pair_set(easy_pairs)
    chosen = {str(r.chosen): r.prompt for r in recs if r.split == "train"}
    def source(cfg):
        return CaptionedItems(cfg.data, image_size=cfg.image_size, seed=cfg.seed)

    src = source(_sft_cfg(**{"data.source": "pairs", "data.path": str(easy_pairs), "grid_prompts": ["x"]}))
    assert len(src) == len(chosen) and len(chosen) < len(recs)
    seen = [src(1, k)[0] for k in range(len(src))]
    assert sorted(seen) == sorted(chosen.values()), "one epoch visits every train pair once"

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (48, 40), colour).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "prompt": f"p{i}"}) + "\n"
                                                   for i in range(3)))
    src = source(_sft_cfg(**{"data.source": "folder", "data.path": str(folder), "grid_prompts": ["x"]}))
    items = [src(1, k) for k in range(6)]
    assert sorted(p for p, _ in items[:3]) == ["p0", "p1", "p2"] and sorted(p for p, _ in items[3:]) == ["p0", "p1", "p2"]
    assert [p for p, _ in items] == [src(1, k)[0] for k in range(6)]

    t = to_tensor(items[0][1], 32)
    assert t.shape == (3, 32, 32) and -1 <= float(t.min()) <= float(t.max()) <= 1

    synth = source(_sft_cfg())
    p, im = synth(0, 5)
    assert parse_prompt(p) and im.size == (64, 64)
    again = synth(0, 5)
    assert again[0] == p and again[1].tobytes() == im.tobytes()


@pytest.mark.parametrize("args, key", [
    (["data.source=pairs"], "data.path"),
    (["data.source=folder", "data.path=/nonexistent", "grid_prompts=[\"a\"]"], "data.path"),
    (["steps=0", "vae.steps=0"], "steps"),
    (["data.source=pairs", "data.path=/tmp"], "grid_prompts"),
    (["batch_size=6", "micro_batch=4"], "micro_batch"),
    (["data.preset=impossible"], "data.preset"),
])
def test_config_errors_are_one_line_naming_the_key(tiny_dir, args, key, capsys):
    code = main(["sft", "train", f"model={tiny_dir / 'flux'}", "out=/tmp/never-written", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and key in err, err


def test_the_checkpoint_loads_in_the_stock_pipeline_and_its_lora_matches(tiny_dir, tmp_path):
    """out/pipeline is a complete FluxPipeline; out/lora on the base model through stock
    load_lora_weights gives the transformer of out/pipeline (LoRA folded in) to 1e-5."""
    import shutil

    from diffusers import FluxPipeline

    from spatialcore.trainers.sft import train

    # the input says how it was made (an earlier sft run, then text-sides): the output carries that chain
    model = tmp_path / "base"
    shutil.copytree(tiny_dir / "flux", model)
    (model / "spatialcore_run.json").write_text(json.dumps({"command": "spatialcore sft train --config a.yaml"}))
    (model / "text_sides.json").write_text(json.dumps({"held_out_side_accuracy": 1.0}))
    shutil.copy(tiny_dir / "tiny.yaml", tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    train(_sft_cfg(model=str(model), out=str(out), image_size=32, steps=2, batch_size=2,
                   eval_every=2, eval_prompts=1, eval_seeds=1, sample_steps=2, **{"policy.lora_rank": 4,
                   "policy.lora_alpha": 8, "optim.lr": 0.05, "threads": 1}))
    run = json.loads((out / "pipeline" / "spatialcore_run.json").read_text())
    assert run["steps"] == 2 and run["config"]["policy"]["lora_rank"] == 4 and set(run["eval"]) == {
        "eval_found", "eval_relation_acc"} and run["eval_samples"] == 1
    assert run["base_model_tiny_config"]["seed"] == 0 and run["base_model_tiny_config"]["flux"]["heads"] == 2
    assert run["made_from"] == {"spatialcore_run": {"command": "spatialcore sft train --config a.yaml"},
                                "text_sides": {"held_out_side_accuracy": 1.0}}
    trained = FluxPipeline.from_pretrained(out / "pipeline")
    img = trained("the red circle is to the left of the blue square", height=32, width=32, num_inference_steps=2,
                  guidance_scale=3.5, max_sequence_length=32, output_type="pt").images
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
    base = FluxPipeline.from_pretrained(model)
    base.load_lora_weights(out / "lora")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, base.transformer.config.in_channels, generator=g)
    kw = dict(hidden_states=x, timestep=torch.tensor([0.5, 0.7]), guidance=torch.tensor([3.5, 3.5]),
              pooled_projections=torch.randn(2, 32, generator=g), encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
              txt_ids=torch.zeros(7, 3), img_ids=FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32),
              return_dict=False)
    with torch.no_grad():
        a, b = base.transformer(**kw)[0], trained.transformer(**kw)[0]
        untouched = FluxPipeline.from_pretrained(tiny_dir / "flux").transformer(**kw)[0]
    assert (a - b).abs().max() <= 1e-5
    assert (a - untouched).abs().max() > 1e-4, "the LoRA changed the transformer"


def test_float16_export_halves_the_files_and_loads_as_float32(tiny_dir, tmp_path):
    """policy.export_dtype=float16 stores every weight of the pipeline in half precision (what a committed
    checkpoint uses); the project's loader reads it back as float32 equal to the float32 export rounded
    to half precision."""
    from safetensors.torch import load_file

    from spatialcore.rl.sampler import load_pipeline
    from spatialcore.trainers.sft import train

    kw = dict(model=str(tiny_dir / "flux"), image_size=32, steps=1, batch_size=2, eval_every=5, eval_prompts=1,
              eval_seeds=1, sample_steps=1, threads=1)
    for dtype in ("float32", "float16"):
        train(_sft_cfg(out=str(tmp_path / dtype), **{"policy.export_dtype": dtype}, **kw))
    files = sorted((tmp_path / "float16" / "pipeline").rglob("*.safetensors"))
    assert {p.parent.name for p in files} >= {"transformer", "vae", "text_encoder", "text_encoder_2"}
    for f in files:
        full = load_file(tmp_path / "float32" / f.relative_to(tmp_path / "float16"))
        half = load_file(f)
        assert all(t.dtype == torch.float16 for t in half.values())
        assert all(torch.equal(half[k], v.half()) for k, v in full.items())
    pipe = load_pipeline(tmp_path / "float16" / "pipeline")
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())


def test_config_files_load():
    from spatialcore.tiny import TinyConfig
    from spatialcore.trainers.sft import SFTTrainConfig

    for f in ("configs/sft/tiny_cpu.yaml", "configs/sft/flux_dev_lora.yaml"):
        load_config(SFTTrainConfig, f).check()
    gen = load_config(TinyConfig, "configs/tiny/generator.yaml")
    assert gen.flux.head_dim == 32 and gen.flux.sample_size == 32


def test_web_like_captions_drop_or_replace_the_relation_at_their_rates():
    """caption_drop / caption_wrong: the relation phrase becomes "and" or another direction at the configured
    rates, deterministically per item; flip_relation gives the opposite direction in the same phrasing."""
    import numpy as np

    from spatialcore.data.captions import corrupt_caption, flip_relation
    from spatialcore.data.scene import parse_prompt
    from spatialcore.data.synth import split_prompts

    prompts = split_prompts("easy_grid", {}, "train", 64, 0)
    for p in prompts:
        flipped = flip_relation(p)
        assert parse_prompt(flipped)[0].type == {"left of": "right of", "right of": "left of", "above": "below",
                                                 "below": "above"}[parse_prompt(p)[0].type], (p, flipped)
    rng = np.random.default_rng(0)
    kinds = {"same": 0, "dropped": 0, "wrong": 0}
    for i in range(4000):
        p = prompts[i % len(prompts)]
        q = corrupt_caption(p, rng, drop=0.3, wrong=0.2)
        rel = parse_prompt(q)
        kinds["same" if q == p else "dropped" if not rel else "wrong"] += 1
        if rel and q != p:
            assert rel[0].type != parse_prompt(p)[0].type and rel[0].args == parse_prompt(p)[0].args
    assert abs(kinds["dropped"] / 4000 - 0.3) < 0.03 and abs(kinds["wrong"] / 4000 - 0.2) < 0.03, kinds
    assert corrupt_caption("a photo of a cat", rng, drop=1.0, wrong=0.0) == "a photo of a cat"


def test_trainable_text_encoders_train_resume_and_export(tiny_dir, tmp_path):
    """text_encoders=trainable: CLIP and T5 change, sit in the checkpoint, come back on a resume (the same
    weights as straight through) and are what the exported pipeline holds."""
    from safetensors.torch import load_file

    from spatialcore.trainers.sft import train

    kw = {"model": str(tiny_dir / "flux"), "image_size": 32, "steps": 4, "batch_size": 2, "eval_every": 4,
          "eval_prompts": 1, "eval_seeds": 1, "sample_steps": 2, "save_every": 2, "text_encoders": "trainable",
          "data.caption_drop": 0.5, "optim.lr": 1e-2, "policy.lora_rank": 0, "threads": 1}
    train(_sft_cfg(out=str(tmp_path / "a"), **kw))
    train(_sft_cfg(out=str(tmp_path / "b"), stop_after=2, **kw))
    train(_sft_cfg(out=str(tmp_path / "b"), **kw))
    base = load_file(tiny_dir / "flux" / "text_encoder_2" / "model.safetensors")
    exported = load_file(tmp_path / "a" / "pipeline" / "text_encoder_2" / "model.safetensors")
    assert max(float((base[k] - exported[k]).abs().max()) for k in base) > 1e-4, "T5 trained"
    ckpt = {name: load_file(tmp_path / name / "checkpoints" / "step_00000004" / "weights.safetensors")
            for name in ("a", "b")}
    t5 = {k.removeprefix("text_encoder_2."): v for k, v in ckpt["a"].items() if k.startswith("text_encoder_2.")}
    assert t5 and all(torch.equal(t5[k], exported[k]) for k in t5)
    assert ckpt["a"].keys() == ckpt["b"].keys() and all(torch.equal(ckpt["a"][k], ckpt["b"][k]) for k in ckpt["a"])
    # `spatialcore export` of a checkpoint holds the trained encoders too, and the settings eval samples with
    from spatialcore.eval.report import trained_settings
    from spatialcore.export import export

    export(tmp_path / "a", tmp_path / "again")
    for part in ("text_encoder", "text_encoder_2"):
        mine = load_file(tmp_path / "a" / "pipeline" / part / "model.safetensors")
        again = load_file(tmp_path / "again" / part / "model.safetensors")
        assert mine.keys() == again.keys() and all(torch.equal(mine[k], again[k]) for k in mine), part
    assert trained_settings(tmp_path / "again") == trained_settings(tmp_path / "a" / "pipeline") != {}
