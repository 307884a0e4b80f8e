"""torchrun helpers: process group set-up from the environment, rank facts, all-reduce of metrics."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initialises the process group under torchrun (gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def start_run(cfg) -> tuple[int, int, torch.device]:
    """A trainer's first lines: process group, CPU threads (``cfg.threads``), seed (``cfg.seed``),
    and on rank 0 the run folder ``cfg.out`` with the resolved ``config.yaml``."""
    from pathlib import Path

    from .config import save_config

    rank, world, device = init()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if is_main():
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.out) / "config.yaml")
    return rank, world, device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def mean(value: float, device: torch.device | str = "cpu") -> float:
    """Average a Python number over ranks (identity without a process group)."""
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
