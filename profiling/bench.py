"""``spatialcore bench <suite>``: end-to-end benchmarks with a same-run baseline, as JSON + Markdown.

Suites (``--shape full`` on a GPU: FLUX.1-dev / Qwen2.5-VL-7B shapes with random weights built on
the device; ``--shape tiny``: the tiny models, any device, seconds):

* ``score``  SpatialScore throughput, images/s at batch B: the stock path (stock processor on PIL
  images + ``Qwen2_5_VLForConditionalGeneration`` computing vocabulary logits) vs ours (no LM
  head, tensor preprocessing where the images live, SDPA, bf16 on GPU), then ours + float8.
* ``sample`` Flux sampling, seconds per image: the project's eager sampler vs stock diffusers
  (``FluxPipeline.__call__`` on the same weights, embeddings and latents) vs ``torch.compile`` (regional,
  full) vs compile + float8 for the ODE sampler; eager vs regional compile for the RL sampler (LoRA, SDE
  window with log-probs). Compile time (the first call) is reported apart from the steady state, and every
  variant's largest pixel difference to the eager images.
* ``grpo``   the GRPO trainer's own ``train_step`` from a config (default the reference
  ``configs/grpo/flux_dev_spatial.yaml`` on random weights of its shapes) as rank 0 of ``ranks``
  sees it: time split (sample / score / train), per-phase peak memory as the trainer records it,
  samples/s and MFU of training (FLOPs of one micro-step counted by torch's FlopCounterMode and
  scaled, peak = the device's dense bf16 tensor-core rate).
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
    transformer with the same weights (compilation and float8 change a module in place). ``stock`` is diffusers'
    own ``FluxPipeline.__call__`` on the same weights, text embeddings and initial latents. Every row of a group
    reports the largest pixel difference of its images to the group's eager ones (same seeds)."""
    from ..rl.policy import Policy
    from ..rl.sampler import FluxSampler, SamplerConfig, compile_transformer
    from .shapes import build_flux_pipeline, fresh_transformer, random_text

    dtype = default_dtype(device)
    pipe = build_flux_pipeline(tiny_dir, shape, device, dtype)
    info = {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "parameters": sum(p.numel() for p in pipe.transformer.parameters())}
    prompts = ["the red circle is to the left of the blue square"] * batch
    seeds = list(range(batch))
    rows: list[Row] = []
    plan = [(size, v) for size in sizes for v in variants if not v.startswith("rl")]
    plan += [(rl_size, v) for v in variants if v.startswith("rl")]
    eager_images: dict[str, torch.Tensor] = {}
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
        if variant not in ("eager", "rl-eager", "stock"):
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

        if variant == "stock":
            call = _stock_call(pipe, sampler, prompts, seeds)
        else:
            def call(sampler=sampler, rl=rl):
                return sampler.sample(prompts, seeds, sde=rl).images

        t0 = time.perf_counter()
        images = call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        med = time_call(call, reps=reps, warmup=warmup, device=device)
        extra = {"first_call_s": first}
        if variant in ("eager", "rl-eager"):
            eager_images[group] = images.float().cpu()
        elif group in eager_images:
            extra["max_abs_image_diff_vs_eager"] = float((images.float().cpu() - eager_images[group]).abs().max())
        rows.append(Row(group, variant, *med, unit="s/batch", per=batch, baseline=variant in ("eager", "rl-eager"),
                        extra=extra))
        torch._dynamo.reset()
        if emit is not None:  # long suites: results so far survive a time limit
            emit(rows, info)
    return rows, info


def _stock_call(pipe, sampler, prompts: list[str], seeds: list[int]) -> Callable[[], torch.Tensor]:
    """diffusers' ``FluxPipeline.__call__`` with the sampler's text embeddings, initial latents, schedule length,
    guidance and size: the stock path on the same inputs (images ``[B, 3, H, W]`` in [0, 1])."""
    emb, pooled = sampler.encode(prompts)
    latents = sampler.noise(seeds)[0]
    cfg = sampler.cfg

    def call():
        return pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, latents=latents, height=cfg.image_size,
                    width=cfg.image_size, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                    max_sequence_length=emb.shape[1], output_type="pt").images

    return call


def _float8(module) -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise RuntimeError("float8 needs a CUDA GPU with compute capability >= 8.9")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


# ----------------------------------------------------------------------------- grpo


def bench_grpo(device: torch.device, *, config: str | None, ranks: int, config_set: list[str], reps: int,
               flop_count: bool = True) -> tuple[list[Row], dict]:
    """The Spatial-RL trainer's own ``train_step`` (``grpo train``'s code, built from ``config`` with the ``config_set``
    overrides) as rank 0 of ``ranks`` sees it: its share of the samples (sample n lives on rank n % ranks); the
    other ranks' rewards are stood in by random numbers, so the group statistics and the kept count are real and
    the step trains what rank 0 would. The all-reduce of the gradients (one rank here) is not part of the time.

    Training FLOPs: one micro-step (``micro_batch`` kept rows at one trained timestep, forward + backward with the
    recomputation of gradient checkpointing, the KL reference forward where ``kl_beta`` > 0) counted by
    ``FlopCounterMode``, then collected, and scaled by each timed step's kept rows x trained timesteps; MFU =
    those FLOPs / the step's training seconds / the device's dense bf16 peak."""
    import gc
    import shutil
    import tempfile

    from ..config import ConfigError, load_config
    from ..trainers.grpo import GRPOTrainConfig

    if config and not Path(config).is_file() and (Path(__file__).resolve().parents[1] / config).is_file():
        config = str(Path(__file__).resolve().parents[1] / config)  # the checkout's configs/ from anywhere
    if not config or not Path(config).is_file():
        raise ConfigError("config", f"{config}: give the GRPO config to time (config=FILE)")
    run_dir = Path(tempfile.mkdtemp(prefix="spatialcore-bench-grpo-"))
    cfg = load_config(GRPOTrainConfig, config, [*config_set, f"out={run_dir / 'run'}", "run=fresh", "report_to=[]",
                                                "save_grids=false"])
    cfg.check()
    n_total = cfg.prompts_per_iter * cfg.group_size
    if ranks < 1 or n_total % ranks:
        raise ConfigError("ranks", f"prompts_per_iter x group_size = {n_total} samples cannot be split over {ranks} "
                                   "ranks")
    cuda, gib = device.type == "cuda", 2**30

    t_build = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    tr = one_rank_of(ranks)(cfg)
    if tr.device != device:
        raise ConfigError("--device", f"the trainer runs on {tr.device} (torchrun/CUDA decide it), not {device}")
    log_line(f"trainer built in {time.perf_counter() - t_build:.1f} s", who="bench grpo")
    info = {"config": str(config), "overrides": list(config_set), "ranks": ranks, "samples_per_rank": len(tr.mine),
            "objective": cfg.objective, "group_size": cfg.group_size, "prompts_per_iter": cfg.prompts_per_iter,
            "top_k": tr.top_k, "steps": cfg.sampler.steps, "sde_window": list(cfg.sampler.window()),
            "image": cfg.sampler.image_size, "train_timesteps": cfg.train_timesteps, "micro_batch": cfg.micro_batch,
            "kl_beta": cfg.kl_beta, "dtype": cfg.dtype, "lora_rank": cfg.policy.lora_rank,
            "gradient_checkpointing": cfg.policy.gradient_checkpointing, "sampler_compile": cfg.sampler.compile,
            "policy_parameters": sum(p.numel() for p in tr.sampler.pipe.transformer.parameters()),
            "trainable": tr.policy.n_trainable}
    if cuda:
        info["sdpa_backends"] = sdpa_for_training(device)
        info["resident_gib"] = torch.cuda.memory_allocated(device) / gib
    splits: dict[str, list[float]] = {k: [] for k in ("sample", "score", "train", "step")}
    peaks: dict[str, float] = {}
    kept: list[int] = []
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for rep in range(reps + 1):  # the first step warms up (allocator, kernels, compilation) and is not counted
        sync()
        t0 = time.perf_counter()
        rec = tr.train_step()
        sync()
        total = time.perf_counter() - t0
        tr.step += 1
        log_line(f"step {rep} ({'warm-up' if rep == 0 else 'timed'}): sample {rec['t_sample']:.2f} s, score "
                 f"{rec['t_score']:.2f} s, train {rec['t_train']:.2f} s ({tr.kept_local} kept on this rank)",
                 who="bench grpo")
        if rep == 0:
            info["warmup_step_s"] = total
            continue
        for k in ("sample", "score", "train"):
            splits[k].append(rec[f"t_{k}"])
        splits["step"].append(total)
        kept.append(tr.kept_local)
        for k, v in rec.items():
            if k.startswith("mem_"):
                peaks[k] = max(peaks.get(k, 0.0), v)
    info["kept_on_rank"] = kept
    info.update(peaks)
    info["peak_memory_gib"] = max(peaks.values()) if peaks else None
    peak = peak_tflops(torch.cuda.get_device_name(device)) if cuda else None
    info["peak_tflops_bf16"] = peak
    if flop_count and kept:
        per_row_step = _micro_step_flops(tr, cuda, device)
        info["flops_per_row_timestep"] = per_row_step
        T = len(tr.trained_steps)
        flops = [per_row_step * k * T for k in kept]
        info["train_flops"] = statistics.median(flops)
        rates = [f / t for f, t in zip(flops, splits["train"], strict=True)]
        info["train_tflops"] = statistics.median(rates) / 1e12
        info["mfu"] = info["train_tflops"] / peak if peak else None
        info["flop_count_peak_gib"] = torch.cuda.max_memory_allocated(device) / gib if cuda else None
    del tr
    gc.collect()
    shutil.rmtree(run_dir, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in splits.items()}
    return [Row("grpo step (the trainer's train_step)", k, med[k], min(splits[k]), max(splits[k]), unit="s",
                per=info["samples_per_rank"] if k == "step" else 1,
                extra={"share_of_step": med[k] / med["step"]}) for k in splits], info


def one_rank_of(ranks: int):
    """The GRPO trainer as rank 0 of ``ranks`` (:func:`bench_grpo`): its samples, the others' rewards stood in by
    random numbers; it keeps the last trajectory, its kept rows and trained timesteps for the FLOP count."""
    from ..trainers.grpo import GRPOTrainer

    class OneRankOf(GRPOTrainer):
        def plan(self) -> None:
            super().plan()
            self.mine = list(range(0, self.n_total, ranks))
            self.stand_in = torch.Generator().manual_seed(0)

        def _score(self, images, prompts):
            local = self.reward_fn(images, prompts).float().cpu()
            full = torch.randn(self.n_total, generator=self.stand_in)
            full[self.mine] = local
            return full.view(self.cfg.prompts_per_iter, self.cfg.group_size), None, {}

        def _update(self, traj, adv_all, keep_all, steps, n_kept):
            self.kept_local, self.trained_steps, self.last_traj = int(keep_all[self.mine].sum()), list(steps), traj
            return super()._update(traj, adv_all, keep_all, steps, n_kept)

    return OneRankOf


def _micro_step_flops(tr, cuda: bool, device: torch.device) -> float:
    """FLOPs of one kept row at one trained timestep: one micro-step of the objective (``micro_batch`` rows of the
    last trajectory at its first trained timestep) under ``FlopCounterMode``, divided by its rows. Its gradients are
    dropped and its graph collected before anything else runs (the counter's module tracker keeps the recomputed
    blocks' activations alive through reference cycles until a collection)."""
    import gc

    from torch.utils.flop_counter import FlopCounterMode

    traj, n = tr.last_traj, len(tr.mine)
    rows = min(tr.cfg.micro_batch or n, n)
    keep = torch.zeros(n, dtype=torch.bool, device=tr.device)
    keep[:rows] = True
    adv = torch.linspace(-1.0, 1.0, n, device=tr.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with FlopCounterMode(display=False) as counter:
        tr.objective.accumulate(traj, adv, keep, rows, tr.step, 0, tr.trained_steps[:1])
    tr.opt.zero_grad(set_to_none=True)
    tr.last_traj = None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return counter.get_total_flops() / rows


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
