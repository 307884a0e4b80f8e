"""``spatialcore profile <suite>``: one run of a bench suite under torch.profiler.

Writes into the output folder:

* ``trace.json``: Chrome / Perfetto trace (open in ui.perfetto.dev or chrome://tracing);
* ``profile.md``: the phases (sample / decode / score / advantages / backward / optimizer) with
  their total time, the top operators by self time, and the GPU timeline summary;
* ``nvml.json`` + ``nvml.png``: GPU utilisation, memory and power sampled by NVML every
  ``interval`` seconds while the suite ran (absent values without a GPU/driver are stated, not
  invented).

The phases are NVTX ranges too, so ``nsys profile spatialcore profile grpo`` shows them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..phases import PHASES


class NVMLSampler:
    """Background sampler of (t, utilisation %, memory GiB, power W) for one GPU via NVML."""

    def __init__(self, index: int = 0, interval: float = 0.1):
        self.index, self.interval = index, interval
        self.samples: list[dict] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> NVMLSampler:
        try:
            import pynvml
        except ImportError:
            self.error = "NVML unavailable: nvidia-ml-py is not installed"
            return self
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except pynvml.NVMLError as err:
            self.error = f"NVML unavailable: {type(err).__name__}"
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def _run(self) -> None:
        import pynvml

        while not self._stop.is_set():
            util = pynvml.nvmlDeviceGetUtilizationRates(self._handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(self._handle)
            try:
                power = pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
            except pynvml.NVMLError:
                power = None
            self.samples.append({"t": time.perf_counter() - self._t0, "util_pct": float(util.gpu),
                                 "mem_gib": mem.used / 2**30, "power_w": power})
            self._stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            import pynvml

            pynvml.nvmlShutdown()


def run_profile(fn: Callable[[], object], out: Path, *, title: str, interval: float = 0.1, top: int = 25) -> dict:
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with NVMLSampler(interval=interval) as nvml, profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    prof.export_chrome_trace(str(out / "trace.json"))
    events = prof.key_averages()
    time_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    phases = {}
    for e in events:
        if e.key in PHASES:
            phases[e.key] = {"calls": e.count, "cpu_ms": e.cpu_time_total / 1e3,
                             "device_ms": getattr(e, "device_time_total", 0.0) / 1e3 if cuda else None}
    ops = sorted((e for e in events if e.key not in PHASES), key=lambda e: getattr(e, time_key, 0.0), reverse=True)
    top_ops = [{"op": e.key, "calls": e.count, "self_ms": getattr(e, time_key, 0.0) / 1e3,
                "cpu_total_ms": e.cpu_time_total / 1e3} for e in ops[:top]]
    (out / "nvml.json").write_text(json.dumps({"error": nvml.error, "samples": nvml.samples}, indent=1))
    if nvml.samples:
        _plot_nvml(nvml.samples, out / "nvml.png")
    lines = [f"# profile: {title}", "", f"wall time {wall:.3f} s; device "
             f"{torch.cuda.get_device_name(0) if cuda else 'cpu'}; trace: trace.json", "",
             "## Phases (record_function / NVTX ranges)", "", "| phase | calls | CPU ms | device ms |",
             "|---|---:|---:|---:|"]
    for name in PHASES:
        if name in phases:
            p = phases[name]
            dev = f"{p['device_ms']:.2f}" if p["device_ms"] is not None else "-"
            lines.append(f"| {name} | {p['calls']} | {p['cpu_ms']:.2f} | {dev} |")
    lines += ["", f"## Top {top} operators by self {'device' if cuda else 'CPU'} time", "",
              "| operator | calls | self ms | CPU total ms |", "|---|---:|---:|---:|"]
    lines += [f"| `{o['op']}` | {o['calls']} | {o['self_ms']:.3f} | {o['cpu_total_ms']:.3f} |" for o in top_ops]
    lines += ["", "## GPU timeline (NVML)", ""]
    if nvml.samples:
        util = [s["util_pct"] for s in nvml.samples]
        mem = [s["mem_gib"] for s in nvml.samples]
        lines += [f"{len(util)} samples every {interval} s: utilisation mean {sum(util) / len(util):.0f}% "
                  f"(max {max(util):.0f}%), memory max {max(mem):.1f} GiB", "", "![nvml](nvml.png)"]
    else:
        lines.append(nvml.error or "no samples (the run was shorter than one interval)")
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    return {"wall_s": wall, "phases": phases, "top_ops": top_ops, "nvml_samples": len(nvml.samples),
            "nvml_error": nvml.error}


def _plot_nvml(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(7, 6), dpi=110, sharex=True)
    axes[0].plot(t, [s["util_pct"] for s in samples])
    axes[0].set_ylabel("GPU util %")
    axes[1].plot(t, [s["mem_gib"] for s in samples])
    axes[1].set_ylabel("memory GiB")
    axes[2].plot(t, [s["power_w"] or 0 for s in samples])
    axes[2].set_ylabel("power W")
    axes[2].set_xlabel("seconds")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
