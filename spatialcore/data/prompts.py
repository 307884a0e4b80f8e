"""Prompt files: one prompt per line (text), or JSON Lines with a ``prompt`` (or ``text``) field per line; and
lists of images with their prompts (JSON Lines)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError


def read_prompts(path: str | Path, key: str) -> list[str]:
    """The prompts of ``path`` in file order (blank lines skipped); ``key`` names the config key or option
    in the one-line error a missing file, a bad line or an empty file gives."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(key, f"{path} is not a file")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                rec = json.loads(line)
                prompt = rec.get("prompt", rec.get("text")) if isinstance(rec, dict) else None
            except ValueError:
                raise ConfigError(key, f"{path} line {n}: not JSON") from None
            if not isinstance(prompt, str) or not prompt.strip():
                raise ConfigError(key, f"{path} line {n}: needs a 'prompt' (or 'text') string")
            line = prompt.strip()
        out.append(line)
    if not out:
        raise ConfigError(key, f"{path} holds no prompts")
    return out


def read_image_prompts(source: str | Path, key: str) -> list[tuple[Path, str]]:
    """(image, prompt) of each line of a JSON Lines file with an image path and its prompt (``image`` or
    ``file_name``; ``prompt`` or ``text``): the ``samples.jsonl`` that ``sample`` and ``eval`` write, or a
    Hugging Face image folder's ``metadata.jsonl``; a folder means the one of those it holds. Image paths are
    taken as written, else relative to the file's folder. ``key`` names the option or config key in the
    one-line error of a bad line, a missing image or an empty file."""
    path = Path(source)
    if path.is_dir():
        found = [path / n for n in ("samples.jsonl", "metadata.jsonl") if (path / n).is_file()]
        if not found:
            raise ConfigError(key, f"{source} holds neither samples.jsonl nor metadata.jsonl")
        path = found[0]
    if not path.is_file():
        raise ConfigError(key, f"{source}: not found")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            image, prompt = rec.get("image", rec.get("file_name")), rec.get("prompt", rec.get("text"))
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError(key, f"{path} line {n}: not a JSON object") from None
        if not isinstance(image, str) or not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(key, f"{path} line {n}: needs 'image' (or 'file_name') and 'prompt' (or 'text')")
        file = Path(image) if Path(image).is_file() else path.parent / image
        if not file.is_file():
            raise ConfigError(key, f"{path} line {n}: image {image} not found")
        out.append((file, prompt))
    if not out:
        raise ConfigError(key, f"{path} lists no images")
    return out
