"""A run folder belongs to one run: a rerun into it resumes only with the config it was started with.

``prepare(cfg)`` runs before anything is built, on every rank (each raises the same error):

* ``run: auto`` (default): a folder holding a run (checkpoints or metrics) with a different config stops with
  one line naming the first differing key; the same config (up to the keys in ``MAY_CHANGE``, which extend or
  observe a run without changing what it computes) resumes;
* ``run: resume``: the same, and a folder without a run to resume is an error;
* ``run: fresh``: an existing run is moved aside to ``<out>.replaced-<time>`` (nothing is deleted) and the run
  starts from scratch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .config import ConfigError, to_dict

# Keys a resumed run may change: threads, logging and saving cadence, the test hook, a time limit, and the
# length of the run (to extend it; schedules that depend on it then continue along the new length).
MAY_CHANGE = frozenset({"run", "threads", "stop_after", "max_minutes", "log_every", "save_every", "eval_every",
                        "steps", "max_steps", "iterations"})


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def first_difference(saved: dict, now: dict) -> tuple[str, Any, Any] | None:
    """(dotted key, saved value, new value) of the first key that differs, outside ``MAY_CHANGE``."""
    a, b = _flat(saved), _flat(now)
    for key in list(b) + [k for k in a if k not in b]:
        if key.split(".")[0] in MAY_CHANGE:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            return key, a.get(key, "<absent>"), b.get(key, "<absent>")
    return None


def holds_run(out: Path) -> bool:
    ckpts = out / "checkpoints"
    metrics = out / "metrics.jsonl"
    return (ckpts.is_dir() and any(ckpts.iterdir())) or (metrics.is_file() and metrics.stat().st_size > 0)


def prepare(cfg, *, main: bool) -> Path | None:
    """Check (and for ``run: fresh`` clear) ``cfg.out`` for this run; returns where an old run was moved."""
    import yaml

    out = Path(cfg.out)
    mode = getattr(cfg, "run", "auto")
    if not holds_run(out):
        if mode == "resume":
            raise ConfigError("run", f"{out} holds no run to resume (no checkpoint, no metrics)")
        return None
    if mode == "fresh":
        aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        if main:
            out.rename(aside)
        return aside
    saved = out / "config.yaml"
    if saved.is_file():
        diff = first_difference(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg))
        if diff:
            key, old, new = diff
            raise ConfigError(key, f"{out} holds a run with {key}={old!r}, this config has {new!r}: give another "
                                   f"out, run=resume with the old config, or run=fresh (--fresh) to start over "
                                   f"(the old run is kept beside it)")
    return None
