"""The real architectures with random weights: a full-shape run without downloads (``model=random:flux.1-dev``,
``reward.spatialscore.model=random:qwen2.5-vl-7b``), and the same option at the tiny shapes for a rehearsal on the
CPU (``random:tiny-flux``, ``random:tiny-qwen``).

    random:flux.1-dev     FLUX.1-dev's transformer and VAE (configs below), built on the device in the run's dtype;
                          the text path is a random source of T5-XXL / CLIP-L widths (512 x 4096 tokens, 768 pooled),
                          a fixed function of the prompt, since the real encoders are not built
    random:tiny-flux      the tiny Flux of ``spatialcore tiny`` (its own tiny text encoders)
    random:qwen2.5-vl-7b  Qwen2.5-VL-7B's backbone (no LM head), its image-size limits
    random:tiny-qwen      the tiny Qwen2.5-VL of ``spatialcore tiny``

Tokenizers and processors are the tiny ones (built once into a cache folder, ``SPATIALCORE_CACHE``, default
``~/.cache/spatialcore``): they decide token ids, not the work per token. Weights come from ``seed`` (the same on
every rank and every time, so a LoRA saved on a random base loads back onto it). Everything the runs compute is
meaningless as images or scores; the time, the memory and the code path are the real ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch

RANDOM = "random:"
FLUX_SHAPES = ("flux.1-dev", "tiny-flux")
QWEN_SHAPES = ("qwen2.5-vl-7b", "tiny-qwen")

# Qwen2.5-VL-7B-Instruct's config.json (text + vision), minus the token ids (taken from the processor).
QWEN_7B_TEXT = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
QWEN_7B_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                  "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                  "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]}
QWEN_7B_PIXELS = {"min_pixels": 3136, "max_pixels": 12845056}

# FLUX.1-dev transformer/config.json, vae/config.json and scheduler settings.
FLUX_DEV_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                        "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
FLUX_DEV_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
                "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
                "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "use_quant_conv": False,
                "use_post_quant_conv": False, "shift_factor": 0.1159, "scaling_factor": 0.3611}
FLUX_DEV_TEXT = (512, 4096, 768)  # T5 tokens, T5 width, CLIP pooled width


def random_shape(value: str | os.PathLike | None) -> str | None:
    """The shape a ``random:SHAPE`` model names (None for a path or hub id); an unknown shape is a ValueError."""
    if value is None or not str(value).startswith(RANDOM):
        return None
    shape = str(value)[len(RANDOM):]
    if shape not in FLUX_SHAPES + QWEN_SHAPES:
        raise ValueError(f"unknown random model {value!r} (random:{'|'.join(FLUX_SHAPES + QWEN_SHAPES)})")
    return shape


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


@contextlib.contextmanager
def seeded(seed: int):
    """Module initialisation from ``seed`` without touching the run's own random streams."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_base(seed: int = 0) -> Path:
    """The tiny checkpoints of ``spatialcore tiny`` (seed ``seed``) in the cache, built on first use: the tokenizers and
    processors of the random models, and the tiny shapes themselves."""
    from .tiny import TinyConfig, build_tiny

    root = Path(os.environ.get("SPATIALCORE_CACHE", Path.home() / ".cache" / "spatialcore")) / f"tiny-{seed}"
    if not (root / "tiny.yaml").is_file():
        try:
            build_tiny(TinyConfig(seed=seed), root, overwrite=True)
        except OSError:  # another rank renamed its build into place first
            if not (root / "tiny.yaml").is_file():
                raise
    return root


class RandomText:
    """A text source of FLUX.1-dev's widths: per prompt, T5 tokens ``[L, 4096]`` and a CLIP pooled vector ``[768]``,
    standard normal, a fixed function of the prompt's text (no encoder is built)."""

    def __init__(self, width: int = FLUX_DEV_TEXT[1], pooled: int = FLUX_DEV_TEXT[2]):
        self.width, self.pooled = width, pooled

    def __call__(self, prompts: list[str], length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        emb, pooled = [], []
        for p in prompts:
            g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little"))
            emb.append(torch.randn(length, self.width, generator=g))
            pooled.append(torch.randn(self.pooled, generator=g))
        return torch.stack(emb).to(device, dtype), torch.stack(pooled).to(device, dtype)


def random_flux_pipeline(shape: str, *, device, dtype: torch.dtype, seed: int = 0):
    """A FluxPipeline of ``shape`` (``FLUX_SHAPES``) with random weights on ``device``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tiny = FluxPipeline.from_pretrained(tiny_base() / "flux", dtype=dtype)
    if shape == "tiny-flux":
        return tiny.to(device)
    with seeded(seed), on_device(device, dtype):
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        vae = AutoencoderKL(**FLUX_DEV_VAE).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=tiny.text_encoder.to(device), tokenizer=tiny.tokenizer,
                        text_encoder_2=tiny.text_encoder_2.to(device), tokenizer_2=tiny.tokenizer_2,
                        transformer=transformer)
    pipe.random_text = RandomText()
    return pipe


def qwen_config(processor, shape: str):
    """The Qwen2_5_VLConfig of ``shape`` (``QWEN_SHAPES``) whose token ids match ``processor``."""
    from transformers import AutoConfig, Qwen2_5_VLConfig

    if shape == "tiny-qwen":
        return AutoConfig.from_pretrained(tiny_base() / "reward")
    ids = processor.tokenizer.get_vocab()
    return Qwen2_5_VLConfig(
        text_config={**QWEN_7B_TEXT, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config=dict(QWEN_7B_VISION), image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)


def qwen_processor(shape: str):
    """The tiny processor; for the 7B with Qwen2.5-VL-7B's image-size limits."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_base() / "reward", **(QWEN_7B_PIXELS if shape == "qwen2.5-vl-7b" else {}))


def random_qwen_backbone(shape: str, *, device, dtype: torch.dtype | None, attention: str = "sdpa", seed: int = 0):
    """(``Qwen2_5_VLModel`` of ``shape`` with random weights on ``device``, its processor)."""
    from transformers import Qwen2_5_VLModel

    processor = qwen_processor(shape)
    config = qwen_config(processor, shape)
    config._attn_implementation = attention
    with seeded(seed), on_device(device, dtype or torch.float32):
        backbone = Qwen2_5_VLModel(config)
    return backbone, processor
