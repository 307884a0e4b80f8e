"""Full-size model shapes with random weights, built directly on the target device (no download,
no CPU copy): Qwen2.5-VL-7B (SpatialScore backbone) and FLUX.1-dev (transformer + VAE).

``shape="tiny"`` gives the tiny architectures of ``spatialcore tiny`` so that every benchmark and
profile runs on the CPU in seconds with the same code path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..shapes import FLUX_DEV_TEXT, FLUX_DEV_TRANSFORMER, FLUX_DEV_VAE, QWEN_7B_PIXELS, on_device, seeded


def qwen_config(processor, shape: str, tiny_dir: Path | None = None):
    """A Qwen2_5_VLConfig for ``shape`` ("7b" or "tiny") whose token ids match ``processor``."""
    from transformers import AutoConfig

    from ..shapes import qwen_config as shaped

    return AutoConfig.from_pretrained(tiny_dir / "reward") if shape == "tiny" else shaped(processor, "qwen2.5-vl-7b")


def qwen_processor(tiny_dir: Path, shape: str):
    """The tiny checkpoint's processor; for "7b" with Qwen2.5-VL-7B's image-size limits (the
    tokenizer only decides token ids, not the work per token)."""
    from transformers import AutoProcessor

    kwargs = QWEN_7B_PIXELS if shape == "7b" else {}
    return AutoProcessor.from_pretrained(tiny_dir / "reward", **kwargs)


def build_qwen(processor, shape: str, device, dtype, tiny_dir: Path, attention: str = "sdpa"):
    """Stock ``Qwen2_5_VLForConditionalGeneration`` with random weights on ``device``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = qwen_config(processor, shape, tiny_dir)
    config._attn_implementation = attention
    with on_device(device, dtype):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.eval()


def build_flux_pipeline(tiny_dir: Path, shape: str, device, dtype):
    """A FluxPipeline: for "flux-dev" FLUX.1-dev-shaped transformer and VAE with random weights and
    the tiny text encoders (text embeddings are supplied precomputed, see :func:`random_text`)."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    from ..rl.sampler import load_pipeline

    pipe = load_pipeline(tiny_dir / "flux", dtype=dtype, device=device)
    if shape == "tiny":
        return pipe
    with seeded(0), on_device(device, dtype):  # the same weights as every fresh_transformer
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        vae = AutoencoderKL(**FLUX_DEV_VAE)
    return FluxPipeline(scheduler=pipe.scheduler, vae=vae.eval(), text_encoder=pipe.text_encoder,
                        tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                        transformer=transformer)


def fresh_transformer(old, tiny_dir: Path, shape: str, device, dtype):
    """A newly built transformer of the same shape and weights (the old one is freed first)."""
    from diffusers import FluxTransformer2DModel

    del old
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if shape == "tiny":
        return FluxTransformer2DModel.from_pretrained(tiny_dir / "flux" / "transformer", dtype=dtype).to(device)
    with seeded(0), on_device(device, dtype):
        return FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)


def random_text(sampler, prompts: list[str], shape: str, seed: int = 0) -> None:
    """Pre-fill the sampler's text cache: random T5/CLIP embeddings of FLUX.1-dev's widths (full
    size), or the tiny encoders' real outputs (tiny)."""
    if shape == "tiny":
        sampler.encode(prompts)
        return
    n, d, dp = FLUX_DEV_TEXT
    g = torch.Generator().manual_seed(seed)
    for p in prompts:
        sampler._text_cache[p] = (torch.randn(n, d, generator=g).to(sampler.device, sampler.dtype),
                                  torch.randn(dp, generator=g).to(sampler.device, sampler.dtype))
