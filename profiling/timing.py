"""Timing that follows SPEC §6: warm-up first, CUDA events around CUDA-graph replays of a
chunk of calls (no synchronize inside the timed region), medians and spreads per call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_us: float
    p10_us: float
    p90_us: float
    reps: int
    inner: int
    graphed: bool

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def capture_graph(fn: Callable[[], object], inner: int) -> torch.cuda.CUDAGraph | None:
    """A CUDA graph replaying ``fn`` ``inner`` times, or None if ``fn`` cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    before = generator.clone_state()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
    except RuntimeError:
        # A capture that fails (fn syncs with the host) never reaches the generator's capture epilogue:
        # the default generator stays in capture mode and every later random op on the device fails
        # ("Offset increment outside graph capture", seen on an H200 with torch 2.11). Give it a state again.
        generator.graphsafe_set_state(before)
        return None
    return graph


def time_op(fn: Callable[[], object], *, device: torch.device | str = "cpu", reps: int = 30, inner: int = 20,
            warmup: int = 5, graph: bool = True) -> Timing:
    """Per-call time of ``fn``: CUDA events over graph replays on GPU, perf_counter on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner * 1e6)
        return _summary(samples, reps, inner, False)
    for _ in range(warmup):
        fn()
    g = capture_graph(fn, inner) if graph else None
    run = g.replay if g is not None else (lambda: [fn() for _ in range(inner)])
    run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / inner)
    return _summary(samples, reps, inner, g is not None)


def _summary(samples: list[float], reps: int, inner: int, graphed: bool) -> Timing:
    qs = statistics.quantiles(samples, n=10) if len(samples) >= 2 else [samples[0]] * 9
    return Timing(statistics.median(samples), qs[0], qs[-1], reps, inner, graphed)


def copy_bandwidth_gbs(nbytes: int, device: str = "cuda") -> float:
    """Device-to-device copy bandwidth (GB/s, bytes read + written) for buffers of ``nbytes``."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    t = time_op(lambda: dst.copy_(src), device=device, reps=20, inner=10)
    return 2 * src.numel() * 2 / (t.median_us * 1e-6) / 1e9
