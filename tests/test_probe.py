"""The text-path probe: it reads a feature that is there, finds nothing in noise, and reads the subject from the
committed generator's frozen encoders (docs/EXPERIMENTS.md, the miniature gain's diagnosis)."""
import torch

from spatialcore.eval.probe import _probe, subject_probe


def test_probe_reads_a_present_feature_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(400, generator=g) > 0.5).float()
    noise = torch.randn(400, 16, generator=g)
    signal = noise.clone()
    signal[:, 3] += 4 * (2 * y - 1)  # one coordinate carries the label
    assert _probe(signal, y) > 0.95
    assert 0.35 < _probe(noise, y) < 0.65


def test_the_committed_generators_text_path_knows_the_subject():
    from diffusers import FluxPipeline

    from spatialcore.data.captioned import CaptionedDataConfig, CaptionedItems

    items = CaptionedItems(CaptionedDataConfig(source="synthetic", preset="easy_grid"), image_size=32, seed=0)
    prompts = [items(0, k)[0] for k in range(240)]
    r = subject_probe(FluxPipeline.from_pretrained("assets/tiny_generator", torch_dtype=torch.float32), prompts)
    assert r["n"] == 240 and r["t5_token"] > 0.95 and r["clip_pooled"] > 0.95
