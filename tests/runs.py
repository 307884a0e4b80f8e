"""Helpers the trainer tests share: launching runs as a user would (CLI, torchrun, several "nodes"),
killing one with SIGKILL at a random step, and reading back what it wrote."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

# Metrics that measure time, not the optimisation: left out when two runs are compared.
TIME_KEYS = {"time", "t_sample", "t_score", "t_train", "samples_per_s", "pairs_per_s", "elapsed_s", "gpu_mem_gib",
             "mem_sample_gib", "mem_score_gib", "mem_train_gib"}
GUARD = Path(__file__).with_name("dist_guard.py")


def cli_args(overrides: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) or v is None else v}" for k, v in overrides.items()]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def steady(recs: list[dict]) -> list[dict]:
    """Records without their timing fields."""
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in recs]


def step_records(recs: list[dict], key: str) -> list[int]:
    """The steps of the records holding ``key`` (e.g. every training step's loss), in file order."""
    return [r["step"] for r in recs if key in r]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def torchrun(args: list[str], *, nproc: int = 2, nnodes: int = 1, guard_log: Path | None = None,
             timeout: int = 600) -> None:
    """Run ``spatialcore ARGS`` under torchrun: ``nproc`` processes on one node, or ``nnodes`` "nodes"
    of one process each on localhost joined by c10d rendezvous (what a multi-node launch does). With
    ``guard_log`` every torch.distributed collective goes through tests/dist_guard.py."""
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert exe, "torchrun is installed with torch"
    program = [str(GUARD)] if guard_log else ["-m", "spatialcore.cli"]
    extra = {"SPATIALCORE_GUARD_LOG": str(guard_log)} if guard_log else {}
    port = free_port()
    if nnodes == 1:
        cmds = [[exe, "--nproc_per_node", str(nproc), "--master_port", str(port), *program, *args]]
    else:
        cmds = [[exe, "--nnodes", str(nnodes), "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "spatialcore-test", *program, *args]
                for _ in range(nnodes)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(**extra))
             for c in cmds]
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]


def kill_at_random_step(cmd: list[str], run: Path, key: str, lo: int, hi: int, *, timeout: int = 600
                        ) -> tuple[int, float]:
    """Start ``cmd`` (a training command writing into ``run``), SIGKILL it once its metrics hold a
    random step in [lo, hi] (wherever it is then: mid-step, mid-evaluation or mid-checkpoint), and
    return (that step, the kill time). The seed is printed so that a failure can be replayed with
    SPATIALCORE_KILL_SEED."""
    seed = int(os.environ.get("SPATIALCORE_KILL_SEED", time.time_ns() % 2**31))
    target = random.Random(seed).randint(lo, hi)
    print(f"killing at step {target} (SPATIALCORE_KILL_SEED={seed})")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
    metrics = Path(run) / "metrics.jsonl"
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, f"the run ended before step {target}: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "timed out waiting for the run"
        if metrics.is_file():
            done = [json.loads(x) for x in metrics.read_text().splitlines() if x.endswith("}")]
            if any(r.get("step", 0) >= target and key in r for r in done):
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return target, time.time()


def latest_step(run: Path) -> int:
    """The step of the newest complete checkpoint of ``run`` (0 if none)."""
    from spatialcore.checkpoint import resume_checkpoint

    path = resume_checkpoint(run)
    return int(json.loads((path / "meta.json").read_text())["step"]) if path else 0


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
                        ) -> tuple[float, float]:
    """(|a - b| / |a - base|, |a - base|) over the keys of ``base``: how differently two runs moved the
    weights from the same start."""
    keys = sorted(base)
    da = torch.cat([(a[k].double() - base[k].double()).flatten() for k in keys])
    db = torch.cat([(b[k].double() - base[k].double()).flatten() for k in keys])
    return float((da - db).norm() / da.norm()), float(da.norm())
