"""torchrun helpers: process group set-up from the environment, rank facts, collectives on any device.

The trainers exchange two kinds of tensors: model-sized ones on the device (gradients, handled by
DDP/FSDP2 or :func:`all_reduce_`) and small host-side ones (rewards, metrics, RNG states). NCCL
serves CUDA tensors only, so a CUDA run starts a device-mapped process group
(:func:`backend_for`: gloo for CPU tensors, NCCL for CUDA tensors) and every collective the trainers
call goes to the backend that serves its tensor's device. Multi-node launches need nothing more:
``torchrun --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...`` sets the same variables.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

# Which tensor devices a process-group backend serves (for a device-mapped "cpu:gloo,cuda:nccl"
# string, the devices it names).
_SERVES = {"gloo": {"cpu"}, "nccl": {"cuda"}, "mpi": {"cpu", "cuda"}}


def backend_for(device_type: str) -> str:
    """The process-group backend a run on ``device_type`` starts: ``cpu:gloo,cuda:nccl`` on CUDA
    (host-side tensors of the trainers go through gloo), ``gloo`` on the CPU."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def served_devices(backend: str) -> set[str]:
    """Device types whose tensors ``backend`` (plain or device-mapped) can reduce."""
    if ":" not in backend:
        return set(_SERVES.get(backend, set()))
    return {part.split(":", 1)[0].strip() for part in backend.split(",")}


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def init() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend_for(device.type))
    return rank, world, device


def start_run(cfg) -> tuple[int, int, torch.device]:
    """A trainer's first lines: process group, CPU threads (``cfg.threads``), seed (``cfg.seed``),
    and on rank 0 the run folder ``cfg.out`` with the resolved ``config.yaml``."""
    from pathlib import Path

    from .config import save_config
    from .logs import info
    from .run_folder import prepare

    rank, world, device = init()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    aside = prepare(cfg, main=is_main())
    barrier()
    if aside and is_main():
        info(f"run=fresh: the previous run in {cfg.out} moved to {aside}")
    if is_main():
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.out) / "config.yaml")
        record_start(Path(cfg.out), world)
    return rank, world, device


def record_start(out, world: int) -> None:
    """Append this start of the run to ``out/run.json`` (``starts``: git commit, command line, time, ranks), so a
    run folder says which code produced it, and which code each resume continued with."""
    import json
    import sys
    import time
    from pathlib import Path

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


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (identity without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), index = rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def mean(value: float) -> float:
    """Average a Python number over ranks (identity without a process group)."""
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Every rank leaves together: rank 0 may still be writing the export while the others are done, and a
    gloo rank that tore its group down alone was seen to abort at exit ("terminate called without an active
    exception") under load."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
