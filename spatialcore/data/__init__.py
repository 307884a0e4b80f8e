"""Synthetic spatial pairs, oracles, pair-set loading and validation (``spatialcore.data``)."""

from .scene import (
           Relation,
           Scene,
           SceneSpec,
           fraction_satisfied,
           parse_prompt,
           perturb,
           random_scene,
           satisfied,
)

__all__ = ["Relation", "Scene", "SceneSpec", "fraction_satisfied", "parse_prompt", "perturb", "random_scene",
           "satisfied"]
