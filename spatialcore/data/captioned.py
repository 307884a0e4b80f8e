"""Captioned images: the (prompt, image) items a generator is fine-tuned on.

Three sources (``source``): the streaming synthetic renderer (perfect scenes of a preset's split, their captions
optionally made web-like: relation words dropped or wrong, ``caption_drop`` / ``caption_wrong``), the
``chosen`` images of a pair set (SPEC §5), or a folder of images with ``metadata.jsonl``
(``{"file_name": ..., "prompt": ...}`` per line). Item ``k`` of stream ``s`` is a pure function of
(config, seed, s, k), so a run can put it on any rank and a resumed run draws it again identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..config import ConfigError, param


@dataclass
class CaptionedDataConfig:
    source: Literal["synthetic", "pairs", "folder"] = "synthetic"
    path: str | None = param(None, help="pair-set folder (its chosen images) or image folder with metadata.jsonl")
    preset: Literal["easy", "medium", "hard", "easy_grid"] = "easy"  # synthetic: the scene preset
    synth: dict[str, Any] = field(default_factory=dict)  # synthetic: SynthConfig overrides (size is image_size)
    split: Literal["train", "val", "test"] = "train"
    # Web-like captions (synthetic scenes): the relation phrase dropped ("A red circle and a blue square.") or
    # replaced by another direction, each with its probability; the image stays the scene's.
    caption_drop: float = param(0.0, min=0.0, max=1.0, help="probability a caption loses its relation phrase")
    caption_wrong: float = param(0.0, min=0.0, max=1.0, help="probability a caption names another direction")

    def check(self) -> None:
        if self.source != "synthetic" and not self.path:
            raise ConfigError("data.path", f"data.source={self.source} needs a folder")
        if self.caption_drop + self.caption_wrong > 1:
            raise ConfigError("data.caption_wrong", "caption_drop + caption_wrong exceed 1")


def to_tensor(image, size: int) -> torch.Tensor:
    """A PIL image as ``[3, size, size]`` in [-1, 1] (centre-cropped to a square, resized)."""
    from PIL import Image

    im = image.convert("RGB")
    if im.width != im.height:
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if im.width != size:
        im = im.resize((size, size), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1


class CaptionedItems:
    """Item ``k`` of stream ``stream`` -> (prompt, PIL image), the same on every rank and after a resume."""

    def __init__(self, data: CaptionedDataConfig, *, image_size: int, seed: int):
        self.data, self.seed = data, seed
        if data.source == "synthetic":
            from ..config import from_dict
            from ..data.synth import DIFFICULTIES, SynthConfig

            self.synth = from_dict(SynthConfig, {**DIFFICULTIES[data.preset], **data.synth, "size": image_size},
                                   "data.synth")
            self.synth.check()
            self.spec = self.synth.spec()
            self.records = None
        else:
            self.records = _records(data.source, Path(data.path), data.split)

    def __len__(self) -> int:
        return len(self.records) if self.records is not None else 0

    def __call__(self, stream: int, k: int):
        if self.records is None:
            from .synth import scene_sample

            prompt, image, _ = scene_sample(self.synth, f"sft-{self.seed}-{stream}", k, self.data.split, spec=self.spec)
            d = self.data
            if d.caption_drop or d.caption_wrong:
                from .captions import corrupt_caption

                rng = np.random.default_rng([self.seed, stream, k, 3])
                prompt = corrupt_caption(prompt, rng, drop=d.caption_drop, wrong=d.caption_wrong)
            return prompt, image
        from .pairs import load_image

        n = len(self.records)
        perm = np.random.default_rng([self.seed, stream, k // n]).permutation(n)
        prompt, path = self.records[perm[k % n]]
        return prompt, load_image(path)


def _records(source: str, folder: Path, split: str) -> list[tuple[str, Path]]:
    """(prompt, image path) of a pair set's chosen images in ``split``, or of an image folder."""
    if not folder.is_dir():
        raise ConfigError("data.path", f"{folder} is not a folder")
    if source == "pairs":
        from .pairs import scan_pair_set

        recs, problems = scan_pair_set(folder, check_images=False)
        out = [(r.prompt, r.chosen) for r in recs if r.split == split]
        if not out:
            why = f" ({problems[0]})" if problems else ""
            raise ConfigError("data.path", f"{folder} has no '{split}' pairs{why}")
        return out
    from .prompts import read_image_prompts

    if not (folder / "metadata.jsonl").is_file():
        raise ConfigError("data.path", f"{folder / 'metadata.jsonl'} is missing (one {{\"file_name\": ..., "
                                       f"\"prompt\": ...}} per line)")
    return [(prompt, image) for image, prompt in read_image_prompts(folder / "metadata.jsonl", "data.path")]
