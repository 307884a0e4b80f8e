"""Named phase ranges of a training step, visible to torch.profiler (record_function) and to Nsight
Systems (NVTX); `spatialcore profile` reports time per phase."""

from __future__ import annotations

import contextlib

import torch

PHASES = ("sample", "decode", "score", "advantages", "backward", "optimizer")


@contextlib.contextmanager
def phase(name: str):
    """``with phase("sample"): ...`` marks a training phase; NVTX only when CUDA is initialised."""
    nvtx = torch.cuda.is_available() and torch.cuda.is_initialized()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()
