"""Oracles that judge spatial relations: on the scene graph, and on pixels alone.

Pixel oracle (any RGB image, generated ones included):

1. every pixel gets the nearest reference colour (object colours, their halo-darkened shades,
   backgrounds and their shades) if it is within ``MAX_COLOUR_DIST``;
2. an object named "red star" is the set of red (or darkened red) pixels; it is *found* when
   there are enough of them and their shape is not clearly another kind (template IoU);
3. relations are decided on the found objects: centroids for directions, centroid distance
   minus half the bounding-box size for "next to", and for depth the halo the front object
   leaves on the one behind it (darkened back-object pixels along the front object's outline).

A relation whose objects cannot be found, or whose depth order shows no evidence, is
``None`` ("cannot tell"), never a guess. A found colour with a clearly different shape makes
the named object absent, so its relations are False.

:func:`pixel_score` is the continuous reward: per relation a signed, normalised distance
between the soft colour-mass centroids of the named objects along the relation's axis, in
[-1, 1], averaged over the prompt's relations.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from ..vocab import BACKGROUNDS, COLOURS, OBJECTS
from .geometry import (
    DEPTH,
    DIRECTIONAL,
    NEXT_TO,
    directional_value,
    relation_value,
    segment_position,
    shape_mask,
)
from .render import SHADE, halo_px
from .scene import Relation, parse_prompt

MAX_COLOUR_DIST = 60.0
TEMPLATE = 24
MIN_SHAPE_PX = 20


@lru_cache(maxsize=1)
def _palette() -> tuple[np.ndarray, list[tuple[str, str]]]:
    labels: list[tuple[str, str]] = []
    rgb = []
    for name, c in COLOURS.items():
        labels += [("obj", name), ("shade", name)]
        rgb += [c, tuple(int(v * SHADE) for v in c)]
    for name, c in BACKGROUNDS.items():
        labels += [("bg", name), ("bgshade", name)]
        rgb += [c, tuple(int(v * SHADE) for v in c)]
    return np.array(rgb, dtype=np.float32), labels


@lru_cache(maxsize=1)
def _lut() -> np.ndarray:
    """Nearest palette entry for every colour quantised to 5 bits per channel (32^3 table)."""
    pal, _ = _palette()
    q = (np.arange(32, dtype=np.float32) * 8 + 4)
    grid = np.stack(np.meshgrid(q, q, q, indexing="ij"), -1).reshape(-1, 1, 3)
    d2 = ((grid - pal[None]) ** 2).sum(-1)
    idx = d2.argmin(-1)
    best = d2[np.arange(len(idx)), idx]
    return np.where(best <= MAX_COLOUR_DIST**2, idx, -1).astype(np.int16).reshape(32, 32, 32)


def label_map(image: Image.Image) -> np.ndarray:
    """Index into the palette per pixel (-1: matches nothing)."""
    arr = np.asarray(image.convert("RGB")) >> 3
    return _lut()[arr[..., 0], arr[..., 1], arr[..., 2]]


@lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    out = {}
    for kind in OBJECTS:
        m = np.asarray(shape_mask(kind, 96)) > 127
        ys, xs = np.nonzero(m)
        crop = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        out[kind] = _resize_bool(crop, TEMPLATE)
    return out


def _resize_bool(m: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((n, n), Image.NEAREST)) > 127


@dataclass
class Detection:
    colour: str
    mask: np.ndarray  # body pixels: the colour and its darkened shade
    shade: np.ndarray  # the darkened pixels only
    cx: float  # centroid, fraction of width
    cy: float
    half: float  # half the larger bounding-box side, fraction of width
    side_px: int  # larger bounding-box side in pixels
    kind_scores: dict[str, float]

    def kind_ok(self, kind: str) -> bool:
        """False only when the shape is clearly another kind. A partly covered object (it shows
        another object's halo) is not judged by shape: its outline is incomplete; nor is one
        smaller than MIN_SHAPE_PX, where the templates cannot tell shapes apart."""
        if self.shade.sum() > 0 or self.side_px < MIN_SHAPE_PX:
            return True
        best = max(self.kind_scores.values())
        return self.kind_scores[kind] >= best - 0.03


def detect(image: Image.Image, labels: np.ndarray | None = None, min_frac: float = 1e-3) -> dict[str, Detection]:
    """Objects found per colour name (only colours with enough pixels)."""
    labels = label_map(image) if labels is None else labels
    _, names = _palette()
    H, W = labels.shape
    out = {}
    for i, (role, name) in enumerate(names):
        if role != "obj":
            continue
        body = labels == i
        shade = labels == i + 1
        mask = body | shade
        n = int(mask.sum())
        if n < max(6, min_frac * H * W) or body.sum() < n * 0.3:
            continue
        ys, xs = np.nonzero(mask)
        crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        small = _resize_bool(crop, TEMPLATE)
        scores = {k: float((small & t).sum() / max(1, (small | t).sum())) for k, t in _templates().items()}
        side = int(max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1))
        out[name] = Detection(name, mask, shade, float(xs.mean() + 0.5) / W, float(ys.mean() + 0.5) / H,
                              side / 2 / W, side, scores)
    return out


def _dilate(m: np.ndarray, k: int) -> np.ndarray:
    out = m.copy()
    for _ in range(k):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _depth(a: Detection, b: Detection, halo: int) -> bool | None:
    """True if a is in front of b, False if behind or apart, None without evidence."""
    if not (_dilate(a.mask, 2) & b.mask).any():
        return False  # apart: neither occludes the other
    near_a = _dilate(a.mask, halo + 1)
    near_b = _dilate(b.mask, halo + 1)
    a_on_b = int((b.shade & near_a & ~a.mask).sum())
    b_on_a = int((a.shade & near_b & ~b.mask).sum())
    if max(a_on_b, b_on_a) < 3:
        return None
    if a_on_b > 2 * b_on_a:
        return True
    if b_on_a > 2 * a_on_b:
        return False
    return None


def judge(image: Image.Image, relations: list[Relation]) -> list[bool | None]:
    """Pixel-oracle verdict per relation: True, False, or None (cannot tell)."""
    labels = label_map(image)
    found = detect(image, labels)
    halo = halo_px(image.width)
    return [_judge_one(rel, found, halo) for rel in relations]


def _judge_one(rel: Relation, found: dict[str, Detection], halo: int) -> bool | None:
    dets = [found.get(colour) for colour, _ in rel.args]
    if any(d is not None and not d.kind_ok(kind) for d, (_, kind) in zip(dets, rel.args, strict=True)):
        return False  # that colour is clearly another shape: the named object is absent
    if any(d is None for d in dets):
        return None
    return _decide(rel.type, dets, halo)


def _decide(rtype: str, d: list[Detection], halo: int) -> bool | None:
    a, b = d[0], d[1]
    if rtype in DIRECTIONAL:
        return directional_value(rtype, (a.cx, a.cy), (b.cx, b.cy)) > 0
    if rtype == "next to":
        gap = float(np.hypot(a.cx - b.cx, a.cy - b.cy)) - a.half - b.half
        return gap < NEXT_TO
    if rtype in DEPTH:
        return _depth(a, b, halo) if rtype == "in front of" else _depth(b, a, halo)
    if rtype == "between":
        t, perp = segment_position((a.cx, a.cy), (b.cx, b.cy), (d[2].cx, d[2].cy))
        return 0 < t < 1 and perp < 0.15
    raise ValueError(f"unknown relation type {rtype!r}")


def judge_prompt(image: Image.Image, prompt: str) -> list[bool | None]:
    return judge(image, parse_prompt(prompt))


@lru_cache(maxsize=4096)
def prompt_relations(prompt: str) -> list[Relation]:
    """The relations of a synthetic-grammar prompt (cached); a prompt of another grammar is a ValueError
    (one line, what the oracle rewards and tables refuse it with)."""
    rels = parse_prompt(prompt)
    if not rels:
        raise ValueError(f"the pixel oracle needs synthetic-grammar prompts; cannot parse {prompt!r}")
    return rels


def relations_true(image: Image.Image, prompt: str) -> float:
    """The fraction of ``prompt``'s relations the pixel oracle judges true in ``image`` (an undecidable one,
    an object not found, counts as false)."""
    verdicts = judge(image, prompt_relations(prompt))
    return sum(v is True for v in verdicts) / len(verdicts)


# ----------------------------------------------------------------------------- continuous reward


def colour_mass(arr: np.ndarray, rgb: tuple[int, int, int], tau: float = 40.0) -> tuple[float, float, float]:
    """(total mass, cx, cy) of soft colour similarity exp(-|c - rgb|^2 / 2 tau^2) over an HxWx3 array."""
    H, W, _ = arr.shape
    w = np.exp(-((arr - np.asarray(rgb, dtype=np.float32)) ** 2).sum(-1) / (2 * tau * tau))
    total = float(w.sum())
    if total <= 0:
        return 0.0, 0.5, 0.5
    ys, xs = np.mgrid[0:H, 0:W]
    return total / (H * W), float((w * (xs + 0.5)).sum() / total / W), float((w * (ys + 0.5)).sum() / total / H)


def pixel_score(image: Image.Image, relations: list[Relation] | str, *, min_mass: float = 1e-3) -> float:
    """Continuous spatial reward in [-1, 1] (mean over relations); -1 for an absent colour."""
    if isinstance(relations, str):
        relations = parse_prompt(relations)
    if not relations:
        return 0.0
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    cache: dict[str, tuple[float, float, float]] = {}
    scores = []
    for rel in relations:
        pts = []
        for colour, _ in rel.args:
            if colour not in cache:
                cache[colour] = colour_mass(arr, COLOURS[colour])
            pts.append(cache[colour])
        if any(m < min_mass for m, _, _ in pts):
            scores.append(-1.0)
            continue
        s = relation_value(rel.type, [(x, y) for _, x, y in pts])
        scores.append(float(np.clip(2 * s, -1.0, 1.0)))
    return float(np.mean(scores))
