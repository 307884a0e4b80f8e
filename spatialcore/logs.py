"""Logging conventions shared by every command: one-line step logs, JSONL metrics, progress bars.

* :func:`info` prints one line prefixed with the component name, to stderr.
* :func:`step_line` formats the numbers that matter for one training step on one line.
* :class:`MetricsFile` appends one JSON object per line (flushed), so a killed run keeps
  everything it logged and plots can be redrawn from the file.
* :func:`progress` is tqdm with the project's defaults (off when stderr is not a terminal,
  unless forced with ``SPATIALCORE_PROGRESS=1``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def info(msg: str, *, who: str = "spatialcore") -> None:
    print(f"[{who}] {msg}", file=sys.stderr, flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    mag = abs(value)
    if mag != 0 and (mag < 1e-3 or mag >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4f}" if mag < 10 else f"{value:.2f}"


def step_line(step: int, total: int | None = None, **metrics: Any) -> str:
    """``step 12/400 | loss 0.6931 | reward 0.1200 | ...`` (None values are left out)."""
    head = f"step {step}" + (f"/{total}" if total else "")
    parts = [head] + [f"{k} {_fmt(v)}" for k, v in metrics.items() if v is not None]
    return " | ".join(parts)


class MetricsFile:
    """Append-only JSONL metrics; each record gets a wall-clock ``time`` field. Non-finite numbers
    are written as null (strict JSON; a NaN is never averaged into a plot by accident)."""

    def __init__(self, path: str | Path, *, append: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        record = _finite({"time": round(time.time(), 3), **record})
        self._fh.write(json.dumps(record, default=_json_default) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> MetricsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file; a torn last line (killed writer) is ignored."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def progress(iterable: Iterable[T] | None = None, *, desc: str = "", total: int | None = None,
             unit: str = "it", leave: bool = True) -> Iterator[T] | tqdm:
    forced = os.environ.get("SPATIALCORE_PROGRESS")
    disable = None if forced is None else forced in ("0", "false", "no")
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=disable,
                file=sys.stderr, dynamic_ncols=True)


def quiet_third_party() -> None:
    """Silence library chatter that says nothing to our users (save/load progress bars,
    torchao's import-time notices); our own logs and progress bars stay."""
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
