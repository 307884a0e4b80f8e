"""``spatialcore info``: versions, device, GPUs, attention kernels."""

from __future__ import annotations

import argparse

from .common import add_json, command, emit_json


def add(sub) -> None:
    p = command(sub, "info", help="versions, device, attention kernels available",
                description="Print the environment: versions, device, GPUs (NVML), attention backends.",
                examples=["spatialcore info", "spatialcore info --json -"])
    add_json(p, "the report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..gpu import environment_report

    report = environment_report()
    if emit_json(args.json, report):
        return 0
    width = max(len(k) for k in report)
    for key, value in report.items():
        if key == "attention":
            value = ", ".join(f"{k}{'' if ok else ' (unavailable)'}" for k, ok in value.items())
        elif key == "gpus":
            value = "; ".join(f"{g['name']} {g['memory_total_gib']:.0f} GiB" for g in value) or "none"
        print(f"{key:<{width}}  {value}")
    return 0
