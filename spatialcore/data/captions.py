"""Rewording a synthetic caption's directional relation: flipped to its opposite (how much the relation word moves a
generator's layout), dropped ("A red circle and a blue square."), or replaced by another direction (captions whose
relation words are missing or wrong, as web captions often are: how a weak base generator is made).

A caption qualifies when it holds exactly one of the grammar's directional phrases (``vocab.RELATIONS``); the
others come back unchanged (flip: None)."""

from __future__ import annotations

import numpy as np

from ..vocab import OPPOSITE, RELATIONS

DIRECTIONS = ("left of", "right of", "above", "below")


def _phrases() -> dict[str, tuple[str, int]]:
    """Directional phrase (without its objects) -> (relation, phrasing index)."""
    return {text.replace("{a} ", "").replace(" {b}", ""): (rel, i)
            for rel in DIRECTIONS for i, text in enumerate(RELATIONS[rel])}


def _phrase_of(rel: str, i: int) -> str:
    return RELATIONS[rel][i].replace("{a} ", "").replace(" {b}", "")


def find_relation(caption: str) -> tuple[str, str, int] | None:
    """(phrase, relation, phrasing index) of the caption's one directional phrase, or None."""
    padded = f" {caption} "
    found = [(p, *v) for p, v in _phrases().items() if f" {p} " in padded]
    found = [f for f in found if not any(f[0] != g[0] and f[0] in g[0] for g in found)]  # "above" in "floats above"
    return found[0] if len(found) == 1 else None


def _replace(caption: str, phrase: str, new: str) -> str:
    return f" {caption} ".replace(f" {phrase} ", f" {new} ", 1)[1:-1]


def drop_relation(caption: str) -> str | None:
    """The caption with its directional phrase replaced by "and" (the objects without their relation, as web
    captions often have them), or None when it has not exactly one directional phrase."""
    hit = find_relation(caption)
    return None if hit is None else _replace(caption, hit[0], "and")


def flip_relation(caption: str) -> str | None:
    """The caption with its direction replaced by the opposite one in the same phrasing ("is to the left of" ->
    "is to the right of"), or None when it has not exactly one directional phrase."""
    hit = find_relation(caption)
    if hit is None:
        return None
    phrase, rel, i = hit
    return _replace(caption, phrase, _phrase_of(OPPOSITE[rel], i))


def corrupt_caption(caption: str, rng: np.random.Generator, *, drop: float, wrong: float) -> str:
    """With probability ``drop`` the relation phrase becomes "and" (the objects without their relation), with
    probability ``wrong`` another direction's phrase (a wrong caption); else the caption as it is."""
    u = rng.random()
    if u >= drop + wrong:
        return caption
    hit = find_relation(caption)
    if hit is None:
        return caption
    phrase, rel, _ = hit
    if u < drop:
        return _replace(caption, phrase, "and")
    other = [d for d in DIRECTIONS if d != rel]
    new_rel = other[int(rng.integers(len(other)))]
    return _replace(caption, phrase, _phrase_of(new_rel, int(rng.integers(len(RELATIONS[new_rel])))))
