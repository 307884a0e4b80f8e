"""Prompt files: one prompt per line (text), or JSON Lines with a ``prompt`` (or ``text``) field per line."""

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
