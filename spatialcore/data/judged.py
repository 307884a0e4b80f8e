"""Pair sets from a generator's own samples, labelled by the judge: what a SpatialScore meets during Spatial-RL.

A synthetic pair set shows the reward model clean renders and their perturbations; Spatial-RL shows it the
generator's samples. To learn where its ranking fails *there* (``reward calibrate``) and to judge it there
(``reward eval``), the pairs have to come from those samples. ``spatialcore eval`` already draws them (fixed prompts
and noise seeds) and judges each with the pixel oracle and GenEval's rule (``samples.jsonl``: ``correct`` = every
named object found and every relation holds). For one evaluation folder and one prompt:

    chosen   = a sample judged correct
    rejected = a sample of the same prompt judged not correct (a relation fails or an object is missing)

every such (chosen, rejected) combination is a pair (at most ``per_prompt`` of them, drawn by ``seed``), and all
pairs of a folder belong to the split it is given for: folders of distinct prompt sets for train / val / test keep
the splits' prompts apart. A prompt whose samples are all correct or all wrong gives no pair.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from .synth import SPLITS


def _samples(folder: Path, key: str) -> list[dict]:
    from ..config import ConfigError

    path = folder / "samples.jsonl"
    if not path.is_file():
        raise ConfigError(key, f"{folder} is not a `spatialcore eval` folder (no samples.jsonl)")
    recs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            _ = rec["prompt"], rec["prompt_index"], rec["seed"], rec["image"], rec["correct"], rec["all_found"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(key, f"{path}:{n}: not a sample record ({err})") from None
        if not (folder / rec["image"]).is_file():
            raise ConfigError(key, f"{path}:{n}: image {rec['image']} is missing")
        recs.append(rec)
    return recs


def judged_pairs(recs: list[dict], *, per_prompt: int | None = None, seed: int = 0) -> list[tuple[dict, dict]]:
    """The (chosen, rejected) sample pairs of one evaluation's records (module docstring), prompt by prompt in the
    order of their first sample."""
    rng = random.Random(seed)
    by_prompt: dict[int, list[dict]] = {}
    for r in recs:
        by_prompt.setdefault(r["prompt_index"], []).append(r)
    pairs = []
    for group in by_prompt.values():
        combos = [(w, lo) for w in group if w["correct"] for lo in group if not lo["correct"]]
        if per_prompt is not None and len(combos) > per_prompt:
            combos = rng.sample(combos, per_prompt)
        pairs.extend(combos)
    return pairs


def pair_set_from_evals(out: str | Path, splits: dict[str, list[str | Path]], *, per_prompt: int | None = None,
                        seed: int = 0, overwrite: bool = False) -> dict:
    """Write a pair set (pairs.jsonl + images/ + judged.json) to ``out`` from ``spatialcore eval`` folders, each
    folder's pairs in the split it is listed under; returns the pairs per split."""
    from ..atomic import atomic_dir
    from ..config import ConfigError

    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ConfigError("split", f"unknown split(s) {sorted(unknown)} (choose from {', '.join(SPLITS)})")
    seen: dict[Path, str] = {}
    for split, folders in splits.items():
        for f in folders:
            f = Path(f).resolve()
            if f in seen:
                raise ConfigError(f"--{split}", f"{f} is listed for both {seen[f]} and {split}: one folder, one split")
            seen[f] = split
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (use --force to replace it)")
    counts = {s: 0 for s in SPLITS}
    sources = []
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        with (tmp / "pairs.jsonl").open("w", encoding="utf-8") as fh:
            for k, (folder, split) in enumerate(seen.items()):
                recs = _samples(folder, f"--{split}")
                pairs = judged_pairs(recs, per_prompt=per_prompt, seed=seed + k)
                copied: set[str] = set()
                for w, lo in pairs:
                    names = []
                    for r in (w, lo):
                        name = f"{k:02d}_{Path(r['image']).name}"
                        if name not in copied:
                            shutil.copyfile(folder / r["image"], tmp / "images" / name)
                            copied.add(name)
                        names.append(f"images/{name}")
                    fh.write(json.dumps({
                        "id": f"{k:02d}-{counts[split]:06d}", "prompt": w["prompt"], "chosen": names[0],
                        "rejected": names[1], "split": split,
                        "meta": {"source": str(folder), "prompt_index": w["prompt_index"], "chosen_seed": w["seed"],
                                 "rejected_seed": lo["seed"], "rejected_found": lo["all_found"]}}) + "\n")
                    counts[split] += 1
                sources.append({"folder": str(folder), "split": split, "samples": len(recs), "pairs": len(pairs)})
        if not sum(counts.values()):
            raise ConfigError(f"--{next(iter(seen.values()), 'test')}",
                              "no prompt of the folders has both a correct and a wrong sample: no pair")
        (tmp / "judged.json").write_text(json.dumps({"per_prompt": per_prompt, "seed": seed, "sources": sources},
                                                    indent=2) + "\n")
    return counts
