"""Facts about the accelerator and the attention kernels available, with quiet CPU fallbacks."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any


@dataclass
class GPUFacts:
    index: int
    name: str
    memory_total_gib: float
    memory_used_gib: float
    utilization_pct: float | None
    power_w: float | None


def default_dtype(device: Any) -> Any:
    """The compute dtype of measurements on ``device``: bfloat16 on CUDA, float32 elsewhere."""
    import torch

    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def gpu_facts() -> list[GPUFacts]:
    """One entry per visible NVIDIA GPU through NVML; ``[]`` without a GPU or driver."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except pynvml.NVMLError:
                util = None
            try:
                power = pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0
            except pynvml.NVMLError:
                power = None
            out.append(GPUFacts(i, name.decode() if isinstance(name, bytes) else name,
                                mem.total / 2**30, mem.used / 2**30, util, power))
    finally:
        pynvml.nvmlShutdown()
    return out


def memory_gib(device: Any = None) -> float | None:
    """Peak CUDA memory allocated by this process (GiB), or None on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def attention_backends() -> dict[str, bool]:
    """Which attention implementations can run here (flash-attn/xformers are optional)."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
        "flash_attention_2": cuda and importlib.util.find_spec("flash_attn") is not None,
        "xformers": cuda and importlib.util.find_spec("xformers") is not None,
        "eager": True,
    }


SDPA_BACKENDS = ("flash", "mem_efficient", "cudnn", "math")


def sdpa_for_training(device: Any) -> str:
    """Take PyTorch SDPA's cuDNN backend out of training on CUDA (FlashAttention-2 and the memory-efficient
    kernel remain): its backward failed on an H200 with torch 2.11 at FLUX.1-dev shapes (cuDNN
    ``mha_graph.execute(...).is_good()`` false with CUDA_LAUNCH_BLOCKING=1, an illegal memory access in the
    next kernel without it; docs/PERF.md). The switch is process-wide, so the backward of a gradient-
    checkpointed block, which recomputes its forward outside any context manager, picks the same kernels.
    Returns the SDPA backends left enabled, for the run's log; on the CPU nothing changes."""
    import torch

    if torch.device(device).type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    enabled = {"flash": torch.backends.cuda.flash_sdp_enabled(),
               "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
               "cudnn": torch.backends.cuda.cudnn_sdp_enabled(), "math": torch.backends.cuda.math_sdp_enabled()}
    return ", ".join(name for name in SDPA_BACKENDS if enabled[name])


def environment_report() -> dict[str, Any]:
    """Versions, device and kernels: what `spatialcore info` prints and benchmarks record."""
    import platform

    import torch

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_runtime": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_threads": torch.get_num_threads(),
    }
    for pkg in ("triton", "transformers", "diffusers", "peft", "torchao", "liger_kernel"):
        spec = importlib.util.find_spec(pkg)
        if spec is None:
            report[pkg] = None
            continue
        try:
            report[pkg] = version(pkg.replace("_", "-"))
        except PackageNotFoundError:
            report[pkg] = "installed (no metadata)"
    report["attention"] = attention_backends()
    report["gpus"] = [asdict(g) for g in gpu_facts()]
    return report


class PhasePeaks:
    """Per-phase peak of allocated GPU memory inside one training step: ``start(name)`` resets the allocator's peak,
    ``stop()`` reads it as ``mem_<name>_gib``. On a CPU it records nothing (torch keeps no such counter there)."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.device, self.peaks, self.name = device, {}, None

    def start(self, name: str) -> None:
        import torch

        self.name = name
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> None:
        import torch

        if self.cuda:
            self.peaks[f"mem_{self.name}_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30


def value_of(t) -> float:
    """A scalar tensor's value as a float; 0.0 for a meta tensor (a memory plan replays a step on the meta device,
    where there are shapes but no numbers)."""
    return 0.0 if getattr(t, "is_meta", False) else float(t)
