"""Synthetic SpatialReward pairs: difficulty presets, a deterministic pair generator, a
multi-process writer for pair folders (SPEC §5) and a streaming dataset of fresh pairs.

Pair ``index`` under ``seed`` is a pure function of (config, seed, index): a perfect scene and
its prompt, a perturbed scene violating 1, 2 or 3 of the prompt's relations, and one image
rendered from each, laid out and jittered independently. Both images are judged against the
perfect prompt. The split comes from a hash of the perfect prompt (or of its object set with
``split_by="objects"``), so no prompt appears in two splits.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch.utils.data

from ..config import ConfigError, param
from ..vocab import BACKGROUNDS, COLOURS, OBJECTS, RELATIONS, SIZES
from .geometry import DIRECTIONAL
from .render import render
from .scene import DEFAULT_PERTURBATIONS, PERTURBATIONS, Scene, SceneSpec, perturb, random_scene, write_prompt

SPLITS = ("train", "val", "test")


@dataclass
class SynthConfig:
    size: int = param(224, min=28, max=2048, help="image side in pixels")
    min_objects: int = param(3, min=2, max=len(COLOURS))
    max_objects: int = param(6, min=2, max=len(COLOURS))
    min_relations: int = param(2, min=1, max=9)
    max_relations: int = param(9, min=1, max=9)
    relation_types: list[str] = field(default_factory=lambda: list(RELATIONS))
    perturbation_types: list[str] = field(default_factory=lambda: list(DEFAULT_PERTURBATIONS))  # + drop, duplicate, nudge
    max_violations: int = param(3, min=1, max=3, help="pairs violate 1..max_violations relations")
    p_single: float = param(0.5, min=0.0, max=1.0, help="share of pairs with exactly one violation")
    fixed_objects: list[str] = field(default_factory=list)  # e.g. ["red circle", "blue square"]
    p_sizes: float = param(0.3, min=0.0, max=1.0, help="share of prompts that name object sizes")
    p_background: float = param(0.5, min=0.0, max=1.0, help="share of prompts that name the background")
    val_fraction: float = param(0.05, min=0.0, max=0.5)
    test_fraction: float = param(0.05, min=0.0, max=0.5)
    split_by: Literal["prompt", "objects"] = "prompt"
    colour_jitter: int = param(8, min=0, max=30)
    sizes: list[str] = field(default_factory=lambda: list(SIZES))  # object sizes drawn from
    backgrounds: list[str] = field(default_factory=lambda: list(BACKGROUNDS))  # backgrounds drawn from
    layout_grid: int = param(0, min=0, max=16, help="> 0: object centres on the cell centres of an N x N grid")
    nudge_pairing: Literal["hair", "clear"] = param(
        "hair", help="nudge pairs: both images a hair from the line (hair), or one of them against a clear one (clear)")
    nudge_flip: float = param(0.0, min=0.0, max=1.0, help="share of nudge pairs whose chosen and rejected images are "
                                                          "exchanged: judges who disagree a hair from the line")

    def check(self) -> None:
        if self.min_objects > self.max_objects:
            raise ConfigError("min_objects", f"{self.min_objects} exceeds max_objects={self.max_objects}")
        if self.min_relations > self.max_relations:
            raise ConfigError("min_relations", f"{self.min_relations} exceeds max_relations={self.max_relations}")
        bad = [t for t in self.relation_types if t not in RELATIONS]
        if bad or not self.relation_types:
            raise ConfigError("relation_types", f"unknown {bad} (known: {list(RELATIONS)})" if bad else "is empty")
        bad = [t for t in self.perturbation_types if t not in PERTURBATIONS]
        if bad or not self.perturbation_types:
            raise ConfigError("perturbation_types",
                              f"unknown {bad} (known: {list(PERTURBATIONS)})" if bad else "is empty")
        if self.relation_types == ["between"] and self.max_objects < 3:
            raise ConfigError("relation_types", "'between' alone needs max_objects >= 3")
        for item in self.fixed_objects:
            parts = item.split()
            if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in OBJECTS:
                raise ConfigError("fixed_objects", f"{item!r} is not '<colour> <kind>' from the vocabulary")
        if self.fixed_objects and len({p.split()[0] for p in self.fixed_objects}) != len(self.fixed_objects):
            raise ConfigError("fixed_objects", "colours must differ")
        if len(self.fixed_objects) == 1:
            raise ConfigError("fixed_objects", "needs at least two objects")
        for key, allowed in (("sizes", SIZES), ("backgrounds", BACKGROUNDS)):
            bad = [v for v in getattr(self, key) if v not in allowed]
            if bad or not getattr(self, key):
                raise ConfigError(key, f"unknown {bad} (known: {list(allowed)})" if bad else "is empty")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("val_fraction", "val_fraction + test_fraction must be < 1")

    def spec(self) -> SceneSpec:
        return SceneSpec(
            min_objects=self.min_objects, max_objects=self.max_objects, min_relations=self.min_relations,
            max_relations=self.max_relations, relation_types=tuple(self.relation_types),
            perturbation_types=tuple(self.perturbation_types), max_violations=self.max_violations,
            p_single=self.p_single, fixed_objects=tuple(tuple(x.split()) for x in self.fixed_objects),
            p_sizes=self.p_sizes, p_background=self.p_background, sizes=tuple(self.sizes),
            backgrounds=tuple(self.backgrounds), layout_grid=self.layout_grid, nudge_pairing=self.nudge_pairing)



# Starting points; any key can still be overridden.
DIFFICULTIES: dict[str, dict] = {
    # A fixed object pair, one directional relation, a flipped one in the rejected image:
    # learnable by the tiny CPU reward model (new images and prompt wordings at test time).
    "easy": {"size": 56, "fixed_objects": ["red circle", "blue square"], "min_relations": 1, "max_relations": 1,
             "relation_types": list(DIRECTIONAL), "perturbation_types": ["flip"], "max_violations": 1, "p_single": 1.0},
    # Two objects of any colour/kind, one directional relation; split by object pair so the
    # held-out objects were never seen in training.
    "medium": {"size": 56, "min_objects": 2, "max_objects": 2, "min_relations": 1, "max_relations": 1,
               "relation_types": list(DIRECTIONAL), "perturbation_types": ["flip", "swap", "relation"],
               "max_violations": 1, "p_single": 1.0, "split_by": "objects"},
    # The full task: 3-6 objects, 2-9 relations of every type, 1-3 violations.
    "hard": {},
    # The tiny generator's world: the easy objects and relations at 32 px, on white, in two sizes, with
    # object centres on a 4 x 4 grid (a layout space of a few fixed positions that a ~2M-parameter Flux
    # learns to draw on CPU). The reward model of the demo is trained on pairs of this world too; its
    # rejected images flip the relation, drop an object or add a second copy of one where the relation fails
    # (a reward model that never saw a missing or a doubled object pays a policy for losing one or for
    # drawing several: both happened in Spatial-RL runs).
    "easy_grid": {"size": 32, "fixed_objects": ["red circle", "blue square"], "min_relations": 1,
                  "max_relations": 1, "relation_types": list(DIRECTIONAL), "perturbation_types": ["flip", "drop", "duplicate"],
                  "max_violations": 1, "p_single": 1.0, "layout_grid": 4, "backgrounds": ["white"],
                  "p_background": 0.0, "sizes": ["medium", "large"]},
}


def split_of(key: str, cfg: SynthConfig) -> str:
    u = int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) / 16**12
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


@dataclass
class SynthPair:
    record: dict
    chosen: object  # PIL images
    rejected: object


SCENE_ATTEMPTS = 20  # scenes drawn for one pair before make_pair gives up


def make_pair(cfg: SynthConfig, seed: int | str, index: int, spec: SceneSpec | None = None) -> SynthPair:
    """Pair ``index`` of the stream ``seed`` (deterministic)."""
    spec = spec or cfg.spec()
    rng = random.Random(f"spatialcore:{seed}:{index}")
    for attempt in range(SCENE_ATTEMPTS):
        scene = random_scene(spec, rng)
        if rng.random() < cfg.p_single or cfg.max_violations == 1:
            n = 1
        else:
            n = rng.randint(2, cfg.max_violations)
        n = min(n, len(scene.relations))
        try:
            perturbed, ops, violated = perturb(scene, n, spec, rng)
            break
        except RuntimeError:
            # a few crowded scenes (about 1 in 400 of the hard preset: 6 relations, 3 to violate) leave no layout
            # for the perturbation: the same random stream draws the next scene (pairs that worked stay as they were)
            if attempt == SCENE_ATTEMPTS - 1:
                raise
    prompt = write_prompt(scene, rng)
    perturbed_prompt = write_prompt(perturbed, rng)
    chosen = render(scene, cfg.size, rng, colour_jitter=cfg.colour_jitter)
    rejected = render(perturbed, cfg.size, rng, colour_jitter=cfg.colour_jitter)
    key = prompt if cfg.split_by == "prompt" else "|".join(sorted(f"{o.colour} {o.kind}" for o in scene.objects))
    pid = f"{seed}-{index:08d}"
    record = {
        "id": pid, "prompt": prompt, "chosen": f"images/{pid}_chosen.png", "rejected": f"images/{pid}_rejected.png",
        "n_perturbations": n, "perturbations": ops, "split": split_of(key, cfg),
        "meta": {"perturbed_prompt": perturbed_prompt, "violated": violated, "seed": seed, "index": index,
                 "chosen_scene": scene.to_meta(), "rejected_scene": perturbed.to_meta()},
    }
    if "nudge" in ops and cfg.nudge_flip > 0 and rng.random() < cfg.nudge_flip:
        # a judge who doubts a hair from the line: the images change places (the scenes follow their images)
        meta = record["meta"]
        meta["chosen_scene"], meta["rejected_scene"], meta["exchanged"] = meta["rejected_scene"], meta["chosen_scene"], True
        chosen, rejected = rejected, chosen
    return SynthPair(record, chosen, rejected)


def pairs_of_split(cfg: SynthConfig, seed: int | str, split: str, max_draws: int) -> Iterator[SynthPair]:
    """The pairs of stream ``seed`` (indices 0, 1, ...) whose prompt falls in ``split``, from at most
    ``max_draws`` draws: how held-out prompts and pairs are taken from the generator."""
    spec = cfg.spec()
    for i in range(max_draws):
        pair = make_pair(cfg, seed, i, spec)
        if pair.record["split"] == split:
            yield pair


def _write_one(args: tuple[SynthConfig, int | str, int, str]) -> dict:
    cfg, seed, index, out = args
    pair = make_pair(cfg, seed, index)
    pair.chosen.save(os.path.join(out, pair.record["chosen"]), compress_level=1)
    pair.rejected.save(os.path.join(out, pair.record["rejected"]), compress_level=1)
    return pair.record


def synth_pair_set(out: str | Path, n_pairs: int, seed: int, cfg: SynthConfig, *, workers: int | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Write ``n_pairs`` pairs to ``out`` (pairs.jsonl + images/ + synth.json); returns counts."""
    from multiprocessing import get_context

    from ..config import to_dict
    from ..logs import progress as bar

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (use --force to replace it)")
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = [(cfg, seed, i, str(out)) for i in range(n_pairs)]
    counts = {s: 0 for s in SPLITS}
    tmp = out / "pairs.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        if workers > 1 and n_pairs > 32:
            with get_context("spawn" if os.name == "nt" else "fork").Pool(workers) as pool:
                it = pool.imap(_write_one, jobs, chunksize=16)
                for rec in bar(it, total=n_pairs, desc="synth", unit="pair") if progress else it:
                    fh.write(json.dumps(rec) + "\n")
                    counts[rec["split"]] += 1
        else:
            for job in bar(jobs, desc="synth", unit="pair") if progress else jobs:
                rec = _write_one(job)
                fh.write(json.dumps(rec) + "\n")
                counts[rec["split"]] += 1
    tmp.rename(out / "pairs.jsonl")
    (out / "synth.json").write_text(json.dumps({"seed": seed, "pairs": n_pairs, "config": to_dict(cfg)}, indent=2))
    return counts


class StreamingPairs(torch.utils.data.IterableDataset):
    """An endless stream of fresh training pairs, rendered on the fly (a torch IterableDataset).

    Pair ``n`` of the stream is the first pair of the candidate sequence ``(seed, n, 0), (seed, n, 1),
    ...`` whose split is ``train``: prompts held out for val/test never appear, and the stream is a
    pure function of (seed, n). Rank ``rank`` of ``world_size`` reads pairs ``rank, rank + W, ...``
    (its item ``k`` is pair ``rank + k W``), so W ranks reading b items each read the same pairs as
    one process reading W b: the same global batches on any number of ranks. DataLoader workers take
    items ``start + w, start + w + V, ...`` so the loader yields k = start, start + 1, ... in order;
    resume with ``start = items consumed``.
    """

    def __init__(self, cfg: SynthConfig, seed: int, *, rank: int = 0, world_size: int = 1, start: int = 0,
                 length: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.seed, self.rank, self.world_size = cfg, seed, rank, world_size
        self.start, self.length = start, length
        self.spec = cfg.spec()

    def item(self, k: int) -> dict:
        n = self.rank + k * self.world_size
        for attempt in range(1000):
            # the ":0:" keeps one-process streams identical to those of earlier releases
            pair = make_pair(self.cfg, f"{self.seed}:0:{n}:{attempt}", 0, self.spec)
            if pair.record["split"] == "train":
                rec = pair.record
                return {"id": rec["id"], "index": n, "prompt": rec["prompt"], "chosen": pair.chosen,
                        "rejected": pair.rejected, "n_perturbations": rec["n_perturbations"],
                        "perturbations": rec["perturbations"]}
        raise RuntimeError("no training pair found in 1000 candidates: check val/test fractions")

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        k = self.start + w
        end = None if self.length is None else self.start + self.length
        while end is None or k < end:
            yield self.item(k)
            k += W

    def state_dict(self, consumed: int) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "start": self.start + consumed}



def scene_sample(cfg: SynthConfig, seed: int | str, index: int, split: str = "train", *, max_draws: int = 1000,
                 spec: SceneSpec | None = None) -> tuple[str, object, Scene]:
    """Item ``index`` of the stream ``seed`` of perfect scenes whose prompt falls in ``split``:
    (prompt, rendered image, scene) — what a generator is fine-tuned on. A pure function of its
    arguments (draws are retried under sub-seeds until the split matches), so any rank can make any
    item and a resumed run redraws the same ones."""
    spec = spec or cfg.spec()
    for draw in range(max_draws):
        rng = random.Random(f"spatialcore-scene:{seed}:{index}:{draw}")
        scene = random_scene(spec, rng)
        prompt = write_prompt(scene, rng)
        key = prompt if cfg.split_by == "prompt" else "|".join(sorted(f"{o.colour} {o.kind}" for o in scene.objects))
        if split_of(key, cfg) == split:
            return prompt, render(scene, cfg.size, rng, colour_jitter=cfg.colour_jitter), scene
    raise ValueError(f"no '{split}' scene in {max_draws} draws (val_fraction/test_fraction too small?)")


def split_prompts(preset: str, overrides: dict, split: str, n: int, seed: int | str) -> list[str]:
    """Up to ``n`` distinct prompts of preset ``preset``'s ``split`` (the synthetic generator with
    ``overrides``): the held-out prompts of generator training and evaluation."""
    from ..config import from_dict

    cfg = from_dict(SynthConfig, {**DIFFICULTIES[preset], "size": 32, **overrides}, "stream")
    out: dict[str, None] = {}
    for pair in pairs_of_split(cfg, f"prompts-{seed}", split, 200 * n):
        out[pair.record["prompt"]] = None
        if len(out) == n:
            break
    if not out:
        raise ConfigError("prompt_stream", f"the stream has no '{split}' prompts")
    return list(out)
