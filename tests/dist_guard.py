"""`spatialcore ARGS` with every torch.distributed collective checked (run by torchrun in the tests).

Each tensor handed to a collective must be one that the process group of a *CUDA* run serves
(``spatialcore.dist.backend_for("cuda")``: NCCL alone serves CUDA tensors only, so host-side rewards
and metrics need a device-mapped gloo backend) and one that this run's own backend serves. The
number of checked calls per collective is written to ``$SPATIALCORE_GUARD_LOG.<rank>.json`` so a
test can see that the guard was not bypassed.
"""

import json
import os
import sys
from collections import Counter

import torch
import torch.distributed as dist

from spatialcore.dist import backend_for, served_devices

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "reduce",
               "gather", "scatter", "all_to_all_single", "reduce_scatter",
               "all_gather_single", "reduce_scatter_single")  # the last two: FSDP2's (torch >= 2.14)
calls: Counter = Counter()


def _tensors(args, kwargs):
    for value in [*args, *kwargs.values()]:
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if torch.is_tensor(v))


def _guarded(name, fn):
    def call(*args, **kwargs):
        gpu_run = served_devices(backend_for("cuda"))
        this_run = served_devices(dist.get_backend())
        for t in _tensors(args, kwargs):
            kind = t.device.type
            if kind not in gpu_run or kind not in this_run:
                raise RuntimeError(f"dist.{name} got a {kind} tensor {tuple(t.shape)}: the backend of a CUDA run "
                                   f"({backend_for('cuda')}) serves {sorted(gpu_run)}, this run's "
                                   f"({dist.get_backend()}) {sorted(this_run)}")
        calls[name] += 1
        return fn(*args, **kwargs)

    return call


for _name in COLLECTIVES:
    if hasattr(dist, _name):
        setattr(dist, _name, _guarded(_name, getattr(dist, _name)))


def _write_log() -> None:
    path = os.environ.get("SPATIALCORE_GUARD_LOG")
    if path:
        with open(f"{path}.{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump(dict(calls), f)


if __name__ == "__main__":
    from spatialcore.cli import main

    try:
        code = main(sys.argv[1:])
    finally:
        _write_log()
    sys.exit(code)
