"""The Spatial-RL policy: LoRA (peft) on the Flux transformer's attention and feed-forward
projections, or full fine-tuning; the reference policy is the same transformer with the adapter
disabled (LoRA) or a frozen copy (full fine-tuning, only built when a KL term needs it)."""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..config import param
from ..paths import LORA_FILE

# Attention and feed-forward projections of every dual- and single-stream block (not the
# embedders, the AdaLN modulations or the final projection).
LORA_TARGETS = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                r"to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)")
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' single-file weights
EXPORT_FILE = "spatialcore_export.json"  # what a policy folder holds and in which dtype


@dataclass
class PolicyConfig:
    """What of the generator's transformer trains, and how the result is written."""

    lora_rank: int = param(8, min=0, help="0: full fine-tuning")
    lora_alpha: float = param(8.0, min=0.0)
    ema_decay: float = param(0.0, min=0.0, max=1.0, help="0: no EMA")
    gradient_checkpointing: bool = False
    export_merged: bool = False  # LoRA: also write policy/transformer with the adapter folded in
    export_dtype: Literal["base", "float32", "float16", "bfloat16"] = param(
        "base", help="dtype of exported weights; base: the dtype the base model's transformer is stored in (what "
                     "FluxPipeline.from_pretrained(base, transformer=...) needs)")


class Policy:
    def __init__(self, transformer: torch.nn.Module, *, lora_rank: int, lora_alpha: float | None = None,
                 need_reference: bool = False):
        self.transformer = transformer
        self.lora_rank = lora_rank
        self._ref = None
        if lora_rank:
            from peft import LoraConfig

            transformer.requires_grad_(False)
            transformer.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank,
                                               target_modules=LORA_TARGETS, init_lora_weights=True))
        else:
            transformer.requires_grad_(True)
            if need_reference:
                self._ref = copy.deepcopy(transformer).requires_grad_(False).eval()
        self.params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
        if not self.params:
            raise RuntimeError("the policy has no trainable parameters (no LoRA target matched?)")

    def shard(self) -> None:
        """FSDP2 over the process group: one shard group per dual- and single-stream block of the transformer and of
        the reference copy (gradients averaged over ranks); the trainable parameters are the sharded ones from here on
        (an optimizer or EMA must be built after this)."""
        from ..fsdp import shard

        for tr in [self.transformer] + ([self._ref] if self._ref is not None else []):
            shard(tr, [*tr.transformer_blocks, *tr.single_transformer_blocks])
        self.params = {n: p for n, p in self.transformer.named_parameters() if p.requires_grad}

    def compile_reference(self, mode: str) -> None:
        """Compile full fine-tuning's frozen reference copy as the sampler compiles the trained transformer
        (``mode``: the sampler's ``compile``); LoRA's reference is the trained transformer itself."""
        from .sampler import compile_transformer

        if self._ref is not None and mode != "none":
            compile_transformer(self._ref, mode)

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @contextlib.contextmanager
    def reference(self):
        """Run the frozen reference policy inside this context."""
        if self.lora_rank:
            self.transformer.disable_adapters()
            try:
                yield self.transformer
            finally:
                self.transformer.enable_adapters()
        else:
            if self._ref is None:
                raise RuntimeError("full fine-tuning built no reference copy (need_reference=False)")
            yield self._ref

    def swapped(self, weights: dict[str, torch.Tensor] | None):
        """Temporarily load ``weights`` (e.g. the EMA) into the trainable parameters."""
        return swapped_weights(self.params, weights)

    def save(self, path: str | Path, weights: dict[str, torch.Tensor] | None = None, *, merged: bool = False,
             dtype: torch.dtype | None = None, state: dict[str, torch.Tensor] | None = None) -> None:
        """LoRA: diffusers' LoRA file with its adapter config as metadata (so that
        ``FluxPipeline.load_lora_weights`` applies the trained alpha / rank scale), plus, with
        ``merged``, ``transformer/`` with the adapter folded into the weights; full fine-tuning:
        ``transformer/``. Either transformer loads with ``FluxTransformer2DModel.from_pretrained``. Tensors are
        written in ``dtype`` (default: as trained). ``state``: the transformer's whole state dict to write (a sharded
        policy's, gathered) instead of the live module's."""
        from safetensors.torch import save_file

        def cast(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        stored = str(dtype or next(iter(self.params.values())).dtype).removeprefix("torch.")
        (path / EXPORT_FILE).write_text(json.dumps({"kind": "lora" if self.lora_rank else "full", "dtype": stored}) + "\n")
        with self.swapped(weights):
            if not self.lora_rank:
                (path / "transformer").mkdir(exist_ok=True)
                self.transformer.save_config(path / "transformer")
                save_file(cast(state if state is not None else self.transformer.state_dict()),
                          path / "transformer" / WEIGHTS_FILE)
                return
            from diffusers import FluxPipeline
            from peft.utils import get_peft_model_state_dict

            config = self.transformer.peft_config["default"].to_dict()
            FluxPipeline.save_lora_weights(path, transformer_lora_layers=cast(get_peft_model_state_dict(
                self.transformer, state_dict=state)), safe_serialization=True, transformer_lora_adapter_metadata=config)
            (path / "lora.json").write_text(json.dumps({"rank": self.lora_rank, "alpha": config["lora_alpha"]}) + "\n")
            if merged:
                (path / "transformer").mkdir(exist_ok=True)
                self.transformer.save_config(path / "transformer")
                folded = merged_state_dict(self.transformer) if state is None else merged_from_state(
                    state, config["lora_alpha"] / config["r"])
                save_file(cast(folded), path / "transformer" / WEIGHTS_FILE)


def save_pipeline(pipe, policy: Policy, weights: dict[str, torch.Tensor] | None, out: Path, dtype: torch.dtype) -> None:
    """Write ``pipe`` with ``weights`` (or the policy's own) in its transformer, a LoRA folded in, as a complete
    pipeline folder ``out`` (``FluxPipeline.from_pretrained`` loads it) in ``dtype``, atomically."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from ..atomic import atomic_dir

    with policy.swapped(weights):
        tr = pipe.transformer
        state = merged_state_dict(tr) if policy.lora_rank else {k: v.detach().cpu() for k, v in tr.state_dict().items()}
        plain = FluxTransformer2DModel.from_config(tr.config)
        plain.load_state_dict(state)
    p = pipe
    pipe = FluxPipeline(scheduler=p.scheduler, vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer,
                        text_encoder_2=p.text_encoder_2, tokenizer_2=p.tokenizer_2, transformer=plain.to(tr.dtype))
    if any(t.dtype != dtype for t in pipe.transformer.parameters()) or p.vae.dtype != dtype:
        pipe = copy.deepcopy(pipe).to(dtype)  # the live pipeline keeps training in its own dtype
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp)


def stock_loading(base: str, policy: Path, dtype: torch.dtype, *, lora: bool) -> str:
    """How stock diffusers loads an exported policy onto its base: one dtype for every component (diffusers loads
    its own models in float32 and transformers its text encoders in their stored dtype unless told one)."""
    d = f"dtype=torch.{str(dtype).removeprefix('torch.')}"
    if str(base).startswith("random:"):
        return f"none (the base, {base}, exists only as random weights built by spatialcore)"
    if lora:
        return f"pipe = FluxPipeline.from_pretrained('{base}', {d}); pipe.load_lora_weights('{policy}')"
    return (f"FluxPipeline.from_pretrained('{base}', transformer=FluxTransformer2DModel.from_pretrained("
            f"'{policy / 'transformer'}', {d}), {d})")


def resolve_export_dtype(choice: str, model: str, train_dtype: str) -> torch.dtype:
    """The dtype an export is written in: ``choice``, or for ``base`` the dtype the base model's transformer is
    stored in (the training dtype when that cannot be read here: a hub id, a sharded checkpoint)."""
    if choice != "base":
        return getattr(torch, choice)
    return stored_dtype(model) or getattr(torch, train_dtype)


def stored_dtype(model: str | Path) -> torch.dtype | None:
    """The dtype a Flux pipeline folder stores its transformer in (None when it cannot be read here: a hub id, a
    sharded checkpoint)."""
    from safetensors import safe_open

    file = Path(model) / "transformer" / WEIGHTS_FILE
    if not file.is_file():
        return None
    with safe_open(str(file), "pt") as f:
        names = list(f.keys())
        return f.get_tensor(names[0]).dtype if names else None


@contextlib.contextmanager
def swapped_weights(params: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None):
    """Temporarily load ``weights`` (same names; None: nothing) into ``params``, restoring them on exit."""
    if not weights:
        yield
        return
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


def merged_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain transformer's weights with every LoRA adapter folded in: W + (alpha / r) B A under the
    base layer's own name (peft's ``get_delta_weight``); the adapter matrices are left out."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            deltas[f"{name}.base_layer.weight"] = module.get_delta_weight("default")
    out = {}
    for key, value in transformer.state_dict().items():
        if ".lora_" in key:
            continue
        merged = value + deltas[key].to(value.dtype) if key in deltas else value
        out[key.replace(".base_layer.", ".")] = merged.detach().contiguous().cpu()
    return out


def merged_from_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """:func:`merged_state_dict` from a whole state dict (a sharded policy's, gathered): each adapted linear's
    ``base_layer.weight`` plus ``scaling`` x ``lora_B @ lora_A`` (computed in float32), under the plain name."""
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        prefix = key[: -len("base_layer.weight")] if key.endswith(".base_layer.weight") else None
        if prefix is not None and f"{prefix}lora_A.default.weight" in state:
            a, b = state[f"{prefix}lora_A.default.weight"].float(), state[f"{prefix}lora_B.default.weight"].float()
            value = (value.float() + scaling * (b @ a)).to(value.dtype)
        out[key.replace(".base_layer.", ".")] = value.detach().contiguous().cpu()
    return out


class EMA:
    """Exponential moving average of the trainable weights (float32 copies)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.weights = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        for n, p in params.items():
            self.weights[n].lerp_(p.detach().float(), 1 - self.decay)


def load_policy_weights(pipe, path: str | Path) -> str:
    """Load a trained policy folder (LoRA file or full transformer) into a pipeline; returns its kind."""
    path = Path(path)
    if (path / LORA_FILE).is_file():
        pipe.load_lora_weights(path)
        return "lora"
    if (path / "transformer").is_dir():
        from diffusers import FluxTransformer2DModel

        pipe.transformer = FluxTransformer2DModel.from_pretrained(path / "transformer", dtype=pipe.transformer.dtype
                                                                  ).to(pipe.transformer.device)
        return "full"
    raise FileNotFoundError(f"{path} holds neither {LORA_FILE} nor transformer/")
