"""Qwen2.5-VL image preprocessing on tensors, on whatever device they live (no PIL round-trip).

Matches the stock ``Qwen2VLImageProcessor`` (same ``smart_resize`` rule, bicubic resize,
CLIP mean/std normalisation, the (merge-grouped) patch layout with the frame repeated over
``temporal_patch_size``), so images straight from a generator on the GPU can be scored without
copying them to the host.
"""

from __future__ import annotations

import torch
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
