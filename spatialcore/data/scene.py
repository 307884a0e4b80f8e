"""Scene graphs, spatial predicates, layouts, prompts and perturbations for synthetic pairs.

A scene holds objects (unique colour, unique kind, size class) laid out in a square image of
side 1 (coordinates are fractions of the side, y grows downwards, ``z`` is the drawing order)
and relations between them, each naming its objects by (colour, kind) identity.

Predicates (``value`` is a signed distance from the decision boundary, > 0 means true):

    left of (a, b):    cx_b - cx_a                right of: cx_a - cx_b
    above (a, b):      cy_b - cy_a                below:    cy_a - cy_b
    next to (a, b):    NEXT_TO - gap,  gap = |c_a - c_b| - r_a - r_b
    in front of (a, b): overlap(a, b) and z_a > z_b     behind: z_a < z_b
    between (a; b, c): a projects inside segment b-c (0 < t < 1) and lies near it

Layouts are sampled so that every relation that should hold does so by a clear margin and
every relation that should fail fails by a clear margin, so the scene-graph truth (decided at
the boundary) and what a pixel oracle measures agree.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np

from ..vocab import BACKGROUNDS, COLOURS, CONNECTIVES, OBJECTS, OPPOSITE, RELATIONS, SIZES
from .geometry import (
    DEPTH,
    DIRECTIONAL,
    NEXT_TO,
    directional_value,
    geneval_relations,
    segment_position,
    shape_area,
    shape_array,
)

SIZE_RADIUS = {"small": 0.075, "medium": 0.095, "large": 0.115}  # half box side, fraction of W
# What a perturbed scene may do: the published task's four (the defaults), "drop" (one named object is
# absent from the rejected image: what a generator does when it loses an object) and "duplicate" (a second
# copy of a named object, placed where the relations naming it fail: what a generator does when it hedges) and
# "nudge" (a directional relation a hair from the line: NUDGE on the wrong side in the rejected image, on the right
# side in the chosen one; ambiguous images, whose truth is hard to see even for the pixel oracle; opt-in).
PERTURBATIONS = ("flip", "swap", "relation", "binding", "drop", "duplicate", "nudge")
DEFAULT_PERTURBATIONS = PERTURBATIONS[:4]

# Decision boundaries (truth) and generation margins (layouts stay clear of the boundary).
MARGIN = 0.08          # directional: |cx_a - cx_b| >= MARGIN when generated
GENEVAL_MARGIN = 0.2   # ... and the relation holds by GenEval's position rule at twice its threshold
NEXT_HOLD = (0.03, 0.06)
NEXT_FAIL = 0.22
OCCLUDED = (0.15, 0.5)  # depth relations: share of the back object covered when generated
SEPARATE = 1.1         # unrelated objects: dist > 1.1 (r_a + r_b) + SEP_GAP
SEP_GAP = 0.02
GRID = 96              # resolution of the shape-overlap test
NUDGE = (0.01, 0.03)   # a nudged directional relation's value lies in [-0.03, -0.01] (0.6-1.7 px at 56 px)


@dataclass(frozen=True)
class Relation:
    """A relation over objects named by identity: ``("left of", (("red", "star"), ("blue", "ring")))``."""

    type: str
    args: tuple[tuple[str, str], ...]

    def text_key(self) -> str:
        return self.type + ":" + "|".join(f"{c} {k}" for c, k in self.args)


@dataclass
class Obj:
    colour: str
    kind: str
    size: str
    cx: float = 0.5
    cy: float = 0.5
    r: float = 0.1
    z: int = 0

    @property
    def ident(self) -> tuple[str, str]:
        return (self.colour, self.kind)


@dataclass
class Scene:
    objects: list[Obj]
    relations: list[Relation]
    background: str
    mention_background: bool = False
    show_sizes: bool = False
    negated: list[Relation] = field(default_factory=list)  # must be clearly false in the layout
    duplicate: tuple[str, str] | None = None  # perturbation: an object to add a second copy of after the layout
    nudge: list[int] = field(default_factory=list)  # perturbation: relations (indices) to fail by NUDGE after the layout

    def find(self, ident: tuple[str, str]) -> Obj | None:
        return next((o for o in self.objects if o.ident == ident), None)

    def to_meta(self) -> dict:
        return {
            "background": self.background,
            "objects": [{"colour": o.colour, "kind": o.kind, "size": o.size, "cx": round(o.cx, 4),
                         "cy": round(o.cy, 4), "r": round(o.r, 4), "z": o.z} for o in self.objects],
            "relations": [{"type": r.type, "args": [list(a) for a in r.args]} for r in self.relations],
        }

    @staticmethod
    def from_meta(meta: dict) -> Scene:
        objs = [Obj(o["colour"], o["kind"], o["size"], o["cx"], o["cy"], o["r"], o["z"]) for o in meta["objects"]]
        rels = [relation_from_meta(r) for r in meta["relations"]]
        return Scene(objs, rels, meta["background"])


def relation_from_meta(r: dict) -> Relation:
    return Relation(r["type"], tuple(tuple(a) for a in r["args"]))


# ----------------------------------------------------------------------------- predicates


def _dist(a: Obj, b: Obj) -> float:
    return math.hypot(a.cx - b.cx, a.cy - b.cy)


def covered_fraction(front: Obj, back: Obj) -> float:
    """Share of ``back``'s shape covered by ``front``'s shape (rasterised at GRID px per side)."""
    if _dist(front, back) >= front.r * 1.5 + back.r * 1.5:
        return 0.0
    fa, fx, fy = shape_array(front, GRID)
    ba, bx, by = shape_array(back, GRID)
    x0, y0 = max(fx, bx), max(fy, by)
    x1, y1 = min(fx + fa.shape[1], bx + ba.shape[1]), min(fy + fa.shape[0], by + ba.shape[0])
    if x1 <= x0 or y1 <= y0:
        return 0.0
    inter = np.count_nonzero(fa[y0 - fy:y1 - fy, x0 - fx:x1 - fx] & ba[y0 - by:y1 - by, x0 - bx:x1 - bx])
    return inter / shape_area(back.kind, ba.shape[0])


def overlapping(a: Obj, b: Obj) -> bool:
    return max(covered_fraction(a, b), covered_fraction(b, a)) > 0.02


def _between(a: Obj, b: Obj, c: Obj) -> tuple[float, float]:
    """(t, perpendicular distance) of a's centre relative to the segment b -> c."""
    return segment_position((a.cx, a.cy), (b.cx, b.cy), (c.cx, c.cy))


def object_value(rtype: str, objs: list[Obj]) -> float:
    """Signed distance of the objects ``objs`` from the relation's decision boundary (> 0: it
    holds), on the scene graph: centres for directions, box gaps, drawing order and overlap."""
    a, b = objs[0], objs[1]
    if rtype in DIRECTIONAL:
        return directional_value(rtype, (a.cx, a.cy), (b.cx, b.cy))
    if rtype == "next to":
        return NEXT_TO - (_dist(a, b) - a.r - b.r)
    if rtype in DEPTH:
        if not overlapping(a, b):
            return -1.0
        front = a.z > b.z if rtype == "in front of" else a.z < b.z
        return 1.0 if front else -1.0
    if rtype == "between":
        t, perp = _between(a, b, objs[2])
        return min(t, 1 - t, 0.15 - perp)
    raise ValueError(f"unknown relation type {rtype!r}")


def _bbox(o: Obj) -> tuple[float, float, float, float]:
    return (o.cx - o.r, o.cy - o.r, o.cx + o.r, o.cy + o.r)


def holds_clearly(rtype: str, objs: list[Obj]) -> bool:
    """The relation holds with the generation margin. A directional relation also holds by GenEval's
    position rule on the objects' boxes (the offset along its axis dominates), so that a benchmark
    judge and the scene agree on what "left of" means."""
    a, b = objs[0], objs[1]
    if rtype in DIRECTIONAL:
        return object_value(rtype, objs) >= MARGIN and rtype in geneval_relations(_bbox(a), _bbox(b), GENEVAL_MARGIN)
    if rtype == "next to":
        gap = _dist(a, b) - a.r - b.r
        return NEXT_HOLD[0] <= gap <= NEXT_HOLD[1]
    if rtype in DEPTH:
        front, back = (a, b) if rtype == "in front of" else (b, a)
        return front.z > back.z and OCCLUDED[0] <= covered_fraction(front, back) <= OCCLUDED[1]
    t, perp = _between(a, b, objs[2])
    return 0.3 <= t <= 0.7 and perp <= 0.05


def fails_clearly(rtype: str, objs: list[Obj]) -> bool:
    """The relation is false with the generation margin."""
    a, b = objs[0], objs[1]
    if rtype in DIRECTIONAL:
        return object_value(rtype, objs) <= -MARGIN
    if rtype == "next to":
        return _dist(a, b) - a.r - b.r >= NEXT_FAIL
    if rtype in DEPTH:
        if _dist(a, b) >= SEPARATE * (a.r + b.r) + SEP_GAP:
            return True
        front, back = (b, a) if rtype == "in front of" else (a, b)  # the reverse order holds clearly
        return front.z > back.z and OCCLUDED[0] <= covered_fraction(front, back) <= OCCLUDED[1]
    t, perp = _between(a, b, objs[2])
    return t <= -0.2 or t >= 1.2 or perp >= 0.3


def satisfied(rel: Relation, scene: Scene) -> bool:
    """Scene-graph truth of a relation; a named object missing from the scene makes it false, and a named
    object present twice must satisfy it with every copy (GenEval's rule over all instances)."""
    import itertools

    copies = [[o for o in scene.objects if o.ident == ident] for ident in rel.args]
    if any(not c for c in copies):
        return False
    return all(object_value(rel.type, list(objs)) > 0 for objs in itertools.product(*copies))


def fraction_satisfied(relations: list[Relation], scene: Scene) -> float:
    """The scene-graph oracle: share of the prompt's relations that hold in the scene."""
    if not relations:
        return float("nan")
    return sum(satisfied(r, scene) for r in relations) / len(relations)


# ----------------------------------------------------------------------------- layout


def _idx(scene: Scene) -> dict[tuple[str, str], int]:
    return {o.ident: i for i, o in enumerate(scene.objects)}


def _constraints(scene: Scene) -> list[tuple[tuple[int, ...], str, bool]]:
    """(object indices, relation type, must hold) for every relation and negation."""
    idx = _idx(scene)
    out = [(tuple(idx[a] for a in rel.args), rel.type, True) for rel in scene.relations]
    out += [(tuple(idx[a] for a in rel.args), rel.type, False) for rel in scene.negated
            if all(a in idx for a in rel.args)]
    return out


def _check(rtype: str, objs: list[Obj], want: bool) -> bool:
    return holds_clearly(rtype, objs) if want else fails_clearly(rtype, objs)


def _close_pairs(scene: Scene) -> set[frozenset[int]]:
    """Pairs allowed to overlap (depth relations, kept or negated)."""
    idx = _idx(scene)
    pairs = set()
    for rel in scene.relations + scene.negated:
        if rel.type in DEPTH and all(a in idx for a in rel.args):
            pairs.add(frozenset(idx[a] for a in rel.args))
    return pairs


def snap(v: float, grid: int) -> float:
    """``v`` in [0, 1] moved to the centre of its cell of a ``grid``-cell axis."""
    return (min(int(v * grid), grid - 1) + 0.5) / grid


def sample_layout(scene: Scene, rng: random.Random, tries: int = 30, grid: int = 0) -> bool:
    """Place the objects so that every constraint holds; False if no layout was found.

    Objects are placed one at a time (most constrained first); each candidate position is
    drawn from the region that one of its constraints with already placed objects allows
    (a half-plane, a ring around the partner, a segment), then checked against all of them.
    With ``grid`` > 0 a candidate first moves to the centre of its cell of a ``grid`` x ``grid``
    grid (a layout space of a few fixed positions).
    """
    n = len(scene.objects)
    cons = _constraints(scene)
    close = _close_pairs(scene)
    mine: dict[int, list[tuple[tuple[int, ...], str, bool]]] = {i: [] for i in range(n)}
    for c in cons:
        for i in c[0]:
            mine[i].append(c)
    for _ in range(tries):
        order = sorted(range(n), key=lambda i: (-len(mine[i]), rng.random()))
        placed: list[int] = []
        for i in order:
            ready = [c for c in mine[i] if all(j == i or j in placed for j in c[0])]
            o = scene.objects[i]
            box = _box(scene, i, ready)
            if box[0] > box[1] or box[2] > box[3]:
                break
            for _ in range(20):
                o.cx, o.cy = _candidate(scene, i, ready, box, rng)
                if grid:
                    o.cx, o.cy = snap(o.cx, grid), snap(o.cy, grid)
                if box[0] <= o.cx <= box[1] and box[2] <= o.cy <= box[3] and _consistent(scene, i, placed, ready, close):
                    break
            else:
                break
            placed.append(i)
        if len(placed) == n:
            return True
    return False


_SIGN = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}


def _box(scene: Scene, i: int, ready) -> tuple[float, float, float, float]:
    """The axis-aligned region the directional constraints leave for object i's centre."""
    o = scene.objects[i]
    x0, x1, y0, y1 = o.r, 1 - o.r, o.r, 1 - o.r
    for ids, rtype, want in ready:
        if rtype not in _SIGN:
            continue
        sx, sy = _SIGN[rtype]
        if ids[0] != i:  # i is the reference object: mirror the direction
            sx, sy = -sx, -sy
        if not want:
            sx, sy = -sx, -sy
        p = scene.objects[ids[1] if ids[0] == i else ids[0]]
        if sx < 0:
            x1 = min(x1, p.cx - MARGIN)
        elif sx > 0:
            x0 = max(x0, p.cx + MARGIN)
        elif sy < 0:
            y1 = min(y1, p.cy - MARGIN)
        else:
            y0 = max(y0, p.cy + MARGIN)
    return x0, x1, y0, y1


def _candidate(scene: Scene, i: int, ready, box, rng: random.Random) -> tuple[float, float]:
    """A position inside ``box``, or on the ring/segment that one other constraint asks for."""
    x0, x1, y0, y1 = box
    o = scene.objects[i]
    shaped = [c for c in ready if c[1] not in _SIGN]
    if not shaped or rng.random() < 0.1:
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        held = [c for c in ready if c[1] in _SIGN and c[2]]
        if held and rng.random() < 0.7:  # keep a held direction's axis dominant (GenEval's rule)
            ids, rtype, _ = rng.choice(held)
            p = scene.objects[ids[1] if ids[0] == i else ids[0]]
            if _SIGN[rtype][0]:
                y = p.cy + (x - p.cx) * rng.uniform(-0.6, 0.6)
            else:
                x = p.cx + (y - p.cy) * rng.uniform(-0.6, 0.6)
        return x, y
    ids, rtype, want = rng.choice(shaped)
    if rtype == "between":
        a, b, c = (scene.objects[j] for j in ids)
        t = rng.uniform(0.35, 0.65) if want else rng.choice((rng.uniform(-0.8, -0.3), rng.uniform(1.3, 1.8)))
        jx, jy = rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02)
        if ids[0] == i:  # the middle object: on the segment b -> c
            return b.cx + t * (c.cx - b.cx) + jx, b.cy + t * (c.cy - b.cy) + jy
        if not want:
            return rng.uniform(x0, x1), rng.uniform(y0, y1)
        # An end object: a = b + t (c - b) solved for the missing end.
        if ids[1] == i:
            return (a.cx - t * c.cx) / (1 - t) + jx, (a.cy - t * c.cy) / (1 - t) + jy
        return b.cx + (a.cx - b.cx) / t + jx, b.cy + (a.cy - b.cy) / t + jy
    p = scene.objects[ids[1] if ids[0] == i else ids[0]]
    tx, ty = rng.uniform(x0, x1), rng.uniform(y0, y1)
    ang = math.atan2(ty - p.cy, tx - p.cx) + rng.uniform(-0.6, 0.6)
    if rtype == "next to":
        d = o.r + p.r + (rng.uniform(*NEXT_HOLD) if want else rng.uniform(NEXT_FAIL, 0.5))
    elif not want and rng.random() < 0.5:  # a negated depth relation: apart
        d = (o.r + p.r) * rng.uniform(1.2, 2.0)
    else:  # overlap; the covered share is checked afterwards
        d = (o.r + p.r) * rng.uniform(0.4, 0.75)
    return p.cx + d * math.cos(ang), p.cy + d * math.sin(ang)


def _consistent(scene: Scene, i: int, placed: list[int], ready, close) -> bool:
    for ids, rtype, want in ready:
        if not _check(rtype, [scene.objects[j] for j in ids], want):
            return False
    o = scene.objects[i]
    for j in placed:
        p = scene.objects[j]
        d = _dist(o, p)
        if frozenset((i, j)) in close:
            front, back = (o, p) if o.z > p.z else (p, o)
            if not (d >= SEPARATE * (o.r + p.r) + SEP_GAP or OCCLUDED[0] <= covered_fraction(front, back) <= OCCLUDED[1]):
                return False
        elif d < o.r + p.r + NEXT_HOLD[0]:  # only depth relations may overlap
            return False
    return True


# ----------------------------------------------------------------------------- prompts


def noun(o: Obj, scene: Scene, rng: random.Random) -> str:
    size = f"{o.size} " if scene.show_sizes else ""
    return f"{rng.choice(('the', 'the', 'a'))} {size}{o.colour} {o.kind}"


def write_prompt(scene: Scene, rng: random.Random) -> str:
    """Natural-language prompt for the scene's relations (varied phrasing, same facts)."""
    if not scene.relations:  # e.g. the one object a "drop" perturbation left
        body = ", ".join(noun(o, scene, rng) for o in scene.objects)
        return body[0].upper() + body[1:] + "."
    clauses = []
    for rel in scene.relations:
        objs = [scene.find(a) for a in rel.args]
        nps = [noun(o, scene, rng) for o in objs]
        text = rng.choice(RELATIONS[rel.type]).format(a=nps[0], b=nps[1], c=nps[2] if len(nps) > 2 else "")
        clauses.append(text)
    body = clauses[0]
    for clause in clauses[1:]:
        sep = rng.choice(CONNECTIVES)
        body += (f"{sep} " if sep.startswith((",", ";", ".")) else f" {sep} ") + clause
    body = body[0].upper() + body[1:]
    if scene.mention_background:
        body = f"On a {scene.background} background, {body[0].lower()}{body[1:]}"
    return body + "."


_NP = r"(?:the|a|The|A) (?:(?:" + "|".join(SIZES) + r") )?(" + "|".join(COLOURS) + r") (" + "|".join(OBJECTS) + r")"


def _compile_phrasings():
    import re

    out = []
    for rtype, phrasings in RELATIONS.items():
        for p in phrasings:
            pattern = re.escape(p).replace(r"\{a\}", _NP).replace(r"\{b\}", _NP).replace(r"\{c\}", _NP)
            out.append((rtype, re.compile(pattern)))
    # Longer phrasings first, so "is to the left of" is not read as a shorter one.
    return sorted(out, key=lambda x: -len(x[1].pattern))


_PHRASINGS = None


def parse_prompt(prompt: str) -> list[Relation]:
    """Recover the relations of a prompt written in this vocabulary (the inverse of write_prompt)."""
    global _PHRASINGS
    if _PHRASINGS is None:
        _PHRASINGS = _compile_phrasings()
    found: list[tuple[int, int, Relation]] = []
    for rtype, rx in _PHRASINGS:
        for m in rx.finditer(prompt):
            if any(not (m.end() <= s or m.start() >= e) for s, e, _ in found):
                continue
            g = m.groups()
            args = tuple((g[k], g[k + 1]) for k in range(0, len(g), 2))
            found.append((m.start(), m.end(), Relation(rtype, args)))
    return [r for _, _, r in sorted(found, key=lambda x: x[0])]


# ----------------------------------------------------------------------------- scenes and pairs


@dataclass
class SceneSpec:
    """Difficulty knobs for scene generation (a subset of the synth config)."""

    min_objects: int = 2
    max_objects: int = 5
    min_relations: int = 1
    max_relations: int = 9
    relation_types: tuple[str, ...] = tuple(RELATIONS)
    perturbation_types: tuple[str, ...] = DEFAULT_PERTURBATIONS
    max_violations: int = 3
    p_single: float = 0.5
    fixed_objects: tuple[tuple[str, str], ...] = ()
    p_sizes: float = 0.3
    p_background: float = 0.5
    sizes: tuple[str, ...] = SIZES
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    layout_grid: int = 0  # > 0: object centres at the cell centres of a layout_grid^2 grid
    nudge_pairing: str = "hair"  # "hair": both images of a nudge pair a hair from the line; "clear": one of them


def random_scene(spec: SceneSpec, rng: random.Random) -> Scene:
    """A scene whose relations all hold clearly (retries until a layout exists)."""
    for _ in range(200):
        if spec.fixed_objects:
            idents = list(spec.fixed_objects)
        else:
            n = rng.randint(spec.min_objects, spec.max_objects)
            idents = list(zip(rng.sample(list(COLOURS), n), rng.sample(OBJECTS, n), strict=True))
        objs = []
        for colour, kind in idents:
            size = rng.choice(spec.sizes)
            objs.append(Obj(colour, kind, size, r=SIZE_RADIUS[size] * rng.uniform(0.92, 1.08)))
        rng.shuffle(objs)
        rels = _random_relations(objs, spec, rng)
        if not rels:
            continue
        scene = Scene(objs, rels, rng.choice(list(spec.backgrounds)),
                      mention_background=rng.random() < spec.p_background, show_sizes=rng.random() < spec.p_sizes)
        if assign_depth(scene, rng) and sample_layout(scene, rng, grid=spec.layout_grid):
            return scene
    raise RuntimeError("could not lay out a scene for this spec (too many relations for the objects?)")


def _random_relations(objs: list[Obj], spec: SceneSpec, rng: random.Random) -> list[Relation]:
    n = len(objs)
    pairs = [(i, j) for i in range(n) for j in range(n) if i < j]
    rng.shuffle(pairs)
    k = min(rng.randint(spec.min_relations, spec.max_relations), len(pairs))
    types = [t for t in spec.relation_types if t != "between"]
    rels: list[Relation] = []
    used: set[frozenset[int]] = set()
    for i, j in pairs[:k]:
        if "between" in spec.relation_types and n >= 3 and (not types or rng.random() < 0.15):
            c = rng.choice([m for m in range(n) if m not in (i, j)])
            trip = frozenset((i, j, c))
            if not any(len(trip & u) >= 2 for u in used):
                rels.append(Relation("between", (objs[c].ident, objs[i].ident, objs[j].ident)))
                used.add(trip)
                continue
        if not types or any(len(frozenset((i, j)) & u) >= 2 for u in used):
            continue
        a, b = (i, j) if rng.random() < 0.5 else (j, i)
        rels.append(Relation(rng.choice(types), (objs[a].ident, objs[b].ident)))
        used.add(frozenset((i, j)))
    return rels


def assign_depth(scene: Scene, rng: random.Random) -> bool:
    """Drawing order (z) consistent with the depth relations: a random topological order of
    "front -> back" edges. False when they form a cycle."""
    n = len(scene.objects)
    idx = _idx(scene)
    behind: dict[int, set[int]] = {i: set() for i in range(n)}  # i is drawn after everything in behind[i]
    for rel in scene.relations:
        if rel.type in DEPTH:
            a, b = idx[rel.args[0]], idx[rel.args[1]]
            front, back = (a, b) if rel.type == "in front of" else (b, a)
            behind[front].add(back)
    order: list[int] = []
    left = set(range(n))
    while left:
        ready = [i for i in left if behind[i] <= set(order)]
        if not ready:
            return False
        pick = rng.choice(sorted(ready))
        order.append(pick)
        left.remove(pick)
    for z, i in enumerate(order):
        scene.objects[i].z = z
    return True


def _copy(scene: Scene) -> Scene:
    objs = [Obj(o.colour, o.kind, o.size, o.cx, o.cy, o.r, o.z) for o in scene.objects]
    return Scene(objs, list(scene.relations), scene.background, scene.mention_background, scene.show_sizes)


def perturb(scene: Scene, n_violations: int, spec: SceneSpec, rng: random.Random) -> tuple[Scene, list[str], list[int]]:
    """A scene violating exactly ``n_violations`` of ``scene``'s relations.

    Operations edit a copy of the relation list in place (entry i is relation i's perturbed
    version); the new layout must make every perturbed relation hold and every targeted
    original relation clearly fail, and the untouched relations (identical in both lists)
    keep holding, so exactly the targeted relations are violated.

    Returns (perturbed scene with a fresh layout, operation names, indices of violated relations).
    """
    for _ in range(100):
        new = _copy(scene)
        targets: set[int] = set()
        ops: list[str] = []
        while len(targets) < n_violations:
            budget = n_violations - len(targets)
            avail = [op for op in spec.perturbation_types if _choices(op, new, scene, targets, budget)]
            if not avail:
                break
            op = rng.choice(avail)
            targets |= _apply(op, new, scene, targets, budget, rng)
            ops.append(op)
        if len(targets) != n_violations:
            continue
        # A nudged relation is a hair from the line: in the rejected image on the wrong side (left out of the layout,
        # then moved), in the chosen one on the right side (moved after the layout), so that a nearly aligned image
        # is no giveaway. With nudge_pairing="clear" only one image of the pair is a hair from the line, the other
        # is clear (the chosen layout as drawn, or the relation failing clearly in the rejected one): nearly aligned
        # images then meet clear ones, the comparisons a per-image sigma can be fitted from.
        hair_rejected = hair_chosen = new.nudge
        if new.nudge and spec.nudge_pairing == "clear":
            hair_rejected, hair_chosen = (new.nudge, []) if rng.random() < 0.5 else ([], new.nudge)
        nudged = [new.relations[i] for i in hair_rejected]
        # a dropped object takes its relations with it (indices stayed aligned with scene's until here)
        new.relations = [r for k, r in enumerate(new.relations)
                         if k not in new.nudge and all(new.find(a) is not None for a in r.args)]
        dup = new.duplicate
        # a duplicated object keeps its relations for the layout (the original satisfies them); its copy is
        # then placed where they fail
        copied = [scene.relations[i] for i in sorted(targets)] if dup else []
        new.negated = [] if dup else [scene.relations[i] for i in sorted(targets) if i not in hair_rejected]
        for o in new.objects:
            o.r = SIZE_RADIUS[o.size] * rng.uniform(0.92, 1.08)
        # (a nudge before a copy is placed: the copy shares its original's name, which the nudge's checks look up)
        if assign_depth(new, rng) and sample_layout(new, rng, grid=spec.layout_grid) and all(
                _nudge_into_place(new, rel, rng, holds=False) for rel in nudged) and (
                dup is None or _place_copy(new, dup, copied, rng, spec.layout_grid)):
            drawn = [(o.cx, o.cy) for o in scene.objects]
            if all(_nudge_into_place(scene, scene.relations[i], rng, holds=True) for i in hair_chosen):
                new.relations = [r for r in new.relations if dup is None or dup not in r.args]
                return new, ops, sorted(targets)
            for o, (x, y) in zip(scene.objects, drawn, strict=True):  # the chosen layout as drawn for the next try
                o.cx, o.cy = x, y
    raise RuntimeError(f"could not build a scene violating {n_violations} of {len(scene.relations)} relations")


def _place_copy(scene: Scene, ident: tuple[str, str], mine: list[Relation], rng: random.Random, grid: int,
                tries: int = 200) -> bool:
    """Add a second copy of object ``ident`` where every relation of ``mine`` (those naming it) fails clearly
    with the copy in its place and the copy overlaps nothing; False if no such place was found."""
    src = scene.find(ident)
    idx = {o.ident: o for o in scene.objects}
    for _ in range(tries):
        copy = Obj(src.colour, src.kind, src.size, r=src.r, z=max(o.z for o in scene.objects) + 1)
        copy.cx, copy.cy = rng.uniform(copy.r, 1 - copy.r), rng.uniform(copy.r, 1 - copy.r)
        if grid:
            copy.cx, copy.cy = snap(copy.cx, grid), snap(copy.cy, grid)
        if any(_dist(copy, o) < SEPARATE * (copy.r + o.r) + SEP_GAP for o in scene.objects):
            continue
        if all(fails_clearly(r.type, [copy if a == ident else idx[a] for a in r.args]) for r in mine):
            scene.objects.append(copy)
            return True
    return False


def _nudge_into_place(scene: Scene, rel: Relation, rng: random.Random, *, holds: bool, tries: int = 20) -> bool:
    """Move one object of the directional relation ``rel`` along the relation's axis so that ``rel`` holds
    (``holds``) or fails by a hair (its value in ``NUDGE`` or in minus ``NUDGE``) while every other relation of the
    scene still holds clearly, every negated one still fails clearly and no two objects overlap; False (the object
    back in place) if no such move was found."""
    idx = {o.ident: k for k, o in enumerate(scene.objects)}
    a, b = (scene.objects[idx[x]] for x in rel.args)
    cons = [c for c in _constraints(scene) if not (c[1] == rel.type and c[0] == (idx[rel.args[0]], idx[rel.args[1]]))]
    close = _close_pairs(scene)
    side = 1.0 if holds else -1.0
    axis = "cx" if rel.type in ("left of", "right of") else "cy"
    grows = directional_value(rel.type, (1.0, 1.0), (0.0, 0.0))  # +1 when the value grows with a's coordinate
    for _ in range(tries):
        mover, other = (a, b) if rng.random() < 0.5 else (b, a)
        i = idx[mover.ident]
        was = mover.cx, mover.cy
        gap = side * rng.uniform(*NUDGE) * (grows if mover is a else -grows)
        setattr(mover, axis, getattr(other, axis) + gap)
        if rng.random() < 0.5:  # a fresh place across the axis too (the old one may now overlap the partner)
            setattr(mover, "cy" if axis == "cx" else "cx", rng.uniform(mover.r, 1 - mover.r))
        inside = mover.r <= getattr(mover, axis) <= 1 - mover.r
        value = object_value(rel.type, [a, b])
        if inside and NUDGE[0] <= side * value <= NUDGE[1] and _consistent(
                scene, i, [k for k in range(len(scene.objects)) if k != i], [c for c in cons if i in c[0]], close):
            return True
        mover.cx, mover.cy = was
    return False


def _choices(op: str, new: Scene, old: Scene, targets: set[int], budget: int) -> list:
    rels = old.relations
    free = [i for i in range(len(rels)) if i not in targets]
    if op == "flip":
        return [i for i in free if rels[i].type in OPPOSITE]
    if op == "nudge":
        return [i for i in free if rels[i].type in DIRECTIONAL]
    if op == "relation":
        return [i for i in free if rels[i].type != "between"]
    if op == "swap":
        return [i for i in free if rels[i].type in OPPOSITE or rels[i].type == "between"]
    if op in ("drop", "duplicate"):
        if targets:  # it removes or adds objects: only as the first operation
            return []
        out = []
        for a, o in enumerate(new.objects):
            hit = [i for i, r in enumerate(rels) if o.ident in r.args]
            if hit and len(hit) <= budget:
                out.append((a, hit))
        return out
    if op == "binding":
        if targets:  # it renames objects: only as the first operation
            return []
        out = []
        n = len(new.objects)
        for a in range(n):
            for b in range(a + 1, n):
                ia, ib = new.objects[a].ident, new.objects[b].ident
                hit = [i for i, r in enumerate(rels) if ia in r.args or ib in r.args]
                touches_both = any(ia in rels[i].args for i in hit) and any(ib in rels[i].args for i in hit)
                # Occluded shapes are hard to recognise, so depth relations never get colour swaps.
                if touches_both and len(hit) <= budget and not any(rels[i].type in DEPTH for i in hit):
                    out.append((a, b, hit))
        return out
    raise ValueError(f"unknown perturbation {op!r}")


RELATION_CHANGE = {
    "left of": DIRECTIONAL[2:], "right of": DIRECTIONAL[2:], "above": DIRECTIONAL[:2], "below": DIRECTIONAL[:2],
    "next to": DIRECTIONAL, "in front of": DIRECTIONAL, "behind": DIRECTIONAL,
}


def _apply(op: str, new: Scene, old: Scene, targets: set[int], budget: int, rng: random.Random) -> set[int]:
    options = _choices(op, new, old, targets, budget)
    rels = new.relations
    if op == "drop":  # the object leaves the scene; its relations are removed once all operations are done
        a, hit = rng.choice(options)
        del new.objects[a]
        return set(hit)
    if op == "duplicate":  # the copy is placed after the layout (see _place_copy)
        a, hit = rng.choice(options)
        new.duplicate = new.objects[a].ident
        return set(hit)
    if op == "binding":  # exchange the colours of two objects (kinds and places stay)
        a, b, hit = rng.choice(options)
        oa, ob = new.objects[a], new.objects[b]
        old_a, old_b = oa.ident, ob.ident
        oa.colour, ob.colour = ob.colour, oa.colour
        remap = {old_a: oa.ident, old_b: ob.ident}
        new.relations = [Relation(r.type, tuple(remap.get(x, x) for x in r.args)) for r in rels]
        return set(hit)
    i = rng.choice(options)
    rel = rels[i]
    if op == "nudge":  # left out of the layout, then moved to fail by a hair (see perturb)
        new.nudge.append(i)
        return {i}
    if op == "flip":
        rels[i] = Relation(OPPOSITE[rel.type], rel.args)
    elif op == "relation":
        rels[i] = Relation(rng.choice(RELATION_CHANGE[rel.type]), rel.args)
    else:  # swap the places of the relation's first two objects
        rels[i] = Relation(rel.type, (rel.args[1], rel.args[0]) + rel.args[2:])
    return {i}
