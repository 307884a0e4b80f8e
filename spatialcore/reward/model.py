"""SpatialScore: a Qwen2.5-VL backbone without the language-model head plus a Gaussian head.

    hidden = backbone(prompt, image).last_hidden_state                 [B, T, H]
    (mu, log_var) = reward_head(hidden, last prompt token, W [2, H], b)   (spatialcore.kernels)
    log_var = None without a variance head (plain Bradley-Terry: sigma = 0)

The backbone is ``Qwen2_5_VLModel`` (no ``lm_head``): vocabulary logits are never computed.
A model folder written by :meth:`SpatialScore.save_pretrained` holds ``spatialscore.json``,
``head.safetensors``, the processor, and either the full backbone (``backbone/``) or a LoRA
adapter (``adapter/``) on top of the base checkpoint named in the json. Whether the model has a variance head
is the model's to say: its constructor is told (no default), its folder records it, :func:`read_meta` is the
one reader of that record, and ``forward`` returns ``log_var = None`` without one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..kernels import reward_head
from ..logs import info

ATTENTION = ("sdpa", "flash_attention_2", "eager")


@dataclass
class LoraSpec:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])


def resolve_attention(requested: str) -> str:
    """The attention implementation to load: flash_attention_2 only when the package exists."""
    if requested not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {requested!r}")
    if requested == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
            info("flash_attention_2 requested but flash-attn/CUDA is unavailable: using sdpa", who="reward")
            return "sdpa"
    return requested


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token, for left or right padding ([B] int64)."""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, -1).amax(1)


def _patch_embed_as_matmul(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL's patch embedding without ``Conv3d``: the convolution's stride is its kernel and every
    input row is exactly one kernel's worth of pixels (channels x frames x patch x patch, the order of
    the weight's last four axes), so the convolution is one matmul with the flattened weight."""
    w = self.proj.weight
    return nn.functional.linear(hidden_states.reshape(-1, w[0].numel()).to(w.dtype), w.reshape(w.shape[0], -1),
                                self.proj.bias)


def fast_patch_embed(backbone: nn.Module) -> None:
    """Swap the vision tower's patch-embedding forward for one matmul (same weights, state dict and
    hooks; at one CPU thread 50 -> 9 ms of the wide tiny model's training step, 439 -> 386 ms in all).
    Weights stay ``Conv3d``-shaped: folders load and save as before."""
    import types

    for mod in backbone.modules():
        proj = getattr(mod, "proj", None)
        if type(mod).__name__.endswith("VisionPatchEmbed") and isinstance(proj, nn.Conv3d) \
                and tuple(proj.stride) == tuple(proj.kernel_size) and proj.padding == (0, 0, 0) and proj.groups == 1:
            mod.forward = types.MethodType(_patch_embed_as_matmul, mod)


def read_meta(path: str | os.PathLike) -> dict:
    """The ``spatialscore.json`` of a SpatialScore folder (base, attention, lora, variance_head);
    FileNotFoundError when ``path`` is not one."""
    meta_file = Path(path) / "spatialscore.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a SpatialScore folder (no spatialscore.json)")
    return json.loads(meta_file.read_text())


class SpatialScore(nn.Module):
    """Reward model: ``forward(**processor_batch) -> (mu [B], log_var [B] or None)`` in float32."""

    def __init__(self, backbone: nn.Module, processor, *, base: str, attention: str, lora: LoraSpec | None,
                 variance_head: bool):
        super().__init__()
        self.backbone = backbone
        self.processor = processor
        fast_patch_embed(backbone)
        hidden = backbone.config.text_config.hidden_size
        self.head = nn.Linear(hidden, 2)
        nn.init.normal_(self.head.weight, std=hidden**-0.5)
        nn.init.zeros_(self.head.bias)
        self.base, self.attention, self.lora, self.variance_head = base, attention, lora, variance_head

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(cls, path: str | os.PathLike, *, attention: str = "sdpa", dtype: torch.dtype | None = None,
                      lora: LoraSpec | None = None, variance_head: bool, device: str | torch.device = "cpu"
                      ) -> SpatialScore:
        """A fresh head on a Qwen2.5-VL checkpoint (local folder or hub id)."""
        from transformers import AutoProcessor, Qwen2_5_VLModel

        from ..shapes import random_qwen_backbone, random_shape

        attention = resolve_attention(attention)
        shape = random_shape(path)
        if shape:
            info(f"{path}: the {shape} backbone with random weights (its scores mean nothing)", who="reward")
            backbone, processor = random_qwen_backbone(shape, device=device, dtype=dtype, attention=attention)
        else:
            backbone = Qwen2_5_VLModel.from_pretrained(path, attn_implementation=attention, dtype=dtype)
            processor = AutoProcessor.from_pretrained(path)
        if lora is not None:
            backbone = _wrap_lora(backbone, lora)
        info(f"backbone {path}: {sum(p.numel() for p in backbone.parameters()):,} parameters, "
             f"attention={backbone.config._attn_implementation}, lora={'r' + str(lora.rank) if lora else 'off'}",
             who="reward")
        return cls(backbone, processor, base=str(path), attention=attention, lora=lora, variance_head=variance_head)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, attention: str | None = None,
                        dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> SpatialScore:
        """Load a folder written by :meth:`save_pretrained`."""
        from safetensors.torch import load_file
        from transformers import AutoProcessor, Qwen2_5_VLModel

        from ..shapes import random_shape, seeded

        if random_shape(path):  # a random SpatialScore: random backbone and head, plain Bradley-Terry
            with seeded(1):
                return cls.from_backbone(path, attention=attention or "sdpa", dtype=dtype, variance_head=False,
                                         device=device)
        path = Path(path)
        meta = read_meta(path)
        attention = resolve_attention(attention or meta["attention"])
        lora = LoraSpec(**meta["lora"]) if meta["lora"] else None
        if lora is None:
            backbone = Qwen2_5_VLModel.from_pretrained(path / "backbone", attn_implementation=attention, dtype=dtype)
        else:
            from peft import PeftModel

            if random_shape(meta["base"]):  # the same random base as at training (a fixed seed)
                from ..shapes import random_qwen_backbone

                base = random_qwen_backbone(random_shape(meta["base"]), device="cpu", dtype=dtype, attention=attention)[0]
            else:
                base = Qwen2_5_VLModel.from_pretrained(meta["base"], attn_implementation=attention, dtype=dtype)
            backbone = PeftModel.from_pretrained(base, path / "adapter")
        processor = AutoProcessor.from_pretrained(path / "processor")
        model = cls(backbone, processor, base=meta["base"], attention=attention, lora=lora,
                    variance_head=meta["variance_head"])
        model.head.load_state_dict(load_file(path / "head.safetensors"))
        return model

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write head + (adapter | full backbone) + processor as safetensors, atomically."""
        from safetensors.torch import save_file

        from ..atomic import atomic_dir

        with atomic_dir(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                      tmp / "head.safetensors")
            if self.lora is None:
                self.backbone.save_pretrained(tmp / "backbone", safe_serialization=True)
            else:
                self.backbone.save_pretrained(tmp / "adapter", safe_serialization=True)
            self.processor.save_pretrained(tmp / "processor")
            meta = {"base": self.base, "attention": self.attention, "lora": asdict(self.lora) if self.lora else None,
                    "variance_head": self.variance_head, "format": 1}
            (tmp / "spatialscore.json").write_text(json.dumps(meta, indent=2))

    # ------------------------------------------------------------------ forward
    def _hidden(self, input_ids, attention_mask, pixel_values, image_grid_thw) -> torch.Tensor:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                             image_grid_thw=image_grid_thw, use_cache=False, return_dict=True).last_hidden_state

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                 image_grid_thw: torch.Tensor) -> torch.Tensor:
        """The head's input: the backbone's final hidden state at each row's last prompt token, ``[B, H]``."""
        idx = last_token_index(attention_mask)
        hidden = self._hidden(input_ids, attention_mask, pixel_values, image_grid_thw)
        return hidden[torch.arange(idx.shape[0], device=idx.device), idx]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                image_grid_thw: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self._hidden(input_ids, attention_mask, pixel_values, image_grid_thw)
        mu, log_var = reward_head(hidden, last_token_index(attention_mask), self.head.weight, self.head.bias,
                                  backend=backend)
        # the head keeps both rows (one checkpoint format); without a variance head the second is not an output
        return mu, log_var if self.variance_head else None

    def quantize(self, mode: str) -> SpatialScore:
        """Inference quantisation of the backbone's linear layers with torchao, in place:
        ``"int8"`` (weight-only, CPU and GPU) or ``"float8"`` (dynamic activations + weights,
        CUDA sm_89+). The head stays in full precision."""
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )

        if mode == "int8":
            config = Int8WeightOnlyConfig()
        elif mode == "float8":
            if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
                raise RuntimeError("float8 needs a CUDA GPU with compute capability 8.9+ (Ada/Hopper)")
            config = Float8DynamicActivationFloat8WeightConfig()
        else:
            raise ValueError(f"quantize mode must be 'int8' or 'float8', got {mode!r}")
        backbone = getattr(self.backbone, "language_model", None) or self.backbone
        quantize_(backbone, config)
        info(f"quantised the language model's linear layers: {mode}", who="reward")
        return self

    def accelerate(self, *, liger: bool = False, compile: bool = False) -> SpatialScore:
        """Optional speed-ups, logged when applied. ``liger``: liger-kernel's RMSNorm, SwiGLU and
        RoPE Triton kernels patched into the backbone (CUDA only; note that liger also swaps the
        classes in transformers' Qwen2.5-VL module, so models built later in this process get
        them too). ``compile``: ``torch.compile`` of each language-model decoder layer (regional:
        one compiled graph reused by every layer, dynamic sequence length)."""
        backbone = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        if liger:
            if self.device.type != "cuda":
                raise RuntimeError("liger-kernel's Triton kernels need the model on a CUDA GPU")
            from liger_kernel.transformers import apply_liger_kernel_to_qwen2_5_vl

            # no fused linear cross-entropy: a reward model has no LM head to fuse
            apply_liger_kernel_to_qwen2_5_vl(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                             fused_linear_cross_entropy=False, model=backbone)
            info("liger-kernel: RMSNorm, SwiGLU and RoPE patched into the backbone", who="reward")
        if compile:
            layers = backbone.language_model.layers
            for layer in layers:
                layer.compile(dynamic=None)
            info(f"torch.compile: {len(layers)} decoder layers (regional)", who="reward")
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, prompts: list[str] | str, images, *, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """Score (prompt, image) pairs: returns ``(mu, sigma)`` float32 ``[N]`` on CPU.

        ``images``: PIL images, file paths, or a ``[N, 3, H, W]`` tensor in [0, 1] on any device
        (preprocessed where it lives). Batches are built from prompts of similar token length.
        """
        from ..data.pairs import load_image
        from .preprocess import chat_text

        if isinstance(prompts, str):
            prompts = [prompts]
        tensor_input = torch.is_tensor(images)
        n = images.shape[0] if tensor_input else len(images)
        if len(prompts) == 1 and n > 1:
            prompts = prompts * n
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} images")
        self.eval()
        texts = [chat_text(self.processor, p) for p in prompts]
        lengths = [len(self.processor.tokenizer(t).input_ids) for t in texts]
        order = sorted(range(n), key=lambda i: lengths[i])
        mu = torch.empty(n)
        sigma = torch.empty(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if tensor_input:
                batch = self._batch_from_tensors([texts[i] for i in idx], images[idx])
            else:
                ims = [load_image(images[i]) if isinstance(images[i], (str, os.PathLike)) else images[i].convert("RGB")
                       for i in idx]
                batch = self.processor(text=[texts[i] for i in idx], images=ims, return_tensors="pt", padding=True)
                batch.pop("mm_token_type_ids", None)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            m, lv = self(**batch)
            mu[idx] = m.float().cpu()
            sigma[idx] = torch.exp(0.5 * lv.float()).cpu() if lv is not None else 0.0
        return mu, sigma

    def _batch_from_tensors(self, texts: list[str], images: torch.Tensor) -> dict:
        from .preprocess import encode_judgements

        return encode_judgements(self.processor, texts, images)


def _wrap_lora(backbone: nn.Module, lora: LoraSpec) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    # Only the language model's projections: the vision tower stays frozen.
    pattern = r".*language_model.*\.(" + "|".join(lora.targets) + r")$"
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=pattern)
    return get_peft_model(backbone, config)
