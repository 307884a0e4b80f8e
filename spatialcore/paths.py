"""Checks that a path given on the command line or in a config is what the command expects, so
that a wrong folder is one line naming the key and the path, never a traceback from deep inside
a loader."""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError

# The file a LoRA policy folder holds (diffusers' name, what FluxPipeline.load_lora_weights reads).
LORA_FILE = "pytorch_lora_weights.safetensors"

# What each kind of folder must hold, and how to make one.
KINDS = {
    "flux": ("model_index.json", "a Flux pipeline folder (model_index.json; `spatialcore tiny --out DIR` writes "
                                 "a tiny one) or a hub id"),
    "qwen": ("config.json", "a Qwen2.5-VL checkpoint folder (config.json) or a hub id"),
    "spatialscore": ("spatialscore.json", "a SpatialScore folder (spatialscore.json; written by `spatialcore "
                                          "reward train` as OUT/model)"),
    "pairs": ("pairs.jsonl", "a pair-set folder (pairs.jsonl; `spatialcore data synth` writes one)"),
}


def _looks_local(value: str) -> bool:
    """A path rather than a hub id: absolute, relative with a dot, more than owner/name, or its first
    component exists here."""
    p = Path(value)
    return p.is_absolute() or value.startswith(".") or value.count("/") != 1 or Path(p.parts[0]).exists()


def require(value: str | None, key: str, kind: str, *, hub: bool = False) -> None:
    """Raise a :class:`ConfigError` naming ``key`` unless ``value`` is a folder of ``kind`` (or, with
    ``hub``, something that can only be a hub id)."""
    if value is None:
        return
    if str(value).startswith("random:"):
        from .shapes import FLUX_SHAPES, QWEN_SHAPES

        shapes = FLUX_SHAPES if kind == "flux" else QWEN_SHAPES if kind in ("qwen", "spatialscore") else ()
        if str(value)[len("random:"):] not in shapes:
            raise ConfigError(key, f"{value}: random weights exist for " + (", ".join(f"random:{s}" for s in shapes)
                                                                          if shapes else "no folder of this kind"))
        return
    marker, what = KINDS[kind]
    path = Path(value)
    if not path.exists():
        if hub and not _looks_local(value):
            return
        raise ConfigError(key, f"{value} does not exist (expected {what})")
    if not path.is_dir():
        raise ConfigError(key, f"{value} is a file (expected {what})")
    if not (path / marker).is_file():
        hint = ""
        if kind == "spatialscore" and (path / "config.json").is_file():
            hint = " (this looks like a raw backbone checkpoint: train a SpatialScore on it first)"
        else:
            inside = [p for p in sorted(path.iterdir()) if p.is_dir() and (p / marker).is_file()]
            hint = f" (did you mean {inside[0]}?)" if inside else ""
        raise ConfigError(key, f"{value} has no {marker}: expected {what}{hint}")


def require_policy(value: str | None, key: str) -> None:
    """A policy folder written by ``grpo train`` (LoRA file and/or ``transformer/``)."""
    if value is None:
        return
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(key, f"{value} is not a folder (expected a policy folder written by `spatialcore grpo "
                               f"train` as OUT/policy)")
    if not (path / LORA_FILE).is_file() and not (path / "transformer" / "config.json").is_file():
        hint = f" (did you mean {path / 'policy'}?)" if (path / "policy").is_dir() else ""
        raise ConfigError(key, f"{value} holds neither {LORA_FILE} nor transformer/ (expected a policy folder "
                               f"written by `spatialcore grpo train`){hint}")


def git_commit() -> str | None:
    """The checkout's short commit hash (None outside a git checkout); ``SPATIALCORE_COMMIT`` overrides it
    (a copy of a working tree whose .git is not the one it came from, as on the GPU machine, names its commit
    that way)."""
    import os
    import subprocess

    if os.environ.get("SPATIALCORE_COMMIT"):
        return os.environ["SPATIALCORE_COMMIT"]

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
