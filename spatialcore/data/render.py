"""Rasterise scenes with PIL: flat-coloured shapes with a dark halo, drawn back to front.

Each object first darkens what lies under its outline dilated by ``halo`` pixels, then is
painted on top. Where an object overlaps one behind it, that halo leaves a band of the back
object's colour, darkened, along the front object's outline: occlusion you can see (and that
the pixel oracle reads). Shapes are never rotated; objects get small colour jitter.
"""

from __future__ import annotations

import random
from functools import lru_cache

from PIL import Image, ImageChops, ImageFilter

from ..vocab import BACKGROUNDS, COLOURS
from .geometry import shape_mask
from .scene import Scene

SHADE = 0.55  # halo darkening factor
_SHADE_LUT = [int(v * SHADE) for v in range(256)] * 3


def halo_px(size: int) -> int:
    return max(1, round(0.012 * size))


@lru_cache(maxsize=4096)
def _halo_mask(kind: str, side: int, halo: int) -> Image.Image:
    m = Image.new("L", (side + 2 * halo, side + 2 * halo), 0)
    m.paste(shape_mask(kind, side), (halo, halo))
    return m.filter(ImageFilter.MaxFilter(2 * halo + 1))


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def render(scene: Scene, size: int, rng: random.Random | None = None, *, colour_jitter: int = 8) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (objects in increasing z)."""
    rng = rng or random.Random(0)
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    halo = halo_px(size)
    for o in sorted(scene.objects, key=lambda o: o.z):
        side = max(4, round(2 * o.r * size))
        x0 = round(o.cx * size - side / 2)
        y0 = round(o.cy * size - side / 2)
        hm = _halo_mask(o.kind, side, halo)
        box = (x0 - halo, y0 - halo, x0 - halo + hm.width, y0 - halo + hm.height)
        img.paste(img.crop(box).point(_SHADE_LUT), box[:2], hm)
        img.paste(_jitter(COLOURS[o.colour], rng, colour_jitter), (x0, y0, x0 + side, y0 + side), shape_mask(o.kind, side))
    return img


def difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference (0..255) — used to check that pairs are not pixel-aligned."""
    diff = ImageChops.difference(a.convert("RGB"), b.convert("RGB")).convert("L")
    hist = diff.histogram()
    return sum(i * n for i, n in enumerate(hist)) / max(1, sum(hist))
