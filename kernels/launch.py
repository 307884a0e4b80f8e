"""What every kernel file shares: the optional Triton import, the backend switch and the launch
settings (block size and warps from the size of the reduced dimension).

Triton is optional (a Linux dependency): without it ``triton`` and ``tl`` are ``None``, the kernel
files skip their ``@triton.jit`` definitions and ``backend="auto"`` picks the references.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = tl = None

HAS_TRITON = triton is not None


# What ``backend="auto"`` runs on CUDA tensors, per kernel family: the faster of its Triton kernel and
# ``torch.compile`` of its reference on the shapes measured in the same run (docs/PERF.md: H200, 2026-12-04, lease 1,
# medians of CUDA-graph replays). A family is moved to Triton only when a new measurement shows the kernel ahead.
AUTO_ON_CUDA = {
    "advantages": "triton",   # G=24: 2.28 us vs 9.04 compiled at 48 groups, 41.7 vs 52.1 at 65,536 groups
    "sde_step": "compiled",   # 24 x 4096 x 64 bf16: 29.2 us compiled vs 64.0 Triton
    "grpo_loss": "compiled",  # B=48, T=8, fwd+bwd: 4.57 us compiled vs 9.03 Triton
    "reward_head": "triton",  # head + pair loss fwd+bwd, 48 x 1024 x 3584 bf16: 158 us Triton vs 165 compiled
}


def resolve_backend(backend: str, t: torch.Tensor, *, family: str, extra: tuple[str, ...] = ()) -> str:
    """The backend that runs: ``"auto"`` -> the reference (``"torch"``) for tensors off CUDA, and on CUDA the faster
    measured path of ``family`` (``AUTO_ON_CUDA``; the reference when Triton is missing). ``"compiled"`` is
    ``torch.compile`` of the reference. An explicit ``"triton"`` without Triton, or an unknown name, fails. ``extra``
    names further backends a family offers (the native ``"cuda"`` op of the group advantages)."""
    known = ("auto", "triton", "torch", "compiled", *extra)
    if backend not in known:
        names = ", ".join(repr(k) for k in known[:-1]) + f" or {known[-1]!r}"
        raise ValueError(f"backend must be {names}, got {backend!r}")
    if backend == "auto":
        return AUTO_ON_CUDA[family] if t.is_cuda and HAS_TRITON else "torch"
    if backend == "triton" and not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package")
    return backend


@functools.cache
def compiled(fn):
    """``torch.compile`` of a reference function, built once per function (shapes are traced as they come)."""
    return torch.compile(fn)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def launch_settings(n: int, *, max_block: int | None = None, min_block: int = 1, wide: int = 1024) -> tuple[int, int]:
    """(BLOCK, num_warps) for a program reducing ``n`` elements: the next power of two >= ``n``, clamped to
    ``[min_block, max_block]`` (larger ``n`` loops over blocks); 4 warps from ``wide`` elements up, 1 below."""
    block = max(min_block, next_power_of_2(n))
    if max_block is not None:
        block = min(max_block, block)
    return block, 4 if block >= wide else 1
