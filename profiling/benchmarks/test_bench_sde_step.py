"""SDE step + log-prob: fused kernel vs eager formula, torch.compile, and the copy-bandwidth floor."""

import pytest
import torch

from spatialcore.gpu import default_dtype
from spatialcore.kernels import sde_step_logprob


def _shape(device):
    return (24, 4096, 64) if device == "cuda" else (4, 256, 16)


@pytest.fixture(scope="module")
def compiled():
    return torch.compile(lambda x, v, n: sde_step_logprob(x, v, 0.7, 0.6, 0.7, n, backend="torch")[:3])


@pytest.mark.parametrize("impl", ["eager_reference", "compiled_reference", "triton", "triton_philox", "copy_floor"])
def test_sde_step(measure, device, impl, compiled):
    dtype = default_dtype(device)
    shape = _shape(device)
    x, v, noise = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    if impl.startswith("triton") and device != "cuda":
        pytest.skip("GPU kernel: timed on CUDA only")
    n = x.numel()
    # Bytes the fused forward moves: read x, v, noise; write the sample (x.dtype) and the fp32 mean.
    nbytes = n * (3 * x.element_size() + x.element_size() + 4)
    fns = {
        "eager_reference": lambda: sde_step_logprob(x, v, 0.7, 0.6, 0.7, noise, backend="torch"),
        "compiled_reference": lambda: compiled(x, v, noise),
        "triton": lambda: sde_step_logprob(x, v, 0.7, 0.6, 0.7, noise, backend="triton"),
        "triton_philox": lambda: sde_step_logprob(x, v, 0.7, 0.6, 0.7, backend="triton"),
    }
    if impl == "copy_floor":
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        fns[impl] = lambda: dst.copy_(src)  # reads + writes nbytes in total: the bandwidth floor
    measure(f"sde_step {tuple(shape)} {str(dtype)[6:]}", impl, fns[impl], baseline=impl == "eager_reference",
            bytes=nbytes)
