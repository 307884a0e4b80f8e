"""Tiny, randomly initialised Qwen2.5-VL and Flux checkpoints built fully offline.

``build_tiny(cfg, out)`` writes

* ``out/reward/``: a Qwen2.5-VL checkpoint (a few hundred thousand parameters) with a byte-level
  BPE tokenizer trained here on the synthetic prompt vocabulary plus Qwen's special tokens
  and chat template, and the stock Qwen2.5-VL image processor with small min/max pixels;
* ``out/flux/``: a Flux pipeline (CLIP and T5 encoders with locally trained tokenizers,
  ``AutoencoderKL``, ``FluxTransformer2DModel``, ``FlowMatchEulerDiscreteScheduler``).

Both load with the stock ``from_pretrained`` classes under ``HF_HUB_OFFLINE=1``: the code that
later loads ``Qwen/Qwen2.5-VL-7B-Instruct`` or ``black-forest-labs/FLUX.1-dev`` is the same code
that tests and the demo run on these. Output is deterministic for a seed (bit-identical files).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_dir
from .config import ConfigError, param, save_config
from .vocab import tokenizer_corpus

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# Qwen2.5-VL's chat template, reduced to what a reward model needs (images and text turns).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyRewardConfig:
    text_hidden: int = param(64, min=8, help="text hidden size")
    text_layers: int = param(2, min=1)
    text_heads: int = param(4, min=1)
    text_kv_heads: int = param(2, min=1)
    text_intermediate: int = param(128, min=8)
    # A small theta: with head dim 16 the stock 1e6 leaves the image's horizontal axis
    # almost unrotated, and the tiny model cannot tell left from right.
    text_rope_theta: float = param(100.0, min=1.0)
    vision_hidden: int = param(64, min=8)
    vision_layers: int = param(2, min=1)
    vision_heads: int = param(4, min=1)
    vision_intermediate: int = param(128, min=8)
    # The stock 0.02 makes the tiny model's output collapse to a constant early in training.
    init_std: float = param(0.1, min=0.0)
    vocab_size: int = param(512, min=len(QWEN_SPECIAL_TOKENS) + 256 + 1, help="BPE target size")
    min_pixels: int = param(56 * 56, min=28 * 28)
    max_pixels: int = param(112 * 112, min=28 * 28)

    def check(self) -> None:
        if self.text_hidden % self.text_heads:
            raise ConfigError("text_hidden", f"{self.text_hidden} is not divisible by text_heads={self.text_heads}")
        head_dim = self.text_hidden // self.text_heads
        if head_dim % 2 or head_dim < 8:
            raise ConfigError("text_heads", f"text head dim {head_dim} must be even and >= 8 (multimodal RoPE)")
        if self.text_heads % self.text_kv_heads:
            raise ConfigError("text_kv_heads", f"text_heads={self.text_heads} is not a multiple of {self.text_kv_heads}")
        if self.vision_hidden % self.vision_heads:
            raise ConfigError("vision_hidden", f"{self.vision_hidden} is not divisible by vision_heads={self.vision_heads}")
        if (self.vision_hidden // self.vision_heads) % 4:
            raise ConfigError("vision_heads", "vision head dim must be a multiple of 4 (2-D rotary)")
        if self.min_pixels > self.max_pixels:
            raise ConfigError("min_pixels", f"{self.min_pixels} exceeds max_pixels={self.max_pixels}")


@dataclass
class TinyFluxConfig:
    clip_hidden: int = param(32, min=8)
    clip_layers: int = param(2, min=1)
    t5_hidden: int = param(32, min=8)
    t5_layers: int = param(2, min=1)
    heads: int = param(2, min=1)
    head_dim: int = param(16, min=8)
    double_layers: int = param(1, min=0, help="dual-stream (MMDiT) blocks")
    single_layers: int = param(1, min=0, help="single-stream blocks")
    guidance_embeds: bool = param(True, help="FLUX.1-dev's guidance embedder (False: FLUX.1-schnell's layout, "
                                             "~50k fewer parameters at 4 x 32 heads)")
    vae_channels: list[int] = param(default_factory=lambda: [8, 16, 16], min=4)
    latent_channels: int = param(4, min=1)
    clip_vocab_size: int = param(1024, min=300, help="BPE target size (large enough for one token per word)")
    # Longest prompt in tokens (both tokenizers are word-level: the hard preset's longest is ~150).
    max_sequence_length: int = param(256, min=8, max=512)
    sample_size: int = param(64, min=16)

    def check(self) -> None:
        if self.head_dim % 4:
            raise ConfigError("head_dim", f"{self.head_dim} must be a multiple of 4 (3-axis RoPE)")
        if not self.vae_channels:
            raise ConfigError("vae_channels", "needs at least one block")
        if any(c % 4 for c in self.vae_channels):
            raise ConfigError("vae_channels", "each entry must be a multiple of 4 (GroupNorm with 4 groups)")
        if self.double_layers + self.single_layers == 0:
            raise ConfigError("single_layers", "the transformer needs at least one block")
        if self.t5_hidden % 4:
            raise ConfigError("t5_hidden", "must be a multiple of 4 (4 attention heads)")


@dataclass
class TinyConfig:
    seed: int = param(0, min=0)
    reward: TinyRewardConfig = field(default_factory=TinyRewardConfig)
    flux: TinyFluxConfig = field(default_factory=TinyFluxConfig)


def mrope_sections(head_dim: int) -> list[int]:
    """Split half the rotary dims into (temporal, height, width) like Qwen's [16, 24, 24]."""
    half = head_dim // 2
    hw = (3 * half) // 8
    return [half - 2 * hw, hw, hw]


def flux_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Split a Flux head into (text-id, height, width) rotary dims like FLUX.1's (16, 56, 56)."""
    hw = (7 * head_dim // 16) // 2 * 2
    return (head_dim - 2 * hw, hw, hw)


def _train_bpe(corpus: list[str], vocab_size: int, special: list[str], *, clip: bool = False):
    """Train a byte-level BPE and rebuild it with a canonical id order.

    ``clip``: CLIP's normalisation and pre-tokenisation (lower case, words split off spaces and
    punctuation, ``</w>`` ending each word), so that the merges learned here are the ones
    ``CLIPTokenizer`` applies; with a vocabulary larger than the corpus needs, every corpus word
    ends as one token. The trainer numbers its initial alphabet in hash order, so ids differ
    between runs; renumbering as specials, sorted alphabet, then tokens in merge order makes the
    files bit-identical for a seed.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    suffix = {"end_of_word_suffix": "</w>"} if clip else {}

    def fresh(model):
        tok = Tokenizer(model)
        if clip:  # as transformers' CLIPTokenizer
            tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                   normalizers.Lowercase()])
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                                           r"""[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False)])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok

    tok = fresh(models.BPE(**suffix))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **suffix)
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    produced = list(dict.fromkeys("".join(m) for m in merges))
    skip = set(special) | set(produced)
    order = list(special) + sorted(t for t in model["vocab"] if t not in skip) + produced
    vocab = {t: i for i, t in enumerate(order)}
    tok = fresh(models.BPE(vocab=vocab, merges=merges, **suffix))
    tok.add_special_tokens(list(special))
    return tok, vocab, merges


def _t5_pieces(corpus: list[str]) -> list[tuple[str, float]]:
    """A word-level SentencePiece unigram vocabulary for the T5 tokenizer: every corpus word (as
    written and capitalised) is one piece, punctuation is its own piece, and single characters are a
    costly fallback so that any text still tokenizes. Deterministic (sorted, fixed scores)."""
    import string

    words: set[str] = set()
    for line in corpus:
        for w in re.findall(r"[A-Za-z]+", line):
            words |= {w, w.lower(), w[0].upper() + w[1:]}
    punct = sorted(set(string.punctuation))
    chars = sorted(set(string.ascii_letters + string.digits))
    head = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    return (head + [("\u2581" + w, -2.0) for w in sorted(words)] + [(p, -3.0) for p in punct]
            + [("\u2581", -6.0)] + [(c, -10.0) for c in chars])


def build_reward(cfg: TinyRewardConfig, out: Path, seed: int, corpus: list[str]) -> dict:
    """Write the tiny Qwen2.5-VL checkpoint + processor to ``out``; returns a summary."""
    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    bpe, _, _ = _train_bpe(corpus, cfg.vocab_size, list(QWEN_SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]), model_max_length=4096,
        padding_side="left", chat_template=QWEN_CHAT_TEMPLATE,
    )
    pixels = {"min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels), video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE,
    )
    ids = tokenizer.get_vocab()
    head_dim = cfg.text_hidden // cfg.text_heads
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": cfg.text_hidden, "intermediate_size": cfg.text_intermediate,
            "num_hidden_layers": cfg.text_layers, "num_attention_heads": cfg.text_heads,
            "num_key_value_heads": cfg.text_kv_heads, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.text_rope_theta,
                                "mrope_section": mrope_sections(head_dim)},
            "initializer_range": cfg.init_std, "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": cfg.vision_layers, "hidden_size": cfg.vision_hidden, "intermediate_size": cfg.vision_intermediate,
            "num_heads": cfg.vision_heads, "out_hidden_size": cfg.text_hidden, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
            "fullatt_block_indexes": [cfg.vision_layers - 1], "initializer_range": cfg.init_std,
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    return {"path": str(out), "parameters": n_params, "vocab": len(tokenizer)}


def build_flux(cfg: TinyFluxConfig, out: Path, seed: int, corpus: list[str]) -> dict:
    """Write the tiny Flux pipeline to ``out``; returns a summary."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    _, clip_vocab, clip_merges = _train_bpe(corpus, cfg.clip_vocab_size, ["<|startoftext|>", "<|endoftext|>"],
                                            clip=True)
    clip_tok = CLIPTokenizer(vocab=clip_vocab, merges=clip_merges, model_max_length=cfg.max_sequence_length)
    t5_tok = T5Tokenizer(vocab=_t5_pieces(corpus), extra_ids=0, model_max_length=cfg.max_sequence_length)

    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=cfg.clip_hidden, intermediate_size=2 * cfg.clip_hidden,
        num_hidden_layers=cfg.clip_layers, num_attention_heads=2,
        max_position_embeddings=cfg.max_sequence_length,
        projection_dim=cfg.clip_hidden, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=cfg.t5_hidden, d_kv=cfg.t5_hidden // 4, d_ff=2 * cfg.t5_hidden,
        num_layers=cfg.t5_layers, num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * cfg.latent_channels, num_layers=cfg.double_layers,
        num_single_layers=cfg.single_layers, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.t5_hidden, pooled_projection_dim=cfg.clip_hidden, guidance_embeds=cfg.guidance_embeds,
        axes_dims_rope=flux_rope_axes(cfg.head_dim))
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.vae_channels), layers_per_block=1,
        latent_channels=cfg.latent_channels, norm_num_groups=4, sample_size=cfg.sample_size,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    # FLUX.1-dev's scheduler settings (resolution-dependent shift).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(out)
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    return {"path": str(out), "parameters": counts}


def build_tiny(cfg: TinyConfig, out: str | Path, *, overwrite: bool = False) -> dict:
    """Build both tiny checkpoints under ``out`` (atomically: a temp dir renamed into place)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --force)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with atomic_dir(out) as tmp:
        corpus = tokenizer_corpus(cfg.seed)
        summary = {
            "seed": cfg.seed,
            "reward": build_reward(cfg.reward, tmp / "reward", cfg.seed, corpus),
            "flux": build_flux(cfg.flux, tmp / "flux", cfg.seed, corpus),
        }
        save_config(cfg, tmp / "tiny.yaml")
    summary["reward"]["path"] = str(out / "reward")
    summary["flux"]["path"] = str(out / "flux")
    return summary
