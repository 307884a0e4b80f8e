"""Pair sets on disk (SPEC §5): validation, a Dataset, a resumable rank-sharded sampler and a
collate function that feeds the Qwen2.5-VL processor.

A pair set is a folder with ``pairs.jsonl`` and the images it names. Every record is checked
(JSON, fields and types, duplicate ids, split names, files present, images decodable, sizes
and modes sane); a problem is reported as ``line N: <reason>``. Loading skips bad records with
a counted warning, or refuses the whole set with ``strict=True``. Odd but usable image modes
(CMYK, palette, 16-bit, alpha) are converted to RGB and reported as warnings.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.utils.data
from PIL import Image, UnidentifiedImageError

from .synth import SPLITS

FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str, "prompt": str, "chosen": str, "rejected": str, "split": str,
}
# What the synthetic generator writes and a human-labelled set may lack: without them a pair counts in the
# overall accuracy only (n_perturbations 0 = unknown: neither the 1 nor the 2-3 column).
OPTIONAL_FIELDS: dict[str, type] = {"n_perturbations": int, "perturbations": list, "meta": dict}
MIN_SIDE = 16
MAX_ASPECT = 200  # the Qwen2.5-VL processor refuses more extreme aspect ratios
RGB_MODES = {"RGB"}
CONVERTIBLE = {"RGBA": "alpha composited on white", "LA": "alpha composited on white", "L": "greyscale",
               "P": "palette", "PA": "palette with alpha", "CMYK": "CMYK", "YCbCr": "YCbCr", "1": "1-bit",
               "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "32-bit integer", "F": "32-bit float",
               "RGBX": "RGBX", "LAB": "Lab", "HSV": "HSV"}


class PairSetError(ValueError):
    """A pair set that cannot be used (strict mode, or nothing valid left)."""


@dataclass
class Problem:
    line: int  # 1-based line in pairs.jsonl (0: the set as a whole)
    message: str
    severity: str = "error"  # or "warning"

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "pairs.jsonl"
        return f"{where}: {'warning: ' if self.severity == 'warning' else ''}{self.message}"


@dataclass
class PairRecord:
    line: int
    id: str
    prompt: str
    chosen: Path
    rejected: Path
    n_perturbations: int  # 0: not given (a human-labelled pair)
    perturbations: list[str]
    split: str
    meta: dict = field(default_factory=dict)


def load_image(path: str | Path) -> Image.Image:
    """Open any PIL-readable image as 8-bit RGB (alpha on white, 16/32-bit scaled, CMYK converted)."""
    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode == "RGB":
            return im.copy()
        if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
            arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
            return Image.fromarray(arr, "L").convert("RGB")
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(bg, rgba).convert("RGB")
        return im.convert("RGB")


def check_image(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) for one image file."""
    if not path.is_file():
        return [f"file not found: {path.name}"], []
    if path.stat().st_size == 0:
        return [f"empty file: {path.name}"], []
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
            mode, (w, h) = im.mode, im.size
    except UnidentifiedImageError:
        return [f"not an image PIL can read: {path.name}"], []
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return [f"unreadable image {path.name}: {err}"], []
    errors, warns = [], []
    if min(w, h) < MIN_SIDE:
        errors.append(f"image too small: {path.name} is {w}x{h} (min side {MIN_SIDE})")
    elif max(w, h) / min(w, h) > MAX_ASPECT:
        errors.append(f"aspect ratio too extreme: {path.name} is {w}x{h}")
    if mode not in RGB_MODES:
        if mode in CONVERTIBLE:
            warns.append(f"{path.name} has mode {mode} ({CONVERTIBLE[mode]}), converted to RGB")
        else:
            errors.append(f"{path.name} has unsupported image mode {mode}")
    return errors, warns


def _check_fields(obj: object) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    missing = [k for k in FIELDS if k not in obj]
    if missing:
        return f"missing field(s): {', '.join(missing)}"
    for key, typ in [*FIELDS.items(), *((k, t) for k, t in OPTIONAL_FIELDS.items() if k in obj)]:
        value = obj[key]
        if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
            return f"field '{key}' must be an integer, got {value!r}"
        if not isinstance(value, typ):
            what = "an object" if typ is dict else typ.__name__
            return f"field '{key}' must be {what}, got {type(value).__name__}"
    if not obj["id"].strip():
        return "field 'id' is empty"
    if not obj["prompt"].strip():
        return "field 'prompt' is empty"
    if "n_perturbations" in obj and obj["n_perturbations"] < 1:
        return f"field 'n_perturbations' must be >= 1, got {obj['n_perturbations']}"
    if not all(isinstance(p, str) for p in obj.get("perturbations", [])):
        return "field 'perturbations' must be a list of strings"
    if obj["split"] not in SPLITS:
        return f"field 'split' must be one of {', '.join(SPLITS)}, got {obj['split']!r}"
    for key in ("chosen", "rejected"):
        p = Path(obj[key])
        if p.is_absolute() or ".." in p.parts:
            return f"field '{key}' must be a path inside the folder, got {obj[key]!r}"
    return None


def scan_pair_set(folder: str | Path, *, check_images: bool = True) -> tuple[list[PairRecord], list[Problem]]:
    """Every valid record and every problem (with its line) of the pair set in ``folder``."""
    folder = Path(folder)
    index = folder / "pairs.jsonl"
    if not index.is_file():
        return [], [Problem(0, f"no pairs.jsonl in {folder}")]
    records: list[PairRecord] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    with open(index, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(Problem(n, "not valid UTF-8"))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(Problem(n, f"bad JSON: {err.msg} (column {err.colno})"))
                continue
            why = _check_fields(obj)
            if why:
                problems.append(Problem(n, why))
                continue
            if obj["id"] in seen:
                problems.append(Problem(n, f"duplicate id {obj['id']!r} (first on line {seen[obj['id']]})"))
                continue
            seen[obj["id"]] = n
            bad = False
            if check_images:
                for key in ("chosen", "rejected"):
                    errors, warns = check_image(folder / obj[key])
                    problems += [Problem(n, f"{key}: {e}") for e in errors]
                    problems += [Problem(n, f"{key}: {w}", "warning") for w in warns]
                    bad = bad or bool(errors)
            if not bad:
                records.append(PairRecord(n, obj["id"], obj["prompt"], folder / obj["chosen"], folder / obj["rejected"],
                                          obj.get("n_perturbations", 0), list(obj.get("perturbations", [])),
                                          obj["split"], obj.get("meta") or {}))
    return records, problems


class PairSet(torch.utils.data.Dataset):
    """The valid records of a pair folder (optionally one split).

    Items are dicts: ``id``, ``prompt``, ``chosen``/``rejected`` (RGB PIL images),
    ``n_perturbations`` (0 when the record does not say), ``perturbations``, ``split``. Bad records are skipped
    with one counted warning, or the set is refused with ``strict=True``.
    """

    def __init__(self, folder: str | Path, split: str | None = None, *, strict: bool = False,
                 check_images: bool = True):
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        self.folder = Path(folder)
        records, problems = scan_pair_set(self.folder, check_images=check_images)
        self.problems = problems
        if not records and any(p.line == 0 for p in problems):
            raise PairSetError(str(problems[0]))
        errors = [p for p in problems if p.severity == "error"]
        if errors and strict:
            shown = "\n".join(str(p) for p in errors[:20])
            more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
            raise PairSetError(f"{len(errors)} bad record(s) in {self.folder}:\n{shown}{more}")
        if errors:
            warnings.warn(f"{self.folder}: skipped {len(errors)} problem(s) in {len({p.line for p in errors})} "
                          f"record(s); run `spatialcore data validate {self.folder}` for the list", stacklevel=2)
        self.records = [r for r in records if split is None or r.split == split]
        self.split = split

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        return {"id": r.id, "prompt": r.prompt, "chosen": load_image(r.chosen), "rejected": load_image(r.rejected),
                "n_perturbations": r.n_perturbations, "perturbations": r.perturbations, "split": r.split}


class PairSampler(torch.utils.data.Sampler):
    """Deterministic, resumable, rank-sharded order over a dataset.

    Each epoch is a permutation from ``(seed, epoch)``; rank r takes positions r, r + W, ...
    (every record exactly once across ranks; with ``even=True`` the tail is dropped so all
    ranks get the same count, as DDP needs). ``state_dict()`` records (epoch, position in this
    rank's shard); after ``load_state_dict`` iteration continues with exactly the next index.
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 even: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.n, self.seed, self.shuffle, self.rank, self.world_size, self.even = n, seed, shuffle, rank, world_size, even
        self.epoch = 0
        self.position = 0

    def shard(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.even:
            order = order[: (self.n // self.world_size) * self.world_size]
        return order[self.rank::self.world_size]

    def __len__(self) -> int:
        return math.floor(self.n / self.world_size) if self.even else len(range(self.rank, self.n, self.world_size))

    def __iter__(self) -> Iterator[int]:
        shard = self.shard(self.epoch)
        while self.position < len(shard):
            i = shard[self.position]
            self.position += 1
            yield i
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n,
                "world_size": self.world_size, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["world_size"] != self.world_size:
            raise ValueError(f"sampler state is for n={state['n']}, world_size={state['world_size']}; "
                             f"this run has n={self.n}, world_size={self.world_size}")
        self.epoch, self.position = state["epoch"], state["position"]
