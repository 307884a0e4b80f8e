"""Loader for the native CUDA extension ``spatialcore._C`` (built with CMake, see CMakeLists.txt).

The library registers ``torch.ops.spatialcore.group_advantages`` (a warp per group). It is
looked up at ``$SPATIALCORE_NATIVE_LIB`` or next to the ``spatialcore`` package (``_C.so``).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import torch


def library_path() -> Path:
    env = os.environ.get("SPATIALCORE_NATIVE_LIB")
    if env:
        return Path(env)
    import spatialcore

    return Path(spatialcore.__file__).parent / "_C.so"


@cache
def load() -> str | None:
    """Load the library once; returns None when loaded, else why it is unavailable."""
    path = library_path()
    if not path.is_file():
        return f"{path} not built (run `make cuda`)"
    try:
        torch.ops.load_library(str(path))
    except OSError as err:
        return f"{path} failed to load: {err}"
    return None


def available() -> bool:
    """True when the library is loaded and a CUDA device can run it."""
    return load() is None and torch.cuda.is_available()


def group_advantages(r: torch.Tensor, *, std: str, unbiased: bool, eps: float, clip: float | None,
                     top_k: int | None, stats_over: str, drop_zero_std: bool, zero_std_tol: float):
    problem = load()
    if problem:
        raise RuntimeError(f"backend='cuda' needs the native extension: {problem}")
    if std == "batch":
        raise NotImplementedError("the native kernel has no std='batch' (grid-wide reduction); use backend='triton'")
    scale_mode = {"group": 0, "none": 2}[std]
    return torch.ops.spatialcore.group_advantages(
        r, int(top_k or 0), stats_over == "kept", bool(unbiased), scale_mode, float(eps), float(clip or 0.0),
        clip is not None, bool(drop_zero_std), float(zero_std_tol))
