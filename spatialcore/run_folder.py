"""A run folder: ``config.yaml`` (the resolved config), ``run.json`` (which code ran it, each start),
``metrics.jsonl`` (every step once) and ``checkpoints/``. It belongs to one run: a rerun into it resumes only
with the config it was started with.

``open_run(cfg, world)`` is a trainer's first step after the process group; ``prepare(cfg)`` runs in it
before anything is built, on every rank (each raises the same error):

* ``run: auto`` (default): a folder holding a run (checkpoints or metrics) with a different config stops with
  one line naming the first differing key; the same config (up to the keys in ``MAY_CHANGE``, which extend or
  observe or move a run without changing what it computes, and keys added to the code since the run was saved
  that hold their defaults, named in one line) resumes;
* ``run: resume``: the same, and a folder without a run to resume is an error;
* ``run: fresh``: an existing run is moved aside to ``<out>.replaced-<time>`` (nothing is deleted) and the run
  starts from scratch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .config import ConfigError, save_config, to_dict
from .logs import Reporter

# Keys a resumed run may change: threads, logging and saving cadence, the test hook, a time limit, the length of
# the run (to extend it; schedules that depend on it then continue along the new length), and where the folder is
# (a run folder moved or renamed resumes where it now is: nothing in it names its own path).
MAY_CHANGE = frozenset({"run", "out", "threads", "stop_after", "max_minutes", "log_every", "save_every", "eval_every",
                        "steps", "max_steps", "iterations"})


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


_ABSENT = "<absent>"


_NO_DEFAULT = object()


def _default(cls: type | None, key: str) -> Any:
    """The value config class ``cls`` gives the dotted ``key`` when nothing sets it (a nested section's own default
    included), or ``_NO_DEFAULT`` when it has none (a required key, a list item, not a field of ``cls``)."""
    import dataclasses
    import typing

    from .config import json_plain

    node, section, value = cls, _NO_DEFAULT, _NO_DEFAULT  # section: the default instance the parent's default built
    for part in key.split("."):
        if node is None or not dataclasses.is_dataclass(node):
            return _NO_DEFAULT
        f = next((f for f in dataclasses.fields(node) if f.name == part and f.init), None)
        if f is None:
            return _NO_DEFAULT
        if section is not _NO_DEFAULT:
            value = getattr(section, part)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = _NO_DEFAULT
        hint = typing.get_type_hints(node)[part]
        node, section = (hint, value) if dataclasses.is_dataclass(hint) else (None, _NO_DEFAULT)
    return _NO_DEFAULT if value is _NO_DEFAULT or dataclasses.is_dataclass(value) else json_plain(value)


def compare_configs(saved: dict, now: dict, cls: type | None = None) -> tuple[tuple[str, Any, Any] | None, list[str]]:
    """(the first key that differs, outside ``MAY_CHANGE``, as (dotted key, saved value, new value); the keys the
    saved config lacks that hold ``cls``'s default now). A key added to the code after a run was saved does not stop
    its resume while it keeps its default (a new key's default is the behaviour the code had before it); set to
    anything else, or a key the code no longer has, it is a difference."""
    a, b = _flat(saved), _flat(now)
    added = []
    for key in list(b) + [k for k in a if k not in b]:
        if key.split(".")[0] in MAY_CHANGE:
            continue
        old, new = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if key not in a and new == _default(cls, key):
            added.append(key)
        elif old != new:
            return (key, old, new), added
    return None, added


def first_difference(saved: dict, now: dict, cls: type | None = None) -> tuple[str, Any, Any] | None:
    """(dotted key, saved value, new value) of the first key that differs (``compare_configs``)."""
    return compare_configs(saved, now, cls)[0]


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
        diff, added = compare_configs(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg), type(cfg))
        if added and not diff and main:
            from .logs import info

            info(f"{saved} predates {', '.join(added)}: resuming with "
                 f"{'their defaults' if len(added) > 1 else 'its default'} (the code's behaviour before it)")
        if diff:
            key, old, new = diff
            raise ConfigError(key, f"{out} holds a run with {key}={old!r}, this config has {new!r}: give another "
                                   f"out, run=resume with the old config, or run=fresh (--fresh) to start over "
                                   f"(the old run is kept beside it)")
    return None


def open_run(cfg, world: int) -> None:
    """Check (``prepare``) the run folder on every rank, then on rank 0 write ``config.yaml`` and add this start
    to ``run.json``; a collective."""
    from .dist import barrier, is_main
    from .logs import info

    aside = prepare(cfg, main=is_main())
    barrier()
    if is_main():
        if aside:
            info(f"run=fresh: the previous run in {cfg.out} moved to {aside}")
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        record_start(out, world)


def record_start(out: Path, world: int) -> None:
    """Append this start of the run to ``out/run.json`` (``starts``: git commit, command line, time, ranks), so a
    run folder says which code produced it, and which code each resume continued with."""
    import json
    import sys

    from .atomic import atomic_write_text
    from .paths import git_commit

    path = out / "run.json"
    try:
        starts = json.loads(path.read_text())["starts"] if path.is_file() else []
    except (json.JSONDecodeError, KeyError, TypeError):
        starts = []  # an unreadable record is replaced, never a reason to stop a run
    starts.append({"commit": git_commit(), "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ranks": world})
    atomic_write_text(path, json.dumps({"starts": starts}, indent=2) + "\n")


def open_metrics(out: Path, step: int, cfg) -> Reporter | None:
    """Rank 0's reporter: ``metrics.jsonl`` holding only the records of steps ``<= step`` (none for a fresh
    run: the records a killed process wrote after its last checkpoint are dropped, so the resumed run writes
    each step exactly once), plus the integrations ``cfg.report_to`` names."""
    from .dist import is_main
    from .logs import MetricsFile, read_metrics

    if not is_main():
        return None
    path = out / "metrics.jsonl"
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step] if step and path.is_file() else []
    with MetricsFile(path, append=False) as m:
        for r in keep:
            m.write(r)
    return Reporter(path, report_to=cfg.report_to, step=step, config=to_dict(cfg))
