"""``spatialcore export CHECKPOINT --out DIR``: a diffusers-loadable generator from any checkpoint of a run.

CHECKPOINT is a run folder (its newest complete checkpoint) or one ``checkpoints/step_N`` folder of it. The
run's ``config.yaml`` says which trainer wrote it:

* ``grpo train``: the policy as ``grpo train`` writes it at the end — diffusers' LoRA file (for
  ``FluxPipeline.load_lora_weights`` on the base model; ``--merged`` adds ``transformer/`` with the adapter
  folded in) or, for full fine-tuning, ``transformer/``;
* ``sft train``: a complete pipeline (``FluxPipeline.from_pretrained``), with the VAE and its latent factors
  when the run trained them, the text encoders when they trained (``text_encoders=trainable``), and
  ``spatialcore_run.json`` (the run's resolved config and step: ``spatialcore eval`` reads its sampling settings).

Weights are written in the run's ``policy.export_dtype`` (by default the dtype the base model is stored in).

The EMA weights are exported when the run kept them (``--no-ema``: the raw weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError, load_config, to_dict


def _locate(path: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) of ``path``."""
    from .checkpoint import resume_checkpoint

    if (path / "meta.json").is_file() and path.parent.name == "checkpoints":
        return path.parent.parent, path
    if not (path / "config.yaml").is_file():
        raise ConfigError("CHECKPOINT", f"{path} is neither a run folder (with config.yaml) nor one of its "
                                        "checkpoints/step_N folders")
    ckpt = resume_checkpoint(path)
    if ckpt is None:
        raise ConfigError("CHECKPOINT", f"{path} holds no complete checkpoint")
    return path, ckpt


def export(path: str | Path, out: str | Path, *, merged: bool = False, ema: bool = True) -> str:
    """Write the generator of checkpoint ``path`` to ``out``; returns what was written."""
    import yaml

    from .checkpoint import load_checkpoint

    run, ckpt = _locate(Path(path))
    raw = yaml.safe_load((run / "config.yaml").read_text()) or {}
    tensors, state = load_checkpoint(ckpt)
    out = Path(out)
    if "group_size" in raw:
        return _export_grpo(run, tensors, out, merged=merged, ema=ema) + f" (step {state['step']})"
    if "vae" in raw and "weighting_scheme" in raw:
        return _export_sft(run, tensors, state, out, ema=ema) + f" (step {state['step']})"
    raise ConfigError("CHECKPOINT", f"{run} is not a grpo or sft run (a reward run writes its model itself)")


def _weights(names, tensors: dict[str, torch.Tensor], prefix: str, ema: bool) -> dict[str, torch.Tensor]:
    return {n: tensors.get(f"ema.{n}", tensors[prefix + n]) if ema else tensors[prefix + n] for n in names}


def _export_grpo(run: Path, tensors: dict, out: Path, *, merged: bool, ema: bool) -> str:
    from .rl.policy import Policy, resolve_export_dtype
    from .rl.sampler import load_pipeline
    from .trainers.grpo import GRPOTrainConfig

    cfg = load_config(GRPOTrainConfig, run / "config.yaml", [])
    pipe = load_pipeline(cfg.model, dtype=torch.float32, device="cpu")
    policy = Policy(pipe.transformer, lora_rank=cfg.policy.lora_rank, lora_alpha=cfg.policy.lora_alpha)
    policy.save(out, _weights(policy.params, tensors, "", ema), merged=merged,
                dtype=resolve_export_dtype(cfg.policy.export_dtype, cfg.model, cfg.dtype))
    return f"{'LoRA' if cfg.policy.lora_rank else 'transformer'} policy -> {out}"


def _export_sft(run: Path, tensors: dict, state: dict, out: Path, *, ema: bool) -> str:
    from .rl.policy import Policy, resolve_export_dtype, save_pipeline
    from .rl.sampler import load_pipeline
    from .trainers.sft import TRANSFORMER_PREFIX, VAE_PREFIX, SFTTrainConfig

    cfg = load_config(SFTTrainConfig, run / "config.yaml", [])
    pipe = load_pipeline(cfg.model, dtype=torch.float32, device="cpu")
    policy = Policy(pipe.transformer, lora_rank=cfg.policy.lora_rank, lora_alpha=cfg.policy.lora_alpha)
    if any(k.startswith(VAE_PREFIX) for k in tensors):
        pipe.vae.load_state_dict({k[len(VAE_PREFIX):]: v for k, v in tensors.items() if k.startswith(VAE_PREFIX)})
        shift, scale = state["vae_factors"]
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    with torch.no_grad():  # text encoders trained with the transformer (text_encoders=trainable)
        for name in ("text_encoder", "text_encoder_2"):
            module = getattr(pipe, name)
            names = [f"{name}.{n}" for n, _ in module.named_parameters()]
            if names[0] in tensors:
                module.load_state_dict({n[len(name) + 1:]: w for n, w in _weights(names, tensors, "", ema).items()},
                                       strict=False)
    weights = _weights(policy.params, tensors, TRANSFORMER_PREFIX, ema)
    save_pipeline(pipe, policy, weights, out, resolve_export_dtype(cfg.policy.export_dtype, cfg.model, cfg.dtype))
    record = {"exported_from": str(run), "config": to_dict(cfg), "seed": cfg.seed, "steps": state["step"], "ema": ema}
    (out / "spatialcore_run.json").write_text(json.dumps(record, indent=2) + "\n")  # eval's sampling settings
    return f"pipeline -> {out}"
