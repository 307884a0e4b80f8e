"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainers' ``parallel: fsdp2``: a model sharded per block,
and its state as full (unsharded) tensors for checkpoints and exports, so a run resumes on any number of ranks, with
or without sharding.

Every function here that gathers or scatters is a collective: all ranks call it, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def shard(model: torch.nn.Module, blocks: Iterable[torch.nn.Module]) -> None:
    """One shard group per block of ``blocks`` (each gathered while it runs), then the rest of ``model``. Gradients
    are averaged over ranks (FSDP2's reduction; a trainer that weighted each rank's share of a global mean scales its
    loss by the number of ranks)."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    # the root too is resharded after its forward (FSDP2 keeps it gathered by default): its registered parameters
    # are then always the sharded ones the optimizer holds, which checkpoints, weight swaps (EMA) and loads address
    fully_shard(model, reshard_after_forward=True)


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensors(tensors: dict[str, torch.Tensor], *, keep: bool = True) -> dict[str, torch.Tensor]:
    """Each tensor whole on the host, gathered one at a time (a DTensor's gather is a collective: every rank calls
    this with the same names in the same order); ``keep=False`` (ranks that do not write) returns {} and holds
    nothing but the tensor being gathered."""
    out = {}
    for n, t in tensors.items():
        whole = t.full_tensor() if is_sharded(t) else t
        if keep:
            out[n] = whole.detach().cpu()
    return out


def load_into(dst: dict[str, torch.Tensor], src: dict[str, torch.Tensor]) -> None:
    """Copy full host tensors ``src`` into ``dst`` (each rank keeps its shard of a DTensor)."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for n, t in dst.items():
            value = src[n].to(t.device, t.dtype)
            if is_sharded(t):
                value = distribute_tensor(value, t.device_mesh, t.placements)
            t.copy_(value)


def model_state(model: torch.nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The model's full state dict on the host of rank 0 (the other ranks get {}: a 12 B model would not fit every
    rank's host memory), restricted to ``names`` where given."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {n: t for n, t in full.items() if names is None or n in names}


def optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's full state on rank 0's host, keyed by parameter names (loads into any number of ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """The inverse of :func:`optimizer_state`; a stateless optimizer (plain SGD) has nothing to load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if state.get("state"):
        set_optimizer_state_dict(model, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def named_optimizer_state(state: dict, names: list[str]) -> dict:
    """An optimizer state keyed by parameter index (``Optimizer.state_dict()``) keyed by the parameters' names
    instead (``names`` in the optimizer's parameter order), as :func:`optimizer_state` writes it; a named one as is."""
    if not _indexed(state):
        return state
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def indexed_optimizer_state(state: dict, names: list[str]) -> dict:
    """The inverse of :func:`named_optimizer_state` (what ``Optimizer.load_state_dict`` takes)."""
    if _indexed(state):
        return state
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def _indexed(state: dict) -> bool:
    params = [p for g in state.get("param_groups", []) for p in g["params"]]
    return not params or isinstance(params[0], int)
