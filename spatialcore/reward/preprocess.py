"""Qwen2.5-VL image preprocessing on tensors, on whatever device they live (no PIL round-trip).

Matches the stock ``Qwen2VLImageProcessor`` (same ``smart_resize`` rule, bicubic resize,
CLIP mean/std normalisation, the (merge-grouped) patch layout with the frame repeated over
``temporal_patch_size``), so images straight from a generator on the GPU can be scored without
copying them to the host; and the batches a reward model reads: the chat text of a judgement, tensors of
judgements equal to the processor's output, and the collator of preference pairs.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_images(images: torch.Tensor, *, min_pixels: int, max_pixels: int, patch_size: int = 14,
                      merge_size: int = 2, temporal_patch_size: int = 2, mean=CLIP_MEAN, std=CLIP_STD,
                      value_range: tuple[float, float] = (0.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """``images [B, 3, H, W]`` (values in ``value_range``) -> ``(pixel_values, image_grid_thw)``.

    ``pixel_values`` is ``[B * grid_h * grid_w, 3 * temporal_patch_size * patch_size**2]`` float32 and
    ``image_grid_thw`` ``[B, 3]`` int64, laid out exactly like the stock processor's output.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    B, C, H, W = images.shape
    factor = patch_size * merge_size
    rh, rw = smart_resize(H, W, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    lo, hi = value_range
    # The stock path works on uint8 images: quantise first, resize with the same torchvision op.
    x = ((images.float() - lo) * (255.0 / (hi - lo))).round().clamp(0, 255).to(torch.uint8)
    if (rh, rw) != (H, W):
        x = tvF.resize(x, [rh, rw], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    x = x.float()
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    x = (x / 255.0 - m) / s
    gh, gw = rh // patch_size, rw // patch_size
    p = x.reshape(B, C, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    p = p.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [B, gh/m, gw/m, m, m, C, P, P]
    p = p.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal_patch_size, -1, -1)
    pixel_values = p.reshape(B * gh * gw, C * temporal_patch_size * patch_size * patch_size)
    grid = torch.tensor([[1, gh, gw]] * B, dtype=torch.long, device=images.device)
    return pixel_values, grid


def chat_text(processor, prompt: str) -> str:
    """The chat-templated text for one (image, prompt) judgement."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, tokenize=False)


def encode_judgements(processor, texts: list[str], images: torch.Tensor) -> dict:
    """Processor-equivalent batch for chat texts with one image each, from a ``[N, 3, H, W]``
    tensor in [0, 1] (on any device): the same ``input_ids``, ``attention_mask``,
    ``pixel_values`` and ``image_grid_thw`` as the stock processor, without PIL or per-image
    Python work."""
    ip = processor.image_processor
    pixel_values, grid = preprocess_images(images, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"],
                                           patch_size=ip.patch_size, merge_size=ip.merge_size,
                                           temporal_patch_size=ip.temporal_patch_size)
    n_tokens = int(grid[0].prod()) // ip.merge_size**2
    token = processor.image_token
    expanded = [t.replace(token, token * n_tokens, 1) for t in texts]
    tok = processor.tokenizer(expanded, return_tensors="pt", padding=True)
    return {"input_ids": tok.input_ids, "attention_mask": tok.attention_mask, "pixel_values": pixel_values,
            "image_grid_thw": grid}


def stack_images(images: list[Image.Image]) -> torch.Tensor | None:
    """``[N, 3, H, W]`` float in [0, 1] when all images share one size, else None."""
    if len({im.size for im in images}) != 1:
        return None
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


class PairCollator:
    """Batches pair items for a Qwen2.5-VL reward model: the 2B (prompt, image) judgements,
    chosen images first, then rejected. Same-size images take the tensor path
    (:func:`encode_judgements`, equal to the stock processor's output); mixed sizes go through
    the stock processor."""

    def __init__(self, processor):
        self.processor = processor
        self._texts: dict[str, str] = {}

    def _text(self, prompt: str) -> str:
        if prompt not in self._texts:
            self._texts[prompt] = chat_text(self.processor, prompt)
        return self._texts[prompt]

    def __call__(self, items: list[dict]) -> dict:
        texts = [self._text(it["prompt"]) for it in items]
        images = [it["chosen"] for it in items] + [it["rejected"] for it in items]
        stacked = stack_images(images)
        if stacked is not None:
            inputs = encode_judgements(self.processor, texts + texts, stacked)
        else:
            inputs = dict(self.processor(text=texts + texts, images=images, return_tensors="pt", padding=True))
            inputs.pop("mm_token_type_ids", None)
        return {"inputs": inputs, "ids": [it["id"] for it in items], "prompts": [it["prompt"] for it in items],
                "n_perturbations": torch.tensor([it["n_perturbations"] for it in items])}
