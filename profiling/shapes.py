"""Full-size model shapes with random weights, built directly on the target device (no download,
no CPU copy): Qwen2.5-VL-7B (SpatialScore backbone) and FLUX.1-dev (transformer + VAE).

``shape="tiny"`` gives the tiny architectures of ``spatialcore tiny`` so that every benchmark and
profile runs on the CPU in seconds with the same code path.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

# Qwen2.5-VL-7B-Instruct's config.json (text + vision), minus the token ids (taken from the processor).
QWEN_7B_TEXT = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
QWEN_7B_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                  "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                  "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]}
QWEN_7B_PIXELS = {"min_pixels": 3136, "max_pixels": 12845056}

# FLUX.1-dev transformer/config.json and vae/config.json.
FLUX_DEV_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                        "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
FLUX_DEV_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
                "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
                "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "use_quant_conv": False,
                "use_post_quant_conv": False, "shift_factor": 0.1159, "scaling_factor": 0.3611}
FLUX_DEV_TEXT = (512, 4096, 768)  # T5 tokens, T5 width, CLIP pooled width


@contextlib.contextmanager
def on_device(device: torch.device | str, dtype: torch.dtype):
    """Construct modules directly on ``device`` in ``dtype`` (parameters and buffers)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def qwen_config(processor, shape: str, tiny_dir: Path | None = None):
    """A Qwen2_5_VLConfig for ``shape`` ("7b" or "tiny") whose token ids match ``processor``."""
    from transformers import AutoConfig, Qwen2_5_VLConfig

    if shape == "tiny":
        return AutoConfig.from_pretrained(tiny_dir / "reward")
    ids = processor.tokenizer.get_vocab()
    return Qwen2_5_VLConfig(
        text_config={**QWEN_7B_TEXT, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config=dict(QWEN_7B_VISION), image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)


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
    with on_device(device, dtype):
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        vae = AutoencoderKL(**FLUX_DEV_VAE)
    return FluxPipeline(scheduler=pipe.scheduler, vae=vae.eval(), text_encoder=pipe.text_encoder,
                        tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                        transformer=transformer)


def fresh_transformer(old, tiny_dir: Path, shape: str, device, dtype):
    """A newly built transformer of the same shape (the old one is freed first)."""
    from diffusers import FluxTransformer2DModel

    del old
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if shape == "tiny":
        return FluxTransformer2DModel.from_pretrained(tiny_dir / "flux" / "transformer", dtype=dtype).to(device)
    with on_device(device, dtype):
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
