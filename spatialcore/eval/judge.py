"""Judging generated images: a detector finds the named objects, GenEval's position rule decides
the directional relations from their boxes.

A task (:class:`Task`) names objects (colour, kind, count) and relations between them. It comes
from a synthetic prompt (:func:`task_from_prompt`) or from a line of GenEval's metadata JSONL
(:func:`task_from_geneval`). A detector maps (image, objects) to boxes per object, best first:

* :class:`OracleDetector` — the pixel oracle of the synthetic domain (colour segmentation plus a
  shape check; CPU, exact on rendered scenes);
* :class:`ZeroShotDetector` — any zero-shot detector that transformers' ``AutoModelForZeroShotObjectDetection``
  loads (OWLv2, Grounding DINO), queried with "a photo of a <colour> <kind>".

GenEval's position rule (``evaluation/evaluate_images.py`` of djghosh13/geneval,
``relative_position``): with box centres ``c_a, c_b`` and box sizes ``d_a, d_b`` (width, height),
``offset = c_a - c_b``; each axis's offset is shrunk towards 0 by ``0.1 (d_a + d_b)`` (clipped at 0);
when both shrunk offsets are below 1e-3 no relation holds, else with ``(dx, dy) = shrunk / |offset|``
A is left of B when ``dx < -0.5``, right of when ``dx > 0.5``, above when ``dy < -0.5``, below when
``dy > 0.5`` (image y grows downwards). A sample is correct when every object is found (``count``
of them) and every relation holds for its top boxes. Relations the rule cannot decide ("next to",
depth, "between") are judged by the pixel oracle's own rules when it is the detector, else left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..data.geometry import DIRECTIONAL, geneval_relations

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Wanted:
    kind: str
    colour: str | None = None
    count: int = 1

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}" if self.colour else self.kind


@dataclass
class Task:
    prompt: str
    objects: list[Wanted]
    relations: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # (type, object indices)
    tag: str = "synthetic"


@dataclass
class Verdict:
    found: list[bool]
    relations: list[bool | None]  # None: not judged (no rule for it with this detector)
    boxes: list[list[list[float]]]

    @property
    def all_found(self) -> bool:
        return all(self.found)

    @property
    def correct(self) -> bool:
        """GenEval's notion: every object found and every judged relation holds."""
        return self.all_found and all(r is not False for r in self.relations)

    def to_dict(self) -> dict:
        return {"found": self.found, "relations": self.relations, "all_found": self.all_found,
                "correct": self.correct, "boxes": self.boxes}


# ----------------------------------------------------------------------------- tasks


def task_from_prompt(prompt: str) -> Task:
    """The objects and relations of a prompt in the synthetic grammar (ValueError if it has none)."""
    from ..data.scene import parse_prompt

    rels = parse_prompt(prompt)
    if not rels:
        raise ValueError(f"not a prompt of the synthetic grammar (no relation found): {prompt!r}")
    idents: dict[tuple[str, str], int] = {}
    for rel in rels:
        for a in rel.args:
            idents.setdefault(a, len(idents))
    objects = [Wanted(kind, colour) for colour, kind in idents]
    return Task(prompt, objects, [(rel.type, tuple(idents[a] for a in rel.args)) for rel in rels])


def task_from_geneval(record: dict) -> Task:
    """A line of GenEval's ``evaluation_metadata.jsonl``: ``include`` entries (class, count, optional
    color and ``position: [relation, index]``)."""
    objects, relations = [], []
    for i, req in enumerate(record.get("include", [])):
        objects.append(Wanted(req["class"], req.get("color"), int(req.get("count", 1))))
        if "position" in req:
            rel, target = req["position"]
            relations.append((rel, (i, int(target))))
    if not objects:
        raise ValueError("a GenEval record needs 'include' entries")
    return Task(record["prompt"], objects, relations, record.get("tag", "geneval"))


def load_tasks(source: str, *, n: int, seed: int) -> list[Task]:
    """Tasks from ``synthetic:PRESET`` (the held-out test prompts), a GenEval metadata ``.jsonl``, or a
    text file of synthetic-grammar prompts (one per line)."""
    from ..config import ConfigError

    if source.startswith("synthetic:"):
        from ..data.synth import DIFFICULTIES, split_prompts

        preset = source.split(":", 1)[1]
        if preset not in DIFFICULTIES:
            raise ConfigError("--prompts", f"unknown preset {preset!r} (synthetic:{'|'.join(DIFFICULTIES)})")
        return [task_from_prompt(p) for p in split_prompts(preset, {}, "test", n, seed)]
    path = Path(source)
    if not path.is_file():
        raise ConfigError("--prompts", f"{source} is neither synthetic:PRESET nor a file")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    try:
        if path.suffix == ".jsonl":
            return [task_from_geneval(json.loads(ln)) for ln in lines][:n]
        return [task_from_prompt(ln.strip()) for ln in lines][:n]
    except (ValueError, KeyError) as err:
        raise ConfigError("--prompts", f"{source}: {err}") from None


# ----------------------------------------------------------------------------- detectors


class OracleDetector:
    """The pixel oracle as a detector: an object is found when its colour is present and its shape is
    not clearly another kind; its box is the bounding box of its colour's pixels."""

    name = "oracle"

    def __call__(self, image, objects: list[Wanted]) -> list[list[list[float]]]:
        from ..data.oracle import detect

        self._found = detect(image)
        boxes = []
        for w in objects:
            d = self._found.get(w.colour) if w.colour else None
            if d is None or not d.kind_ok(w.kind):
                boxes.append([])
                continue
            ys, xs = np.nonzero(d.mask)
            boxes.append([[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]])
        return boxes

    def relation(self, image, rtype: str, objects: list[Wanted]) -> bool | None:
        """The oracle's own verdict for relations GenEval's rule does not cover (after ``__call__``)."""
        from ..data.oracle import _decide
        from ..data.render import halo_px

        dets = [self._found.get(w.colour) for w in objects]
        if any(d is None for d in dets):
            return False
        return _decide(rtype, dets, halo_px(image.width))


class ZeroShotDetector:
    """A transformers zero-shot detector (OWLv2, Grounding DINO) from ``from_pretrained``."""

    def __init__(self, path: str, *, threshold: float = 0.1, device: str = "cpu"):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(path).to(device).eval()
        self.threshold, self.device, self.name = threshold, device, f"zero-shot ({Path(path).name})"

    def __call__(self, image, objects: list[Wanted]) -> list[list[list[float]]]:
        import torch

        queries = [f"a photo of a {w.name}" for w in objects]
        inputs = self.processor(text=[queries], images=image.convert("RGB"), return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model(**inputs)
        post = getattr(self.processor, "post_process_grounded_object_detection", None) or \
            self.processor.post_process_object_detection
        res = post(out, threshold=self.threshold, target_sizes=[(image.height, image.width)], text_labels=[queries])[0]
        boxes: list[list[tuple[float, list[float]]]] = [[] for _ in objects]
        labels = res.get("text_labels", res.get("labels"))
        for score, label, box in zip(res["scores"].tolist(), labels, res["boxes"].tolist(), strict=True):
            i = queries.index(label) if isinstance(label, str) else int(label)
            boxes[i].append((score, box))
        return [[b for _, b in sorted(bs, key=lambda x: -x[0])] for bs in boxes]

    def relation(self, image, rtype: str, objects: list[Wanted]) -> bool | None:
        return None


def make_detector(spec: str, *, threshold: float = 0.1, device: str = "cpu"):
    """``oracle`` or a zero-shot detector folder / hub id."""
    return OracleDetector() if spec == "oracle" else ZeroShotDetector(spec, threshold=threshold, device=device)


def judge(image, task: Task, detector) -> Verdict:
    """Objects found (``count`` boxes each) and each relation's verdict for one image."""
    boxes = detector(image, task.objects)
    found = [len(b) >= w.count for b, w in zip(boxes, task.objects, strict=True)]
    verdicts: list[bool | None] = []
    for rtype, idx in task.relations:
        if not all(found[i] for i in idx):
            verdicts.append(False)
        elif rtype in DIRECTIONAL:
            a, b = idx[0], idx[1]
            verdicts.append(all(rtype in geneval_relations(x, y) for x in boxes[a][:task.objects[a].count]
                                for y in boxes[b][:task.objects[b].count]))
        else:
            verdicts.append(detector.relation(image, rtype, [task.objects[i] for i in idx]))
    return Verdict(found, verdicts, boxes)


def judge_synthetic(images, prompts: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per image: all named objects found, and GenEval-correct (found and every relation holds), by the
    pixel oracle; (None, None) when the prompts are not of the synthetic grammar."""
    import torch

    try:
        tasks = [task_from_prompt(p) for p in prompts]
    except ValueError:
        return None, None
    det = OracleDetector()
    verdicts = [judge(im, t, det) for im, t in zip(images, tasks, strict=True)]
    return (torch.tensor([float(v.all_found) for v in verdicts]), torch.tensor([float(v.correct) for v in verdicts]))


def judge_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The evaluation's verdict as a reward (``spatialcore eval``'s pixel-oracle detector and GenEval's
    position rule): 1 when every named object is found and every relation holds, 0 when the objects are
    found but a relation fails, -1 when a named object is missing. ``[B]`` float32 on the images' device."""
    import torch

    from ..data.oracle import prompt_relations
    from ..rl.sampler import to_pil

    for p in prompts:
        prompt_relations(p)  # the same one-line refusal as the other forms for a prompt of another grammar
    found, correct = judge_synthetic(to_pil(images), prompts)
    return (correct - (1.0 - found)).to(device=images.device, dtype=torch.float32)
