"""What every kernel file shares: the optional Triton import, the backend switch and the launch
settings (block size and warps from the size of the reduced dimension).

Triton is optional (a Linux dependency): without it ``triton`` and ``tl`` are ``None``, the kernel
files skip their ``@triton.jit`` definitions and ``backend="auto"`` picks the references.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = tl = None

HAS_TRITON = triton is not None


def resolve_backend(backend: str, t: torch.Tensor, *, extra: tuple[str, ...] = ()) -> str:
    """``"auto"`` -> ``"triton"`` for CUDA tensors when Triton is installed, else ``"torch"``; an explicit
    ``"triton"`` without Triton, or an unknown name, fails. ``extra`` names further backends a kernel
    family offers (the native ``"cuda"`` op of the group advantages)."""
    known = ("auto", "triton", "torch", *extra)
    if backend not in known:
        names = ", ".join(repr(k) for k in known[:-1]) + f" or {known[-1]!r}"
        raise ValueError(f"backend must be {names}, got {backend!r}")
    if backend == "auto":
        return "triton" if t.is_cuda and HAS_TRITON else "torch"
    if backend == "triton" and not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package")
    return backend


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def launch_settings(n: int, *, max_block: int | None = None, min_block: int = 1, wide: int = 1024) -> tuple[int, int]:
    """(BLOCK, num_warps) for a program reducing ``n`` elements: the next power of two >= ``n``, clamped to
    ``[min_block, max_block]`` (larger ``n`` loops over blocks); 4 warps from ``wide`` elements up, 1 below."""
    block = max(min_block, next_power_of_2(n))
    if max_block is not None:
        block = min(max_block, block)
    return block, 4 if block >= wide else 1
