"""`spatialcore plan`: the live-bytes count by value on a module computed by hand, the resident items of a tiny run
by value against the parameter counts, the bounded evaluation, the verdict's exit status, and the command on every
trainer config in configs/ (the tiny ones; the full-size GRPO and SFT plans take a minute each and are recorded in
docs/PERF.md)."""

import glob
from pathlib import Path

import pytest
import torch

from spatialcore.cli import main
from spatialcore.config import load_config


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPATIALCORE_CACHE", str(tmp_path_factory.getbasetemp() / "spatialcore-cache"))


def test_live_bytes_by_value():
    """Linear(1024, 4096) frozen -> GELU -> Linear(4096, 1024) trained, batch 256, float32, on meta: after the
    forward the graph keeps the GELU output for the second layer's weight gradient (4 MiB) and the input x (1 MiB);
    the first layer's output (4 MiB) is freed as soon as GELU has read it (nothing needs it for a gradient)."""
    from spatialcore.plan import LiveBytes

    with torch.device("meta"):
        m = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024))
    m[0].requires_grad_(False)
    meter = LiveBytes()
    meter.track(*m.parameters())
    params = (1024 * 4096 + 4096 + 4096 * 1024 + 1024) * 4
    assert meter.live == params
    mib = 2**20
    with meter:
        x = torch.randn(256, 1024, device="meta")
        y = m(x).sum()
        assert meter.live == params + 1 * mib + 4 * mib + 4  # x, GELU's output, the scalar
        y.backward()
        grads = (4096 * 1024 + 1024) * 4
        assert meter.live == params + grads + 1 * mib + 4  # the saved GELU output is freed with the graph
        assert meter.peak >= params + grads + 1 * mib + 4 * mib


def _grpo_tiny(**overrides):
    from spatialcore.trainers.grpo import GRPOTrainConfig

    return load_config(GRPOTrainConfig, "configs/grpo/tiny_cpu_grid.yaml",
                       ["reward.spatialscore.model=random:tiny-qwen", *(f"{k}={v}" for k, v in overrides.items())])


def test_resident_items_by_value():
    """The tiny GRPO run (full fine-tuning in float32, AdamW, EMA): the transformer, its gradients, Adam's two moments
    and the EMA are 4, 4, 8 and 4 bytes per parameter; the text cache is prompts x (tokens x width + pooled)."""
    from diffusers import FluxTransformer2DModel

    from spatialcore.plan import GIB, plan_grpo

    cfg = _grpo_tiny(**{"policy.ema_decay": 0.9, "sampler.text_cache": 10})
    plan = plan_grpo(cfg, world=1, gpu_gib=24)
    n = sum(p.numel() for p in FluxTransformer2DModel.from_pretrained("assets/tiny_generator/transformer").parameters())
    r = plan.resident
    assert r["policy transformer"] == 4 * n and r["gradients (during the update)"] == 4 * n
    assert r["optimizer state (adamw)"] == 8 * n and r["EMA (float32)"] == 4 * n
    assert r["text-embedding cache (10 prompts)"] == 10 * (32 * 64 + 64) * 4  # T5 32 tokens x 64, CLIP 64, float32
    assert all(peak >= sum(r.values()) - r["gradients (during the update)"] for peak in plan.phases.values())
    assert plan.to_dict()["peak_gib"] == max(plan.phases.values()) / GIB


def test_fsdp2_divides_the_policy_state_and_adds_the_gathered_blocks():
    """parallel=fsdp2 on 2 ranks, full fine-tuning with the KL reference copy and the EMA, float32: the transformer,
    reference copy, Adam's moments, gradients and EMA (4, 4, 8, 4, 4 bytes per parameter) halve; every phase holds
    that much less plus two gathered blocks, the update also half the gradients less plus one block's whole
    gradient; nothing else changes."""
    from diffusers import FluxTransformer2DModel

    from spatialcore.plan import plan_grpo

    extra = {"policy.ema_decay": 0.9, "kl_beta": 0.01}
    ddp = plan_grpo(_grpo_tiny(**extra), world=2, gpu_gib=24)
    fsdp = plan_grpo(_grpo_tiny(**extra, parallel="fsdp2"), world=2, gpu_gib=24)
    tr = FluxTransformer2DModel.from_pretrained("assets/tiny_generator/transformer")
    n = sum(p.numel() for p in tr.parameters())
    block = max(4 * sum(p.numel() for p in b.parameters()) for b in [*tr.transformer_blocks,
                                                                      *tr.single_transformer_blocks])
    halved = {"policy transformer": 4 * n, "reference copy (KL, full fine-tuning)": 4 * n,
              "optimizer state (adamw)": 8 * n, "gradients (during the update)": 4 * n, "EMA (float32)": 4 * n}
    for k, v in ddp.resident.items():
        assert fsdp.resident[k] == (v // 2 if k in halved else v), k
        assert k not in halved or v == halved[k], k
    saved = (4 + 4 + 8 + 4) * n // 2
    for name, peak in ddp.phases.items():
        want = peak - saved + 2 * block + (block - 4 * n // 2 if name == "train" else 0)
        assert fsdp.phases[name] == want, name


def test_the_evaluation_is_bounded_by_sample_batch():
    from spatialcore.plan import plan_grpo

    whole = plan_grpo(_grpo_tiny(eval_seeds=16), world=1, gpu_gib=24).phases["evaluate"]
    chunked = plan_grpo(_grpo_tiny(eval_seeds=16, sample_batch=4), world=1, gpu_gib=24).phases["evaluate"]
    assert chunked < whole


def test_the_verdict_is_the_exit_status(capsys):
    args = ["plan", "grpo", "--config", "configs/grpo/tiny_cpu_grid.yaml", "reward.spatialscore.model=random:tiny-qwen"]
    assert main([*args, "--gpu-memory", "24"]) == 0
    assert "fits one 24 GiB GPU per rank" in capsys.readouterr().out
    assert main([*args, "--gpu-memory", "0.01"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["plan", "grpo", "model=someone/some-model"]) == 2
    assert "no download" in capsys.readouterr().err


TINY = {"model": {"grpo": "random:tiny-flux", "sft": "random:tiny-flux", "reward": "random:tiny-qwen"}}


@pytest.mark.parametrize("path", sorted(p for p in glob.glob("configs/*/*.yaml") if p.split("/")[1] in
                                        ("grpo", "sft", "reward")))
def test_every_trainer_config_plans(path, capsys):
    """Each trainer config as committed, its models that are not built here (runs/..., /data/...) stood in by the tiny
    random shapes; the reward model's full size is the hub id's (a meta build: no memory)."""
    from spatialcore.config_reference import config_class

    kind = path.split("/")[1]
    cfg = load_config(config_class(kind), path)
    overrides = []
    if cfg.model and not (cfg.model.startswith("random:") or Path(cfg.model).exists() or "/" in cfg.model and
                          not cfg.model.startswith(("runs", "/", "."))):
        overrides.append(f"model={TINY['model'][kind]}")
    if kind == "grpo" and "spatialscore" in cfg.reward.parts() and not Path(cfg.reward.spatialscore.model).exists():
        overrides.append("reward.spatialscore.model=random:tiny-qwen")
    full = cfg.model in ("black-forest-labs/FLUX.1-dev",) and kind in ("grpo", "sft")
    if full:  # a minute per full-size Flux replay: its shape stands in tiny here, its plan is in docs/PERF.md
        overrides += ["model=random:tiny-flux", "sampler.image_size=32" if kind == "grpo" else "image_size=32"]
    code = main(["plan", kind, "--config", path, *overrides, "--gpus", "8" if "flux_dev" in path or "7b" in path
                 else "1", "--json", "-"])
    assert code == 0, capsys.readouterr()
