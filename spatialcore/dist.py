"""torchrun helpers: process group set-up from the environment, rank facts, collectives on any device, and
how a global batch and its samples are split over ranks.

The trainers exchange two kinds of tensors: model-sized ones on the device (gradients, handled by
DDP/FSDP2 or :func:`all_reduce_`) and small host-side ones (rewards, metrics, RNG states). NCCL
serves CUDA tensors only, so a CUDA run starts a device-mapped process group
(:func:`backend_for`: gloo for CPU tensors, NCCL for CUDA tensors) and every collective the trainers
call goes to the backend that serves its tensor's device. Multi-node launches need nothing more:
``torchrun --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...`` sets the same variables.
"""

from __future__ import annotations

import math
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


def max_over_ranks(value: int) -> int:
    """The largest of every rank's ``value`` (a collective; ``value`` itself without a process group)."""
    return int(max(t.item() for t in all_gather(torch.tensor([value], dtype=torch.int64))))


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


def all_reduce_grads(params: dict[str, torch.Tensor], world: int) -> None:
    """Sum gradients over ranks (each rank already weighted its share of the global mean); a parameter
    without a gradient counts as zeros, so every rank reduces the same flat buffer."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
    if world > 1:
        flat = all_reduce_(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
    for p, g in zip(params.values(), grads, strict=True):
        p.grad = g


def gather_by_index(values: torch.Tensor, n_total: int, rank: int, world: int) -> torch.Tensor:
    """All-gather per-rank values of samples ``rank, rank + world, ...`` into the full ``[n_total]``
    (CPU float32: a host-side collective, served by gloo also in a CUDA run)."""
    if world == 1:
        return values.float().cpu()
    per = math.ceil(n_total / world)
    buf = torch.full((per,), float("nan"), dtype=torch.float32)
    buf[: values.numel()] = values.float().cpu()
    full = torch.empty(n_total)
    for r, part in enumerate(all_gather(buf)):
        idx = torch.arange(r, n_total, world)
        full[idx] = part[: idx.numel()]
    return full


def split_batch(global_batch: int, micro_batch: int, world: int, *,
                keys: tuple[str, str] = ("batch_size", "micro_batch")) -> tuple[int, int]:
    """(micro-batch per rank, accumulation steps) for a global batch over ``world`` ranks; raises a
    ConfigError naming the keys when the global batch does not divide (before any model is built)."""
    from .config import ConfigError

    if global_batch % world:
        raise ConfigError(keys[0], f"{keys[0]}={global_batch} cannot be split evenly over {world} ranks")
    per_rank = global_batch // world
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(keys[1], f"{keys[1]}={micro} does not divide the {per_rank} items per rank "
                                   f"({keys[0]}={global_batch} over {world} ranks)")
    return micro, per_rank // micro
