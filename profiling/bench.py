"""``spatialcore bench <suite>``: end-to-end benchmarks with a same-run baseline, as JSON + Markdown.

Suites (``--shape full`` on a GPU: FLUX.1-dev / Qwen2.5-VL-7B shapes with random weights built on
the device; ``--shape tiny``: the tiny models, any device, seconds):

* ``score``  SpatialScore throughput, images/s at batch B: the stock path (stock processor on PIL
  images + ``Qwen2_5_VLForConditionalGeneration`` computing vocabulary logits) vs ours (no LM
  head, tensor preprocessing where the images live, SDPA, bf16 on GPU), then ours + float8.
* ``sample`` Flux sampling, seconds per image: eager vs ``torch.compile`` (regional, full) vs
  compile + float8 for the ODE sampler; eager vs regional compile for the RL sampler (LoRA, SDE
  window with log-probs). Compile time is reported separately from the steady state.
* ``grpo``   one full Spatial-RL step per rank at the reference setup: sample -> decode -> score ->
  advantages -> LoRA forward/backward on the kept samples -> optimizer; time split, peak memory,
  samples/s and MFU of the training forward/backward (FLOPs counted by torch's FlopCounterMode on
  the same step, peak = the device's dense bf16 tensor-core rate).
* ``kernels`` the kernel microbenchmarks (pytest-benchmark, CUDA events over CUDA graphs).
* ``logprob`` how far the training recomputation of a stored SDE log-prob is from the sampler's own
  number (the first PPO ratio is exp of that difference): the RL sampler at the reference setup
  (bf16 on GPU), recomputed in micro-batches of 1, 3 and G rows; max |delta log p| and max |ratio - 1|.

Every timed region ends with a device synchronize outside the per-iteration work; medians and
p10/p90 over ``reps`` repetitions after warm-up.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..gpu import default_dtype, sdpa_for_training
from ..logs import info as log_line
from ..paths import git_commit

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.4, "GH200": 989.4}


def peak_tflops(name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if all(part in name for part in key.split()):
            return PEAK_BF16_TFLOPS[key]
    if "H100" in name:  # an H100 whose form factor the name does not say: assume SXM
        return PEAK_BF16_TFLOPS["H100 SXM"]
    return None


@dataclass
class Row:
    group: str
    name: str
    median_s: float | None
    p10_s: float | None = None
    p90_s: float | None = None
    unit: str = "s"
    per: int = 1  # items per timed call (images, samples)
    baseline: bool = False
    status: str = "ok"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float | None:
        return self.per / self.median_s if self.median_s else None


def time_call(fn: Callable[[], object], *, reps: int, warmup: int, device: torch.device) -> tuple[float, float, float]:
    """(median, p10, p90) seconds of ``fn`` (synchronised at the end of each call)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    qs = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) >= 2 else [samples[0]] * 9
    return statistics.median(samples), qs[0], qs[-1]


def environment(device: torch.device) -> dict:
    import triton

    from ..gpu import gpu_facts

    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "threads": torch.get_num_threads(), "commit": git_commit()}
    facts = gpu_facts()
    if facts:
        env["gpu"] = [f.__dict__ for f in facts]
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["driver"] = None
    return env


# ----------------------------------------------------------------------------- score


def _prompt(tokenizer, n_tokens: int) -> str:
    """A synthetic spatial prompt of about ``n_tokens`` tokens under ``tokenizer``."""
    import random

    from ..data.scene import SceneSpec, random_scene, write_prompt

    rng = random.Random(0)
    spec = SceneSpec(min_objects=4, max_objects=6, min_relations=5, max_relations=9)
    words: list[str] = []
    while len(tokenizer(" ".join(words)).input_ids) < n_tokens:
        words += write_prompt(random_scene(spec, rng), rng).split()
    while len(tokenizer(" ".join(words)).input_ids) > n_tokens:
        words.pop()
    return " ".join(words)


def bench_score(tiny_dir: Path, device: torch.device, *, shape: str, batch: int, image_size: int,
                prompt_tokens: int, reps: int, warmup: int, fp8: bool = True) -> tuple[list[Row], dict]:
    from PIL import Image

    from ..reward.model import SpatialScore
    from ..reward.preprocess import chat_text
    from .shapes import build_qwen, qwen_processor

    dtype = default_dtype(device)
    processor = qwen_processor(tiny_dir, shape)
    stock = build_qwen(processor, shape, device, dtype, tiny_dir)
    prompt = _prompt(processor.tokenizer, prompt_tokens)
    g = torch.Generator().manual_seed(0)
    images_t = torch.rand(batch, 3, image_size, image_size, generator=g)
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).astype("uint8")) for im in images_t]
    images_dev = images_t.to(device)
    text = chat_text(processor, prompt)
    info = {"shape": shape, "batch": batch, "image": image_size, "prompt_tokens": len(processor.tokenizer(prompt).input_ids),
            "dtype": str(dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in stock.parameters())}

    @torch.no_grad()
    def stock_call():
        inputs = processor(text=[text] * batch, images=pil, return_tensors="pt", padding=True)
        inputs.pop("mm_token_type_ids", None)
        out = stock(**{k: v.to(device) for k, v in inputs.items()})
        return out.logits

    with torch.no_grad():
        inputs = processor(text=[text] * batch, images=pil, return_tensors="pt", padding=True)
        info["sequence_tokens"] = int(inputs["input_ids"].shape[1])
        info["logits_shape"] = list(stock_call().shape)
    rows = [Row("score", "stock (processor + ForConditionalGeneration, logits)",
                *time_call(stock_call, reps=reps, warmup=warmup, device=device), unit="s/batch", per=batch,
                baseline=True)]
    ours = SpatialScore(stock.model, processor, base="random", attention=stock.config._attn_implementation, lora=None,
                        variance_head=False).to(device)
    ours.head.to(device)

    def ours_call():
        return ours.score([prompt] * batch, images_dev, batch_size=batch)

    rows.append(Row("score", "spatialcore (no LM head, tensor preprocessing)",
                    *time_call(ours_call, reps=reps, warmup=warmup, device=device), unit="s/batch", per=batch))
    if fp8:
        try:
            ours.quantize("float8")
        except RuntimeError as err:
            rows.append(Row("score", "spatialcore + float8", None, unit="s/batch", per=batch, status=f"skipped: {err}"))
        else:
            rows.append(Row("score", "spatialcore + float8",
                            *time_call(ours_call, reps=reps, warmup=warmup, device=device), unit="s/batch", per=batch))
    return rows, info


# ----------------------------------------------------------------------------- sample


def bench_sample(tiny_dir: Path, device: torch.device, *, shape: str, sizes: list[int], steps: int, rl_steps: int,
                 rl_window: int, rl_size: int, variants: list[str], reps: int, warmup: int, batch: int = 1,
                 lora_rank: int = 32, emit: Callable[[list[Row], dict], None] | None = None
                 ) -> tuple[list[Row], dict]:
    """ODE sampling at ``sizes`` for the plain variants; the RL sampler (LoRA, SDE window with
    log-probs) at ``rl_size`` for the ``rl-*`` variants. Each variant gets a freshly built
    transformer (compilation and float8 change a module in place)."""
    from ..rl.policy import Policy
    from ..rl.sampler import FluxSampler, SamplerConfig, compile_transformer
    from .shapes import build_flux_pipeline, fresh_transformer, random_text

    dtype = default_dtype(device)
    pipe = build_flux_pipeline(tiny_dir, shape, device, dtype)
    info = {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "parameters": sum(p.numel() for p in pipe.transformer.parameters())}
    prompts = ["the red circle is to the left of the blue square"] * batch
    rows: list[Row] = []
    plan = [(size, v) for size in sizes for v in variants if not v.startswith("rl")]
    plan += [(rl_size, v) for v in variants if v.startswith("rl")]
    for size, variant in plan:
        rl = variant.startswith("rl")
        pipe.transformer = fresh_transformer(pipe.transformer, tiny_dir, shape, device, dtype)
        if rl:
            Policy(pipe.transformer, lora_rank=lora_rank)
            cfg = SamplerConfig(steps=rl_steps, image_size=size, window_size=rl_window)
            group = f"RL sampler {size}² {rl_steps} steps (SDE window {rl_window}, log-probs, LoRA r{lora_rank})"
        else:
            cfg = SamplerConfig(steps=steps, image_size=size)
            group = f"sample {size}² {steps} ODE steps"
        sampler = FluxSampler(pipe, cfg)
        random_text(sampler, prompts[:1], shape)
        if variant not in ("eager", "rl-eager"):
            try:
                if "fp8" in variant:
                    _float8(pipe.transformer)
                compile_transformer(pipe.transformer, "full" if ("full" in variant or "graphs" in variant) else "regional",
                                    cuda_graphs="graphs" in variant)
            except RuntimeError as err:
                rows.append(Row(group, variant, None, per=batch, status=f"skipped: {err}"))
                if emit is not None:
                    emit(rows, info)
                continue

        def call(sampler=sampler, rl=rl):
            return sampler.sample(prompts, list(range(batch)), sde=rl)

        t0 = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        med = time_call(call, reps=reps, warmup=warmup, device=device)
        rows.append(Row(group, variant, *med, unit="s/batch", per=batch, baseline=variant in ("eager", "rl-eager"),
                        extra={"first_call_s": first}))
        torch._dynamo.reset()
        if emit is not None:  # long suites: results so far survive a time limit
            emit(rows, info)
    return rows, info


def _float8(module) -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise RuntimeError("float8 needs a CUDA GPU with compute capability >= 8.9")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


# ----------------------------------------------------------------------------- grpo


def bench_grpo(tiny_dir: Path, device: torch.device, *, shape: str, steps: int, window: int, size: int,
               group_size: int, local_samples: int, top_k: int, train_timesteps: int, micro_batch: int,
               lora_rank: int, reps: int, checkpointing: bool = True) -> tuple[list[Row], dict]:
    """One Spatial-RL step as one rank of the reference setup sees it (its share of the samples;
    the other ranks' rewards are stood in by random numbers so the group statistics are real)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..kernels import ADVANTAGE_PRESETS, group_advantages
    from ..phases import phase
    from ..reward.model import SpatialScore
    from ..rl.policy import Policy
    from ..rl.sampler import FluxSampler, SamplerConfig
    from ..trainers.grpo import policy_gradient
    from .shapes import build_flux_pipeline, build_qwen, qwen_processor, random_text

    dtype = default_dtype(device)
    attention = sdpa_for_training(device)
    t_build = time.perf_counter()
    pipe = build_flux_pipeline(tiny_dir, "flux-dev" if shape == "full" else "tiny", device, dtype)
    policy = Policy(pipe.transformer, lora_rank=lora_rank)
    if checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    sampler = FluxSampler(pipe, SamplerConfig(steps=steps, image_size=size, window_size=window))
    processor = qwen_processor(tiny_dir, "7b" if shape == "full" else "tiny")
    qwen = build_qwen(processor, "7b" if shape == "full" else "tiny", device, dtype, tiny_dir)
    reward = SpatialScore(qwen.model, processor, base="random", attention="sdpa", lora=None, variance_head=False)
    reward.head.to(device)
    prompt = "the red circle is to the left of the blue square, the green star is above the yellow ring"
    random_text(sampler, [prompt], "flux-dev" if shape == "full" else "tiny")
    opt = torch.optim.AdamW(list(policy.params.values()), lr=1e-4)
    preset = {k: v for k, v in ADVANTAGE_PRESETS["spatial_rl"].items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    steps_trained = list(range(train_timesteps))
    info = {"shape": shape, "steps": steps, "sde_window": window, "image": size, "group_size": group_size,
            "samples_per_rank": local_samples, "top_k": top_k, "train_timesteps": train_timesteps,
            "micro_batch": micro_batch, "lora_rank": lora_rank, "gradient_checkpointing": checkpointing,
            "policy_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
            "trainable": policy.n_trainable, "reward_parameters": sum(p.numel() for p in qwen.parameters()),
            "sdpa_backends": attention}
    splits: dict[str, list[float]] = {k: [] for k in ("sample", "score", "advantages", "train", "step")}
    # one line per stage on stderr: a run stopped by a time limit still says how far it got
    log_line(f"models built in {time.perf_counter() - t_build:.1f} s", who="bench grpo")
    cuda = device.type == "cuda"
    gib = 2**30
    if cuda:
        info["resident_gib"] = torch.cuda.memory_allocated(device) / gib  # weights, LoRA, buffers after the build
        torch.cuda.reset_peak_memory_stats(device)
    phase_peak: dict[str, float] = {}  # the highest allocation inside each phase (GiB), over all steps

    def mark(t: list[float]) -> None:
        sync()
        t.append(time.perf_counter())
        if cuda:
            name = ("sample", "score", "advantages", "train")[len(t) - 2]
            phase_peak[name] = max(phase_peak.get(name, 0.0), torch.cuda.max_memory_allocated(device) / gib)
            torch.cuda.reset_peak_memory_stats(device)

    for rep in range(reps + 1):  # the first step warms up (allocator, kernels) and is not counted
        t = [time.perf_counter()]
        with phase("sample"):
            traj = sampler.sample([prompt] * local_samples, [rep * 1000 + i for i in range(local_samples)])
        mark(t)
        with torch.no_grad(), phase("score"):
            r_local, _ = reward.score([prompt] * local_samples, traj.images, batch_size=local_samples)
        mark(t)
        others = torch.randn(group_size - local_samples, generator=g)
        with phase("advantages"):
            res = group_advantages(torch.cat([r_local, others]).view(1, group_size), top_k=top_k, **preset)
        keep = res.keep[0, :local_samples].to(device)
        if not keep.any():  # make sure the step trains something
            keep[0] = True
        adv = res.advantages[0, :local_samples].to(device)
        n_kept = max(1, int(res.keep.sum()))
        mark(t)
        opt.zero_grad(set_to_none=True)
        args = (sampler, policy, traj.latents, traj.log_probs, traj.prompt_embeds, traj.pooled, adv, keep,
                steps_trained, traj.sigmas)
        kw = {"n_kept_global": n_kept, "clip_range": 1e-4, "kl_beta": 0.0, "on_policy": True, "micro_batch": micro_batch}
        policy_gradient(*args, **kw)
        with phase("optimizer"):
            opt.step()
        mark(t)
        log_line(f"step {rep} ({'warm-up' if rep == 0 else 'timed'}): " + ", ".join(
            f"{k} {b - a:.2f} s" for k, a, b in zip(("sample", "score", "advantages", "train"), t, t[1:], strict=False)),
            who="bench grpo")
        if rep == 0:
            info["kept_on_rank"] = int(keep.sum())
            continue
        for k, a, b in zip(("sample", "score", "advantages", "train"), t, t[1:], strict=False):
            splits[k].append(b - a)
        splits["step"].append(t[-1] - t[0])
    opt.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        policy_gradient(*args, **kw)
    flops = counter.get_total_flops()
    opt.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in splits.items()}
    info["train_flops"] = flops
    # the FLOP-counting re-run of the training step is not part of the step: its peak is reported apart
    info["flop_count_peak_gib"] = torch.cuda.max_memory_allocated(device) / gib if cuda else None
    info["peak_memory_gib"] = max(phase_peak.values()) if cuda else None
    info.update({f"peak_{k}_gib": v for k, v in phase_peak.items()})
    peak = peak_tflops(torch.cuda.get_device_name(device)) if cuda else None
    info["peak_tflops_bf16"] = peak
    info["train_tflops"] = flops / med["train"] / 1e12
    info["mfu"] = info["train_tflops"] / peak if peak else None
    rows = [Row("grpo step", k, med[k], min(splits[k]), max(splits[k]), unit="s",
                per=local_samples if k == "step" else 1, extra={"share_of_step": med[k] / med["step"]})
            for k in splits]
    return rows, info


# ----------------------------------------------------------------------------- kernels


def bench_logprob(tiny_dir: Path, device: torch.device, *, shape: str, size: int, steps: int, window: int,
                  group_size: int, micro_batches: list[int], reps: int) -> tuple[list[Row], dict]:
    """Stored sampling log-probs vs their recomputation at several micro-batch sizes (see module doc)."""
    from ..rl.sampler import FluxSampler, SamplerConfig
    from .shapes import build_flux_pipeline, random_text

    dtype = default_dtype(device)
    pipe = build_flux_pipeline(tiny_dir, "flux-dev" if shape == "full" else "tiny", device, dtype)
    sampler = FluxSampler(pipe, SamplerConfig(steps=steps, image_size=size, window_size=window))
    prompt = "the red circle is to the left of the blue square, the green star is above the yellow ring"
    random_text(sampler, [prompt], "flux-dev" if shape == "full" else "tiny")
    with torch.no_grad():
        traj = sampler.sample([prompt] * group_size, list(range(group_size)), decode=False)
    rows = []
    for mb in micro_batches:
        diffs = []

        def recompute(mb=mb, diffs=diffs):
            diffs.clear()
            with torch.no_grad():
                for j in range(traj.log_probs.shape[1]):
                    for s in range(0, group_size, mb):
                        rows_ = slice(s, s + mb)
                        lp, _, _ = sampler.step_logprob(traj.latents[rows_], j, traj.sigmas, traj.prompt_embeds[rows_],
                                                        traj.pooled[rows_])
                        diffs.append((lp - traj.log_probs[rows_, j]).abs().max())

        med, p10, p90 = time_call(recompute, reps=reps, warmup=1, device=device)
        worst = float(torch.stack(diffs).max())
        ratio = float(torch.expm1(torch.tensor(worst)))
        rows.append(Row("recompute stored log-probs", f"micro-batch {mb}", med, p10, p90, per=group_size,
                        baseline=mb == micro_batches[-1],
                        status=f"ok: max abs(d log p) {worst:.3g}, max abs(ratio - 1) {ratio:.3g}",
                        extra={"max_abs_logp_diff": worst, "max_abs_ratio_minus_1": ratio, "bitwise": worst == 0.0}))
    info = {"shape": shape, "dtype": str(dtype)[6:], "image": size, "steps": steps, "sde_window": window,
            "group_size": group_size}
    return rows, info


def bench_kernels(out: Path) -> tuple[list[Row], dict]:
    import os
    import sys

    root = Path(__file__).resolve().parent
    js = out / "kernels_raw.json"
    env = {**os.environ, "SPATIALCORE_BENCH_JSON": str(js)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "benchmarks"),
                           "--benchmark-only", "-k", "not synth and not collate"], capture_output=True, text=True,
                          env=env, cwd=root.parent if (root.parent / "pyproject.toml").is_file() else None)
    if not js.is_file():
        raise RuntimeError(f"kernel benchmarks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    data = json.loads(js.read_text())
    rows = []
    groups: dict[str, list[dict]] = {}
    for r in data["results"]:
        groups.setdefault(r["group"], []).append(r)
    for group, rs in groups.items():
        for r in rs:
            rows.append(Row(group, r["name"], r["median_us"] * 1e-6, r["p10_us"] * 1e-6, r["p90_us"] * 1e-6,
                            unit="s/call", baseline=r["baseline"], extra={"graphed": r.get("graphed")}))
    return rows, {"raw": str(js)}


# ----------------------------------------------------------------------------- output


def to_json(suite: str, rows: list[Row], info: dict, env: dict) -> dict:
    groups: dict[str, Row] = {}
    for r in rows:
        if r.baseline:
            groups.setdefault(r.group, r)
    out = []
    for r in rows:
        base = groups.get(r.group)
        ratio = base.median_s / r.median_s if base and base.median_s and r.median_s and r is not base else None
        out.append({"group": r.group, "name": r.name, "median_s": r.median_s, "p10_s": r.p10_s, "p90_s": r.p90_s,
                    "unit": r.unit, "per": r.per, "throughput_per_s": r.throughput, "baseline": r.baseline,
                    "speedup_vs_baseline": ratio, "status": r.status, **r.extra})
    return {"suite": suite, "environment": env, "info": info, "rows": out}


def to_markdown(data: dict) -> str:
    env = data["environment"]
    lines = [f"### `spatialcore bench {data['suite']}` on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, driver {env.get('driver')}, "
             f"commit {env.get('commit')}", "",
             "| group | variant | median | p10-p90 | per second | vs baseline | status |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in data["rows"]:
        med = f"{r['median_s']:.4g} {r['unit']}" if r["median_s"] is not None else "-"
        spread = f"{r['p10_s']:.4g}-{r['p90_s']:.4g}" if r.get("p10_s") is not None else "-"
        thr = f"{r['throughput_per_s']:.3g}" if r["throughput_per_s"] else "-"
        ratio = "baseline" if r["baseline"] else (f"{r['speedup_vs_baseline']:.2f}x" if r["speedup_vs_baseline"] else "-")
        lines.append(f"| {r['group']} | {r['name']} | {med} | {spread} | {thr} | {ratio} | {r['status']} |")
    info = {k: v for k, v in data["info"].items() if not isinstance(v, (dict, list)) or k == "logits_shape"}
    lines += ["", "Setup: " + ", ".join(f"{k}={v}" for k, v in info.items()), ""]
    return "\n".join(lines)
