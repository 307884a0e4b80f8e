"""Where the kernel tests run their Triton kernels: compiled on a CUDA device when there is one, else
on the CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET only then).

``on_device(op)`` wraps a kernel op so that a ``backend="triton"`` call moves its tensor arguments
to that device and its results back (``.to`` is differentiable: gradients reach the CPU leaves the
test made), so one test body checks the interpreter here and the compiled kernel on a GPU."""

import dataclasses
import functools

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _move(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    if isinstance(value, dict):  # keyword arguments: prev_sample=..., noise=...
        return {k: _move(v, device) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _move(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value)})
    return value


def on_device(op):
    if DEVICE.type == "cpu":
        return op

    @functools.wraps(op)
    def call(*args, **kwargs):
        if kwargs.get("backend") != "triton":
            return op(*args, **kwargs)
        generator = kwargs.pop("generator", None)  # a CPU generator only seeds the in-kernel Philox stream
        args, kwargs = _move(args, DEVICE), _move(kwargs, DEVICE)
        if generator is not None:
            kwargs["generator"] = generator
        return _move(op(*args, **kwargs), torch.device("cpu"))

    return call
