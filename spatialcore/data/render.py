"""Rasterise scenes with PIL: flat-coloured shapes with a dark halo, drawn back to front.

Each object first darkens what lies under its outline dilated by ``halo`` pixels, then is
painted on top. Where an object overlaps one behind it, that halo leaves a band of the back
object's colour, darkened, along the front object's outline: occlusion you can see (and that
the pixel oracle reads). Shapes are never rotated; objects get small colour jitter.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from ..vocab import BACKGROUNDS, COLOURS
from .scene import Scene

SHADE = 0.55  # halo darkening factor
_SHADE_LUT = [int(v * SHADE) for v in range(256)] * 3


def halo_px(size: int) -> int:
    return max(1, round(0.012 * size))


@lru_cache(maxsize=4096)
def shape_mask(kind: str, side: int) -> Image.Image:
    """An ``L`` mask (255 inside) of ``kind`` drawn in a ``side`` x ``side`` box."""
    s = side
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    e = s - 1
    if kind == "square":
        d.rectangle((0.08 * e, 0.08 * e, 0.92 * e, 0.92 * e), fill=255)
    elif kind == "circle":
        d.ellipse((0, 0, e, e), fill=255)
    elif kind == "triangle":
        d.polygon([(0.5 * e, 0), (e, e), (0, e)], fill=255)
    elif kind == "diamond":
        d.polygon([(0.5 * e, 0), (e, 0.5 * e), (0.5 * e, e), (0, 0.5 * e)], fill=255)
    elif kind == "hexagon":
        d.polygon([(0.5 * e + 0.5 * e * math.cos(a), 0.5 * e + 0.5 * e * math.sin(a))
                   for a in (math.pi / 3 * k for k in range(6))], fill=255)
    elif kind == "star":
        pts = []
        for k in range(10):
            rad = 0.5 * e if k % 2 == 0 else 0.22 * e
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((0.5 * e + rad * math.cos(a), 0.55 * e + rad * math.sin(a)))
        d.polygon(pts, fill=255)
    elif kind == "ring":
        d.ellipse((0, 0, e, e), fill=255)
        d.ellipse((0.27 * e, 0.27 * e, 0.73 * e, 0.73 * e), fill=0)
    elif kind == "cross":
        d.rectangle((0.33 * e, 0, 0.67 * e, e), fill=255)
        d.rectangle((0, 0.33 * e, e, 0.67 * e), fill=255)
    elif kind == "crescent":
        d.ellipse((0, 0, e, e), fill=255)
        d.ellipse((0.35 * e, -0.05 * e, 1.25 * e, 0.95 * e), fill=0)
    elif kind == "arrow":
        d.rectangle((0, 0.36 * e, 0.55 * e, 0.64 * e), fill=255)
        d.polygon([(0.5 * e, 0.05 * e), (e, 0.5 * e), (0.5 * e, 0.95 * e)], fill=255)
    else:
        raise ValueError(f"unknown object kind {kind!r}")
    return m


@lru_cache(maxsize=8192)
def _shape_bool(kind: str, side: int) -> np.ndarray:
    return np.asarray(shape_mask(kind, side)) > 127


@lru_cache(maxsize=8192)
def shape_area(kind: str, side: int) -> int:
    return max(1, int(np.count_nonzero(_shape_bool(kind, side))))


def shape_array(o, size: int) -> tuple[np.ndarray, int, int]:
    """(bool mask, x0, y0) of object ``o`` drawn in a ``size`` x ``size`` image."""
    side = max(4, round(2 * o.r * size))
    return _shape_bool(o.kind, side), round(o.cx * size - side / 2), round(o.cy * size - side / 2)


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
