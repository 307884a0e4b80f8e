import hashlib

import pytest
import torch
from PIL import Image

from spatialcore.tiny import TinyConfig, build_tiny, flux_rope_axes, mrope_sections
from spatialcore.vocab import COLOURS, OBJECTS, RELATIONS, tokenizer_corpus


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_rope_splits():
    assert mrope_sections(128) == [16, 24, 24]  # Qwen2.5-VL-7B
    assert sum(mrope_sections(16)) == 8
    assert flux_rope_axes(128) == (16, 56, 56)  # FLUX.1-dev
    assert sum(flux_rope_axes(16)) == 16


def test_reward_checkpoint_loads_with_stock_classes(tiny_dir, monkeypatch):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    processor = AutoProcessor.from_pretrained(tiny_dir / "reward")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "reward").eval()
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 1_000_000
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"

    image = Image.new("RGB", (80, 60), (250, 250, 250))
    image.paste(Image.new("RGB", (20, 20), COLOURS["red"]), (5, 20))
    prompt = "the red square is to the left of the blue circle"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text.count("<|image_pad|>") == 1 and prompt in text
    batch = processor(text=[text], images=[image], return_tensors="pt")
    grid = batch["image_grid_thw"][0]
    n_image_tokens = int(grid.prod()) // 4
    assert (batch["input_ids"] == model.config.image_token_id).sum() == n_image_tokens
    batch.pop("mm_token_type_ids", None)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (1, batch["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    # Every word of the synthetic vocabulary tokenizes without falling back to bytes of unknowns.
    ids = processor.tokenizer(" ".join(OBJECTS + tuple(COLOURS))).input_ids
    assert processor.tokenizer.decode(ids) == " ".join(OBJECTS + tuple(COLOURS))


def test_flux_pipeline_loads_and_samples(tiny_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_dir / "flux")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=64, width=64, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=32,
              output_type="pt")
    a = pipe("a red star above a blue ring", generator=torch.Generator().manual_seed(1), **kw).images
    b = pipe("a red star above a blue ring", generator=torch.Generator().manual_seed(1), **kw).images
    assert a.shape == (1, 3, 64, 64)
    assert torch.isfinite(a).all() and a.std() > 0
    torch.testing.assert_close(a, b)


def test_build_is_deterministic_per_seed(tmp_path, tiny_dir):
    # A second build with the same seed matches the session fixture bit for bit.
    again = build_tiny(TinyConfig(seed=0), tmp_path / "again")
    assert again["reward"]["parameters"] > 0
    assert _digests(tmp_path / "again") == _digests(tiny_dir)
    other = TinyConfig(seed=1)
    build_tiny(other, tmp_path / "other")
    a, b = _digests(tiny_dir), _digests(tmp_path / "other")
    assert a["reward/model.safetensors"] != b["reward/model.safetensors"]
    assert a["reward/tokenizer.json"] != b["reward/tokenizer.json"] or a["reward/model.safetensors"] != b[
        "reward/model.safetensors"]


def test_build_refuses_to_clobber(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny(TinyConfig(), out)
    assert (out / "keep.txt").read_text() == "mine"


def test_corpus_covers_vocabulary():
    text = " ".join(tokenizer_corpus(0, n_sentences=500))
    for word in (*OBJECTS, *COLOURS, "left", "right", "above", "below", "behind", "front", "between"):
        assert word in text
    assert len(RELATIONS) >= 8
    assert tokenizer_corpus(3, 50) == tokenizer_corpus(3, 50)


def test_flux_without_guidance_embedder_samples_like_the_stock_pipeline(tmp_path):
    """``flux.guidance_embeds: false`` (FLUX.1-schnell's layout): no guidance embedder in the
    checkpoint, and the project's ODE sampler (which then passes no guidance) matches the stock
    pipeline from the same starting noise."""
    from diffusers import FluxPipeline

    from spatialcore.rl.sampler import FluxSampler, SamplerConfig

    cfg = TinyConfig()
    cfg.flux.guidance_embeds = False
    cfg.flux.sample_size = 32
    build_tiny(cfg, tmp_path / "t")
    pipe = FluxPipeline.from_pretrained(tmp_path / "t" / "flux")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.guidance_embeds is False
    assert not any("guidance_embedder" in n for n, _ in pipe.transformer.named_parameters())
    s = FluxSampler(pipe, SamplerConfig(steps=3, image_size=32, max_sequence_length=32))
    x = torch.randn(1, s.channels, s.latent_hw, s.latent_hw, generator=torch.Generator().manual_seed(4))
    lat = pipe._pack_latents(x, 1, s.channels, s.latent_hw, s.latent_hw)
    prompt = "a red circle left of a blue square"
    stock = pipe(prompt, height=32, width=32, num_inference_steps=3, latents=lat, output_type="pt",
                 max_sequence_length=32).images
    ours = s.sample([prompt], [4], sde=False).images
    torch.testing.assert_close(ours, stock, rtol=0, atol=5e-6)
