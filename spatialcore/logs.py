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


REPORTERS = ("jsonl", "tensorboard", "wandb")


def check_report_to(values: list[str]) -> None:
    """Config check of ``report_to``: known names, and the optional packages they need installed."""
    import importlib.util

    from .config import ConfigError

    bad = [v for v in values if v not in REPORTERS]
    if bad:
        raise ConfigError("report_to", f"unknown {bad} (known: {list(REPORTERS)})")
    for name, module, pkg in (("tensorboard", "tensorboard", "tensorboard"), ("wandb", "wandb", "wandb")):
        if name in values and importlib.util.find_spec(module) is None:
            raise ConfigError("report_to", f"{name} needs the {pkg} package (pip install {pkg})")


class Reporter:
    """Where a run's records go: ``metrics.jsonl`` always (resume and plots read it), and TensorBoard
    (``out/tensorboard``) and Weights & Biases when ``report_to`` names them. Scalars are every finite number
    of a record at its ``step``; :meth:`image` logs a PNG (sample grids). W&B follows its own environment
    (``WANDB_MODE=offline`` works without a network); its run id is the run folder's, so a resumed run
    continues the same W&B run."""

    def __init__(self, path: str | Path, *, report_to: tuple[str, ...] | list[str] = ("jsonl",), step: int = 0,
                 config: dict | None = None):
        self.jsonl = MetricsFile(path)
        out = Path(path).parent
        self.tb = self.wb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events a killed run wrote after its last checkpoint are dropped on resume
            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=step or None)
        if "wandb" in report_to:
            import hashlib

            import wandb

            run_id = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]
            self.wb = wandb.init(project=os.environ.get("WANDB_PROJECT", "spatialcore"), name=out.name, id=run_id,
                                 dir=str(out), resume="allow", config=config)

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(record)
        step = record.get("step")
        scalars = {k: float(v) for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wb is not None:
            self.wb.log(scalars, step=step)

    def image(self, tag: str, png: str | Path, step: int) -> None:
        if self.tb is not None:
            import numpy as np
            from PIL import Image

            self.tb.add_image(tag, np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")
            self.tb.flush()
        if self.wb is not None:
            import wandb

            self.wb.log({tag: wandb.Image(str(png))}, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


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
