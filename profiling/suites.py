"""The benchmark and profile suites of ``spatialcore bench|profile <suite>``: their default
parameters at the tiny (CPU, seconds) and full (FLUX.1-dev / Qwen2.5-VL-7B shapes, one large
GPU) sizes, and one runner that builds what a suite needs."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import ConfigError

SUITE_DEFAULTS = {
    # (tiny, full)
    "score": ({"batch": 4, "image_size": 64, "prompt_tokens": 40},
              {"batch": 24, "image_size": 512, "prompt_tokens": 80}),
    "sample": ({"sizes": [64], "steps": 4, "rl_steps": 4, "rl_window": 2, "rl_size": 64,
                "variants": ["eager", "stock", "rl-eager"],
                "lora_rank": 4},
               {"sizes": [512, 1024], "steps": 28, "rl_steps": 16, "rl_window": 8, "rl_size": 512,
                "variants": ["eager", "stock", "compile-regional", "compile-full", "compile-fp8", "compile-fp8-graphs",
                             "rl-eager", "rl-compile"],
                "lora_rank": 32}),
    "logprob": ({"size": 32, "steps": 4, "window": 2, "group_size": 6, "micro_batches": [1, 3, 6]},
                {"size": 512, "steps": 16, "window": 8, "group_size": 6, "micro_batches": [1, 3, 6]}),
    # the trainer's own step from a config: keys the suite does not know are the config's (key=value overrides)
    "grpo": ({"config": "configs/grpo/flux_dev_spatial.yaml", "ranks": 4,
              "config_set": ["model=random:tiny-flux", "reward.spatialscore.model=random:tiny-qwen", "dtype=float32",
                             "n_stream_prompts=16", "sampler.compile=none", "sampler.steps=4", "sampler.window_size=2",
                             "sampler.image_size=32", "group_size=8", "top_k=2",
                             "train_timesteps=2", "sample_batch=0", "reward.batch=4"]},
             {"config": "configs/grpo/flux_dev_spatial.yaml", "ranks": 8,
              # the reference config as 8 ranks run it; compilation left out of the default (its minutes would not
              # fit a GPU window's step): sampler.compile=regional times the compiled sampler after its warm-up step
              "config_set": ["model=random:flux.1-dev", "reward.spatialscore.model=random:qwen2.5-vl-7b",
                             "n_stream_prompts=64", "sampler.compile=none"]}),
}


def suite_params(suite: str, shape: str, overrides: list[str]) -> dict:
    """The suite's defaults at ``shape`` with ``key=value`` overrides (JSON values for numbers, lists,
    booleans); an unknown key is a :class:`ConfigError` naming it."""
    params = dict(SUITE_DEFAULTS.get(suite, ({}, {}))[shape == "full"])
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in params and "config_set" in params:
            params["config_set"] = [*params["config_set"], item]  # a key of the suite's trainer config
            continue
        if key not in params:
            raise ConfigError(key, f"unknown {suite} parameter (known: {', '.join(params)})")
        params[key] = json.loads(value) if value[:1] in "[{0123456789-" or value in ("true", "false") else value
    return params


def suite_runner(suite: str, shape: str, device: torch.device, *, tiny: str | None, overrides: list[str], reps: int,
                 warmup: int, out: Path, emit=None) -> Callable[[], tuple]:
    """A callable running ``suite`` -> (rows, info). Tiny checkpoints come from ``tiny`` or are built in a
    temporary folder; ``emit(rows, info)`` receives partial results of the long sample suite."""
    from . import bench

    if shape == "full" and device.type != "cuda":
        raise ConfigError("shape", "full-size shapes need a CUDA GPU (use --shape tiny on the CPU)")
    params = suite_params(suite, shape, overrides)
    if suite == "grpo":  # the trainer's own models (random:SHAPE or the config's)
        return lambda: bench.bench_grpo(device, reps=reps, **params)
    tiny_dir = Path(tiny) if tiny else None
    if tiny_dir is None:
        from ..tiny import TinyConfig, build_tiny

        tiny_dir = Path(tempfile.mkdtemp(prefix="spatialcore-bench-")) / "tiny"
        build_tiny(TinyConfig(), tiny_dir)
    size = {"score": "7b", "sample": "flux-dev"}.get(suite, "full") if shape == "full" else "tiny"
    if suite == "logprob":
        return lambda: bench.bench_logprob(tiny_dir, device, shape=size, reps=reps, **params)
    if suite == "score":
        return lambda: bench.bench_score(tiny_dir, device, shape=size, reps=reps, warmup=warmup, **params)
    if suite == "sample":
        return lambda: bench.bench_sample(tiny_dir, device, shape=size, reps=reps, warmup=warmup, emit=emit, **params)
    return lambda: bench.bench_kernels(out)
