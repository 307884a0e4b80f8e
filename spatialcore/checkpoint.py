"""Atomic, resumable training checkpoints without arbitrary pickle.

``save_checkpoint(run_dir, step, tensors, state)`` writes ``checkpoints/step_XXXXXXXX/`` via a
temporary folder and a rename, then points ``checkpoints/latest`` at it (temp file +
``os.replace``). ``tensors`` (trainable weights) go to safetensors; ``state`` (optimizer,
scheduler, RNG, data position, step) to a file loaded with ``torch.load(weights_only=True)``;
``meta.json``, written last, records the step and the byte size of every file.

``resume_checkpoint(run_dir)`` picks the newest *complete* checkpoint: one whose ``meta.json``
exists and whose files have the recorded sizes. A torn one (a missing ``latest`` pointer, a
missing ``meta.json``, a truncated file) is skipped with a logged fall-back to the previous
complete checkpoint; when checkpoints exist but none is complete, or a complete-looking one
cannot be read, :class:`CheckpointError` names the file. A run is never silently restarted from
step 0 while its folder holds checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir
from .errors import CheckpointError

WEIGHTS, STATE, META = "weights.safetensors", "state.pt", "meta.json"


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": np_state[2],
                  "has_gauss": np_state[3], "gauss": np_state[4]},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def all_rng_states() -> list[dict]:
    """Every rank's RNG state, gathered (a collective under torchrun); index = rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict,
                    *, keep: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*"):  # temporaries of a write that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:08d}"
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / WEIGHTS)
        torch.save(state, tmp / STATE)
        sizes = {name: (tmp / name).stat().st_size for name in (WEIGHTS, STATE)}
        (tmp / META).write_text(json.dumps({"step": step, "bytes": sizes}))
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    old = sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep] if keep else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return final


def incomplete(path: Path) -> str | None:
    """Why checkpoint folder ``path`` is incomplete (naming the file), or None when it is complete."""
    meta_file = path / META
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        return f"{meta_file} is missing"
    except (OSError, ValueError) as err:
        return f"{meta_file} is unreadable ({err})"
    for name, size in meta.get("bytes", {}).items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} is truncated ({f.stat().st_size} of {size} bytes)"
    return None


def resume_checkpoint(run_dir: str | Path, log=None) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` (None when it has none at all); every
    torn checkpoint passed over is reported through ``log``."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    pointer = root / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    if not found:
        if named:
            raise CheckpointError(f"{pointer} names {named}, which does not exist")
        return None
    skipped = []
    for path in found:
        reason = incomplete(path)
        if reason is None:
            if log is not None:
                for why in skipped:
                    log(f"{why}: falling back to {path.name}")
                if named is None:
                    log(f"{pointer} is missing: resuming from the newest complete checkpoint, {path.name}")
                elif named != path.name and not skipped:
                    log(f"{pointer} names {named}, but {path.name} is complete and newer: resuming from it")
            return path
        skipped.append(reason)
    raise CheckpointError(f"no complete checkpoint in {root}: {skipped[0]}")


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    try:
        tensors = load_file(path / WEIGHTS)
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path / WEIGHTS} cannot be read ({err})") from None
    try:
        state = torch.load(path / STATE, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path / STATE} cannot be read ({err})") from None
    return tensors, state


def find_checkpoint(run_dir: str | Path, *, who: str) -> Path | None:
    """The newest complete checkpoint of a run folder (None for a fresh run), looked up before any model is
    built so that a torn run folder fails fast; passed-over torn checkpoints are logged."""
    from .logs import info

    return resume_checkpoint(run_dir, log=lambda msg: info(msg, who=who))


def restore(path: Path, rank: int, *, who: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of checkpoint ``path``, with the RNG state of ``rank`` restored."""
    from .logs import info

    tensors, state = load_checkpoint(path)
    set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    info(f"resumed from step {state['step']} ({path})", who=who)
    return tensors, state


def write_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor] | None,
                     state: dict | None) -> None:
    """An atomic checkpoint written by rank 0 (``tensors``/``state`` may be None on the other ranks) with every
    rank's RNG state; a collective: all ranks call it."""
    from .dist import barrier, is_main

    states = all_rng_states()
    if is_main():
        save_checkpoint(run_dir, step, tensors, {**state, "rng": states, "step": step})
    barrier()
