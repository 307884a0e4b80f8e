"""Scene geometry shared by the layouts, the renderer and the oracles: relation categories,
shape rasters and the signed relation values on points.

Coordinates are fractions of the image side, y grows downwards. A relation's value is a
signed distance from its decision boundary (> 0: the relation holds):

    left of (a, b): x_b - x_a        right of: x_a - x_b
    above (a, b):   y_b - y_a        below:    y_a - y_b
    between (a; b, c): t = projection of a on the segment b -> c (0 at b, 1 at c)

:mod:`.scene` decides relations on objects (radii, drawing order) and :mod:`.oracle` on
colour-mass centroids found in pixels; both take the directional and "between" geometry from
here, and :mod:`.render` and the scene's overlap test draw the same shape rasters.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

DIRECTIONAL = ("left of", "right of", "above", "below")
DEPTH = ("in front of", "behind")
NEXT_TO = 0.12  # "next to": the gap between two objects' boxes is below this
POSITION_THRESHOLD = 0.1  # GenEval's position rule: offsets shrink by this x the summed box sizes

Point = tuple[float, float]


def directional_value(rtype: str, a: Point, b: Point) -> float:
    """Signed value of a directional relation ``a <rtype> b`` between two points."""
    (ax, ay), (bx, by) = a, b
    if rtype == "left of":
        return bx - ax
    if rtype == "right of":
        return ax - bx
    if rtype == "above":
        return by - ay
    if rtype == "below":
        return ay - by
    raise ValueError(f"not a directional relation: {rtype!r}")


def geneval_relations(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """The directional relations of box A relative to box B (``[x0, y0, x1, y1]``, any unit) by
    GenEval's rule (``relative_position`` in djghosh13/geneval's ``evaluation/evaluate_images.py``).

    Plain float arithmetic, not numpy: the layout sampler asks this of every candidate position
    (about 300 calls per pair of the hard preset), where numpy's per-call overhead on 2-vectors
    was about half of a pair's time."""
    ax0, ay0, ax1, ay1 = (float(v) for v in box_a[:4])
    bx0, by0, bx1, by1 = (float(v) for v in box_b[:4])
    ox = (ax0 + ax1) / 2 - (bx0 + bx1) / 2
    oy = (ay0 + ay1) / 2 - (by0 + by1) / 2
    sx = max(abs(ox) - threshold * (abs(ax1 - ax0) + abs(bx1 - bx0)), 0.0) * ((ox > 0) - (ox < 0))
    sy = max(abs(oy) - threshold * (abs(ay1 - ay0) + abs(by1 - by0)), 0.0) * ((oy > 0) - (oy < 0))
    if abs(sx) < 1e-3 and abs(sy) < 1e-3:
        return set()
    norm = math.sqrt(ox * ox + oy * oy)
    dx, dy = sx / norm, sy / norm
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def segment_position(a: Point, b: Point, c: Point) -> tuple[float, float]:
    """(t, perpendicular distance) of point ``a`` relative to the segment ``b -> c``."""
    (ax, ay), (bx, by), (cx, cy) = a, b, c
    vx, vy = cx - bx, cy - by
    n2 = vx * vx + vy * vy or 1e-9
    t = ((ax - bx) * vx + (ay - by) * vy) / n2
    perp = abs((ax - bx) * vy - (ay - by) * vx) / math.sqrt(n2)
    return t, perp


def relation_value(rtype: str, pts: list[Point]) -> float:
    """Signed, unclipped relation evidence from the points ``[(x, y), ...]`` of the relation's
    arguments alone (the pixel oracle's centroids): directions by axis, "between" by how far
    inside the segment the first point projects, "next to" and depth by closeness."""
    if rtype in DIRECTIONAL:
        return directional_value(rtype, pts[0], pts[1])
    if rtype == "between":
        t, _ = segment_position(pts[0], pts[1], pts[2])
        return 0.5 - abs(t - 0.5)
    if rtype == "next to" or rtype in DEPTH:
        (ax, ay), (bx, by) = pts[0], pts[1]
        return NEXT_TO + 0.2 - float(np.hypot(ax - bx, ay - by))
    raise ValueError(f"unknown relation type {rtype!r}")


# ----------------------------------------------------------------------------- shapes


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
    """(bool mask, x0, y0) of object ``o`` (``kind``, centre ``cx, cy``, half side ``r``) drawn in a
    ``size`` x ``size`` image."""
    side = max(4, round(2 * o.r * size))
    return _shape_bool(o.kind, side), round(o.cx * size - side / 2), round(o.cy * size - side / 2)
