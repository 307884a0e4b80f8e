"""``spatialcore plan``: the GPU memory of a config's run, per rank and per phase, read before launch.

Every model of the config is built on the meta device (shapes and dtypes, no weights, no GPU): the run's own
classes (the Flux pipeline with its policy, LoRA or full, the reference copy a KL term needs, the EMA, the old
policy of NFT; SpatialScore; the optimizer's state after a first step). Then each phase of one iteration is
replayed on those meta tensors with the run's own code (the sampler, the reward model's forward, the policy
gradient, the flow-matching loss) at the config's shapes and this rank's share of the batch, while a dispatch mode
counts the bytes of every live storage: a phase's peak is the most that was alive at once during it.

What the count is, and what it is not: the bytes of the tensors PyTorch allocates (what ``max_memory_allocated``
reports), not the caching allocator's reserve, CUDA context (~0.5 GiB) or library workspaces (cuBLAS, NCCL), which
the verdict leaves as a margin. Attention is counted as FlashAttention allocates it (output and log-sum-exp kept
for the backward, no score matrix), what SDPA runs on Hopper for these shapes; the CPU's math path would count an
L x L matrix per head that a GPU never holds. A phase with many sampler calls (evaluation) replays one call and
adds what the others leave behind (their images). Models: local folders, ``random:SHAPE``, and the hub ids of the
reference configs (``black-forest-labs/FLUX.1-dev``, ``Qwen/Qwen2.5-VL-7B-Instruct``, whose shapes are known
here: no download).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from .config import ConfigError

GIB = 2**30
KNOWN_HUB = {"black-forest-labs/FLUX.1-dev": "random:flux.1-dev", "Qwen/Qwen2.5-VL-7B-Instruct": "random:qwen2.5-vl-7b"}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live storages: those handed to :meth:`track`, and every one an op creates while the mode
    is active (a storage is counted once, whatever views share it, and leaves the count when it is freed)."""

    def __init__(self):
        super().__init__()
        self.seen = WeakIdKeyDictionary()
        self.live = self.peak = 0

    def track(self, *tensors) -> None:
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            if st in self.seen:
                continue
            n = st.nbytes()
            self.seen[st] = n
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(*tree_flatten(out)[0])
        return out


class _FlashLike(torch.autograd.Function):
    """Attention with FlashAttention's memory: the output and a float32 log-sum-exp per query are kept for the
    backward, which allocates the three input gradients; no score matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def flash_attention():
    """``F.scaled_dot_product_attention`` counted as FlashAttention (module docstring)."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _FlashLike.apply(query, key, value)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


@dataclass
class Plan:
    """One rank's memory: what stays resident (``resident``, bytes by item) and each phase's peak (bytes)."""

    what: str
    world: int
    gpu_gib: float
    resident: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> tuple[str, int]:
        name = max(self.phases, key=self.phases.get)
        return name, self.phases[name]

    def verdict(self) -> str:
        name, peak = self.peak
        margin = self.gpu_gib - peak / GIB
        largest = max(self.resident, key=self.resident.get)
        fits = "fits" if margin > 0 else "does NOT fit"
        return (f"{fits} one {self.gpu_gib:g} GiB GPU per rank: peak {peak / GIB:.1f} GiB in {name}, margin "
                f"{margin:+.1f} GiB (before the CUDA context and library workspaces, ~1-2 GiB); the largest resident "
                f"item is {largest} ({self.resident[largest] / GIB:.1f} GiB)")

    def markdown(self) -> str:
        lines = [f"# Memory plan: {self.what}", "", f"One rank of {self.world}; allocated bytes (see "
                 "`spatialcore plan --help`).", "", "| resident | GiB |", "|---|---:|"]
        lines += [f"| {k} | {v / GIB:.2f} |" for k, v in self.resident.items()]
        lines += [f"| **total resident** | **{sum(self.resident.values()) / GIB:.2f}** |", "",
                  "| phase | peak GiB |", "|---|---:|"]
        lines += [f"| {k} | {v / GIB:.2f} |" for k, v in self.phases.items()]
        lines += ["", self.verdict()] + ([""] + [f"- {n}" for n in self.notes] if self.notes else [])
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        name, peak = self.peak
        return {"what": self.what, "world": self.world, "gpu_gib": self.gpu_gib,
                "resident_gib": {k: v / GIB for k, v in self.resident.items()},
                "phase_peak_gib": {k: v / GIB for k, v in self.phases.items()},
                "peak_phase": name, "peak_gib": peak / GIB, "fits": peak / GIB < self.gpu_gib}


def _on_meta(batch: dict) -> dict:
    """A model batch for a meta replay: the floating-point inputs (pixels) on the meta device, the integer ones (token
    ids, masks, image grids: the model reads their values to place image tokens) left on the host."""
    return {k: v.to("meta") if v.is_floating_point() else v for k, v in batch.items()}


def _nbytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared weights counted once)."""
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            total += st.nbytes()
    return total


def reward_forward_bytes(net, batch: dict, *, train: bool, checkpointing: bool) -> int:
    """The transient bytes of SpatialScore's forward (and backward with ``train``) on ``batch``, from its shapes:
    the model reads the values of its token ids and image grids to place image tokens, which a meta replay cannot
    do, so this is counted per layer. Text: B x T tokens of width H (MLP width I); vision: P patches of width Hv
    (MLP Iv). A no-grad forward holds one layer's intermediates at a time (~3 hidden + 2 MLP tensors); training keeps
    every layer's activations for the backward (~8 hidden + 3 MLP tensors per layer, measured on the stock layer
    counts of transformers' Qwen2.5-VL), or only each layer's input with gradient checkpointing plus one layer in
    full during its recompute."""
    cfg = net.backbone.config if hasattr(net.backbone, "config") else net.backbone.base_model.config
    text, vision = cfg.text_config, cfg.vision_config
    size = next(net.parameters()).element_size()
    B, T = batch["input_ids"].shape
    P = int(batch["image_grid_thw"].prod(-1).sum())
    one_text = B * T * (3 * text.hidden_size + 2 * text.intermediate_size) * size
    one_vision = P * (3 * vision.hidden_size + 2 * vision.intermediate_size) * size + batch["pixel_values"].numel() * 4
    embeds = B * T * text.hidden_size * size
    if not train:
        return embeds + max(one_text, one_vision)
    per_text = B * T * (8 * text.hidden_size + 3 * text.intermediate_size) * size
    per_vision = P * (8 * vision.hidden_size + 3 * vision.intermediate_size) * size
    if checkpointing:
        kept = text.num_hidden_layers * B * T * text.hidden_size * size + vision.depth * P * vision.hidden_size * size
        return embeds + kept + max(per_text, per_vision)
    return embeds + text.num_hidden_layers * per_text + vision.depth * per_vision


def plan_model(value: str | None, key: str) -> str:
    """What the plan builds for a config's model: ``random:SHAPE`` (a known hub id becomes its shape) or a local
    folder (read once, then moved to the meta device)."""
    if value is None:
        raise ConfigError(key, "the plan needs the model (a local folder, random:SHAPE or a known hub id)")
    if str(value).startswith("random:") or Path(value).exists():
        return str(value)
    if value in KNOWN_HUB:
        return KNOWN_HUB[value]
    raise ConfigError(key, f"{value}: the plan builds local folders, random:SHAPE and the hub ids "
                           f"{', '.join(KNOWN_HUB)} (no download); give a local copy")


def _meta_pipeline(model: str, dtype: torch.dtype):
    from .rl.sampler import load_pipeline

    pipe = load_pipeline(model, dtype=dtype, device="meta" if model.startswith("random:") else "cpu")
    return pipe.to("meta")


def _real_text_encoders(dtype: torch.dtype) -> dict[str, int]:
    """FLUX.1-dev's T5-XXL encoder and CLIP-L text model, built on the meta device from their configs: what the real
    pipeline keeps on the GPU beside the transformer (a random:flux.1-dev run stands them in)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .shapes import on_device

    with on_device("meta", dtype):
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu"))
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
    return {"text encoders (T5-XXL, CLIP-L)": _nbytes(list(t5.parameters()) + list(clip.parameters()))}


def _adam_state(params: dict[str, torch.Tensor], optim) -> tuple[torch.optim.Optimizer, int]:
    """The optimizer of ``optim`` over ``params`` after a first step (its state exists), and that state's bytes."""
    from .trainers.optim import make_optimizer

    opt = make_optimizer(optim, [{"params": list(params.values()), "lr": optim.lr}])
    for p in params.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in params.values():
        p.grad = None
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.numel() > 1]
    return opt, _nbytes(state)


def plan_grpo(cfg, world: int, gpu_gib: float) -> Plan:
    """One rank of a Spatial-RL run (``grpo train``): sample, score, train (with the KL reference forward), evaluate,
    checkpoint and export."""
    from .reward.model import SpatialScore
    from .rl.policy import EMA, Policy
    from .rl.sampler import FluxSampler
    from .trainers.grpo import policy_gradient

    dtype = getattr(torch, cfg.dtype)
    model = plan_model(cfg.model, "model")
    plan = Plan(f"grpo train {cfg.model} ({cfg.objective})", world, gpu_gib)
    pipe = _meta_pipeline(model, dtype)
    kl = cfg.nft.kl_beta if cfg.objective == "nft" else cfg.kl_beta
    policy = Policy(pipe.transformer, lora_rank=cfg.policy.lora_rank, lora_alpha=cfg.policy.lora_alpha,
                    need_reference=kl > 0)
    if cfg.policy.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    # a denoising step outside the SDE window records nothing and allocates what the others do: the replay keeps
    # the window (its recorded latents and log-probs) and one ODE step, not the whole schedule
    start, end = cfg.sampler.window()
    sampler = FluxSampler(pipe, dataclasses.replace(cfg.sampler, steps=end - start + 1, window_start=0,
                                                    window_size=end - start, compile="none"))
    evaluator = FluxSampler(pipe, dataclasses.replace(cfg.sampler, steps=1, window_start=0, window_size=0,
                                                      noise_level=0.0, compile="none"))
    base = [p for n, p in pipe.transformer.named_parameters() if n not in policy.params]
    plan.resident["policy transformer (frozen part)" if cfg.policy.lora_rank else "policy transformer"] = _nbytes(
        base + ([] if cfg.policy.lora_rank else list(policy.params.values())))
    if cfg.policy.lora_rank:
        plan.resident["LoRA weights"] = _nbytes(list(policy.params.values()))
    if policy._ref is not None:
        plan.resident["reference copy (KL, full fine-tuning)"] = _nbytes(list(policy._ref.parameters()))
    plan.resident["VAE"] = _nbytes(list(pipe.vae.parameters()))
    if model == "random:flux.1-dev":
        plan.resident.update(_real_text_encoders(dtype))
        plan.notes.append("text encoders counted at FLUX.1-dev's size (T5-XXL, CLIP-L), as a real run keeps them")
    else:
        plan.resident["text encoders"] = _nbytes(list(pipe.text_encoder.parameters())
                                                 + list(pipe.text_encoder_2.parameters()))
    opt, opt_bytes = _adam_state(policy.params, cfg.optim)
    plan.resident[f"optimizer state ({cfg.optim.name})"] = opt_bytes
    plan.resident["gradients (during the update)"] = _nbytes(list(policy.params.values()))
    ema = EMA(policy.params, cfg.policy.ema_decay) if cfg.policy.ema_decay > 0 else None
    if ema:
        plan.resident["EMA (float32)"] = _nbytes(list(ema.weights.values()))
    old = {n: p.detach().clone() for n, p in policy.params.items()} if cfg.objective == "nft" else None
    if old:
        plan.resident["old policy (NFT)"] = _nbytes(list(old.values()))
    reward = None
    if "spatialscore" in cfg.reward.parts():
        rmodel = plan_model(cfg.reward.spatialscore.model, "reward.spatialscore.model")
        reward = SpatialScore.from_pretrained(rmodel, dtype=dtype, device="meta" if rmodel.startswith("random:")
                                              else "cpu").to("meta").eval()
        plan.resident["SpatialScore"] = _nbytes(list(reward.parameters()))
    n_eval_prompts = max(1, cfg.n_stream_prompts // 8) if cfg.prompt_stream else max(
        1, len(cfg.eval_prompts) or len(cfg.prompts))
    distinct = (cfg.n_stream_prompts if cfg.prompt_stream else max(1, len(cfg.prompts))) + n_eval_prompts
    cached = min(cfg.sampler.text_cache, distinct)
    per_prompt = (cfg.sampler.max_sequence_length * pipe.transformer.config.joint_attention_dim
                  + pipe.transformer.config.pooled_projection_dim)
    plan.resident[f"text-embedding cache ({cached} prompts)"] = cached * per_prompt * torch.empty(
        0, dtype=dtype).element_size()
    tracked = [t for m in [pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, reward, policy._ref]
               if isinstance(m, torch.nn.Module) for t in list(m.parameters()) + list(m.buffers())]
    tracked += [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    tracked += list(ema.weights.values()) if ema else []
    tracked += list(old.values()) if old else []
    # counted apart: FLUX.1-dev's real encoders (a random model stands them in) and the prompts cached over a run
    extra = sum(v for k, v in plan.resident.items() if k.startswith(("text encoders (T5", "text-embedding")))

    n_total = cfg.prompts_per_iter * cfg.group_size
    mine = n_total // world
    chunk = cfg.sample_batch or mine
    prompt = "the red circle is to the left of the blue square while the green star is above the yellow ring"
    with flash_attention():
        # sample: one sampler call of `chunk` samples; the trajectories of the rank's other calls stay behind
        meter = LiveBytes()
        meter.track(*tracked)
        with meter, torch.no_grad():
            traj = sampler.sample([prompt] * chunk, list(range(chunk)), sde=cfg.objective == "grpo")
            kept_bytes = _nbytes([traj.latents, traj.log_probs, traj.final, traj.images, traj.prompt_embeds,
                                  traj.pooled])
            plan.phases["sample"] = meter.peak + extra + (math.ceil(mine / chunk) - 1) * kept_bytes
        traj_all = kept_bytes * math.ceil(mine / chunk)
        # score: the reward model on the rank's images, in calls of reward.batch (counted from its shapes)
        score = 0
        if reward is not None:
            from .reward.preprocess import chat_text

            n = min(cfg.reward.batch, chunk)
            batch = reward._batch_from_tensors([chat_text(reward.processor, prompt)] * n,
                                               torch.zeros(n, 3, cfg.sampler.image_size, cfg.sampler.image_size))
            score = reward_forward_bytes(reward, batch, train=False, checkpointing=False)
            plan.notes.append("score: the reward model's forward counted from its shapes (see reward_forward_bytes)")
        plan.phases["score"] = sum(plan.resident.values()) - plan.resident["gradients (during the update)"] + \
            traj_all + score
        # train: the kept rows of this rank (Top-k), micro-batches x trained timesteps, the KL reference forward
        top_k = cfg.resolved_top_k()
        kept_global = cfg.prompts_per_iter * (min(2 * top_k, cfg.group_size) if top_k else cfg.group_size)
        kept = max(1, math.ceil(kept_global / world))
        mb = min(cfg.micro_batch or kept, kept, chunk)
        if cfg.objective == "nft":  # its forwards take (kept sample, trained timestep) pairs
            pairs = kept * (cfg.train_timesteps or cfg.sampler.steps)
            mb = min(cfg.micro_batch or pairs, pairs)
        meter.reset_peak()
        with meter:
            keep = torch.zeros(chunk, dtype=torch.bool)
            keep[:mb] = True
            adv = torch.zeros(chunk, device="meta")
            if cfg.objective == "grpo":
                steps = list(range(min(2, cfg.train_timesteps or traj.log_probs.shape[1])))
                policy_gradient(sampler, policy, traj.latents, traj.log_probs, traj.prompt_embeds, traj.pooled, adv,
                                keep, steps, traj.sigmas, n_kept_global=kept_global, clip_range=cfg.clip_range,
                                kl_beta=cfg.kl_beta, on_policy=True, micro_batch=mb, kl_convention=cfg.kl_convention)
            else:
                _nft_replay(sampler, policy, traj, mb, old, cfg.nft.kl_beta)
            opt.step()
            if ema:
                ema.update(policy.params)
            plan.phases["train"] = meter.peak + extra + traj_all - kept_bytes
        for p in policy.params.values():
            p.grad = None
        del traj
        # evaluate: held-out prompts x eval_seeds per rank in sample_batch calls, ODE, decoded, scored
        n_eval = n_eval_prompts * cfg.eval_seeds
        per_rank = math.ceil(n_eval / world)
        echunk = min(cfg.sample_batch or per_rank, per_rank)
        meter.reset_peak()
        with meter, torch.no_grad():
            ev = evaluator.sample([prompt] * echunk, list(range(echunk)), sde=False)
            image_bytes = _nbytes([ev.images])
            plan.phases["evaluate"] = meter.peak + extra + (math.ceil(per_rank / echunk) - 1) * image_bytes
        plan.notes.append(f"evaluation: {n_eval} held-out samples, {per_rank} on this rank in calls of {echunk} "
                          f"(sample_batch)")
        plan.phases["checkpoint / export"] = (sum(plan.resident.values()) - plan.resident["gradients (during the update)"]
                                              + max(t.numel() * t.element_size() for t in policy.params.values()))
    plan.notes.append(f"this rank: {mine} samples per iteration in calls of {chunk}, about {kept} kept "
                      f"(top_k {top_k or 'off'}) in micro-batches of {mb}")
    if cfg.parallel == "fsdp2" and world > 1:
        _shard_policy(plan, pipe.transformer, world)
    return plan


def _shard_policy(plan: Plan, transformer, world: int) -> None:
    """``parallel: fsdp2``: the policy's weights, reference copy, EMA, optimizer state and gradients divided over the
    ranks (the replay counted them whole), plus the blocks FSDP2 gathers while they run: the running one and the
    prefetched next in every phase, and in the update one block's whole gradient before its reduce-scatter."""
    keys = [k for k in plan.resident if k.startswith(("policy transformer", "LoRA weights", "reference copy",
                                                      "optimizer state", "gradients", "EMA"))]
    whole = {k: plan.resident[k] for k in keys}
    grads = "gradients (during the update)"
    saved = sum(v for k, v in whole.items() if k != grads) * (world - 1) // world
    block = max(_nbytes(list(b.parameters())) for b in [*transformer.transformer_blocks,
                                                         *transformer.single_transformer_blocks])
    for k in keys:
        plan.resident[k] = math.ceil(whole[k] / world)
    for name in plan.phases:
        plan.phases[name] += 2 * block - saved
    plan.phases["train"] += block - whole[grads] * (world - 1) // world
    plan.notes.append(f"FSDP2 over {world} ranks: the policy's weights, reference copy, EMA, optimizer state and "
                      f"gradients divided by {world}; two blocks gathered at a time ({2 * block / GIB:.2f} GiB), one "
                      "block's whole gradient in the update; checkpoints and the export gather one tensor at a time "
                      "(the export's whole transformer goes to rank 0's host memory)")


def _nft_replay(sampler, policy, traj, mb: int, old, kl_beta: float) -> None:
    """One micro-batch (``mb`` sample-timestep pairs) of NFT's update: the old policy's and the reference's velocity, the trained one's with its
    backward (the weights are swapped, not copied: the old policy costs its own bytes only)."""
    from .trainers.nft import nft_loss

    def rows(x: torch.Tensor) -> torch.Tensor:  # mb pairs, more than the trajectory's rows when K > 1
        return x[:1].expand(mb, *x.shape[1:]).clone()

    x0, emb, pooled = rows(traj.final), rows(traj.prompt_embeds), rows(traj.pooled)
    t = torch.full((mb,), 0.5, device="meta")
    x_t = x0 * 0.5
    with torch.no_grad():
        with policy.swapped(old):
            v_old = sampler.velocity(x_t, t, emb, pooled)
        v_ref = None
        if kl_beta > 0:
            with policy.reference() as ref:
                v_ref = sampler.velocity(x_t, t, emb, pooled, ref)
    v = sampler.velocity(x_t, t, emb, pooled)
    nft_loss(v, v_old, x_t, x0, t, torch.zeros(mb, device="meta"), beta=1.0, clip_max=5.0, v_ref=v_ref,
             kl_beta=kl_beta).mean().backward()


def plan_reward(cfg, world: int, gpu_gib: float) -> Plan:
    """One rank of SpatialScore training (``reward train``): a training step of micro-batches, an evaluation, the
    export."""
    from .dist import split_batch
    from .reward.model import LoraSpec, SpatialScore
    from .reward.preprocess import chat_text

    dtype = getattr(torch, cfg.dtype)
    model = plan_model(cfg.init_from or cfg.model, "model")
    plan = Plan(f"reward train {cfg.model}", world, gpu_gib)
    m = cfg.spatialscore
    if cfg.init_from:
        net = SpatialScore.from_pretrained(model, dtype=dtype)
    else:
        net = SpatialScore.from_backbone(model, attention="sdpa", dtype=dtype, variance_head=m.variance_head,
                                         lora=LoraSpec(rank=m.lora_rank, alpha=m.lora_alpha) if m.lora_rank else None,
                                         device="meta" if model.startswith("random:") else "cpu")
    net = net.to("meta")
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    sharded = world if cfg.parallel == "fsdp2" and world > 1 else 1
    frozen = [p for n, p in net.named_parameters() if n not in params]
    plan.resident["SpatialScore (frozen part)" if m.lora_rank else "SpatialScore"] = _nbytes(
        frozen + ([] if m.lora_rank else list(params.values()))) // sharded
    if m.lora_rank:
        plan.resident["LoRA weights"] = _nbytes(list(params.values())) // sharded
    opt, opt_bytes = _adam_state(params, cfg.optim)
    plan.resident[f"optimizer state ({cfg.optim.name})"] = opt_bytes // sharded
    plan.resident["gradients"] = _nbytes(list(params.values())) // sharded
    if sharded > 1:
        plan.notes.append(f"FSDP2 over {world} ranks: weights, gradients and optimizer state divided by {world}; a "
                          "layer's full weights are gathered while it runs (counted in the phases)")
    micro, _ = split_batch(cfg.batch_size, cfg.micro_batch, world)
    size = _image_size(cfg)
    texts = [chat_text(net.processor, "the red circle is to the left of the blue square")] * (2 * micro)
    batch = net._batch_from_tensors(texts, torch.zeros(2 * micro, 3, size, size))
    resident = sum(plan.resident.values())
    gathered = max(_nbytes(list(layer.parameters())) for layer in _decoder_layers(net)) if sharded > 1 else 0
    plan.phases["train"] = resident + gathered + reward_forward_bytes(net, batch, train=True,
                                                                      checkpointing=m.gradient_checkpointing)
    plan.phases["evaluate"] = resident - plan.resident["gradients"] + gathered + reward_forward_bytes(
        net, batch, train=False, checkpointing=False)
    plan.phases["checkpoint / export"] = resident - plan.resident["gradients"] + (
        _nbytes(list(params.values())) if sharded > 1 else 0)  # FSDP2 gathers the full trainable weights to save
    plan.notes.append(f"a micro-batch: {micro} pairs = {2 * micro} judgements of {size} px images "
                      f"({batch['input_ids'].shape[1]} tokens each); activations counted from the shapes "
                      "(reward_forward_bytes)")
    return plan


def _decoder_layers(net):
    backbone = net.backbone.get_base_model() if hasattr(net.backbone, "get_base_model") else net.backbone
    return list(backbone.language_model.layers)


def _image_size(cfg) -> int:
    """The pair images' side for the plan: the stream's size, else 448 px (a typical real pair set)."""
    if cfg.data.streaming:
        from .trainers.reward import synth_config

        return synth_config(cfg.data.source, cfg.data.stream).size
    return 448


def plan_sft(cfg, world: int, gpu_gib: float) -> Plan:
    """One rank of flow-matching fine-tuning (``sft train``): a training step, an evaluation, the export."""
    from .dist import split_batch
    from .rl.policy import EMA, Policy
    from .rl.sampler import FluxSampler, SamplerConfig

    dtype = getattr(torch, cfg.dtype)
    model = plan_model(cfg.model, "model")
    plan = Plan(f"sft train {cfg.model}", world, gpu_gib)
    pipe = _meta_pipeline(model, dtype)
    policy = Policy(pipe.transformer, lora_rank=cfg.policy.lora_rank, lora_alpha=cfg.policy.lora_alpha)
    if cfg.policy.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    sampler = FluxSampler(pipe, SamplerConfig(steps=1, image_size=cfg.image_size, guidance=cfg.guidance,
                                              noise_level=0.0, max_sequence_length=cfg.max_sequence_length))
    base = [p for n, p in pipe.transformer.named_parameters() if n not in policy.params]
    plan.resident["transformer (frozen part)" if cfg.policy.lora_rank else "transformer"] = _nbytes(
        base + ([] if cfg.policy.lora_rank else list(policy.params.values())))
    if cfg.policy.lora_rank:
        plan.resident["LoRA weights"] = _nbytes(list(policy.params.values()))
    plan.resident["VAE"] = _nbytes(list(pipe.vae.parameters()))
    if model == "random:flux.1-dev":
        plan.resident.update(_real_text_encoders(dtype))
    else:
        plan.resident["text encoders"] = _nbytes(list(pipe.text_encoder.parameters())
                                                 + list(pipe.text_encoder_2.parameters()))
    opt, opt_bytes = _adam_state(policy.params, cfg.optim)
    plan.resident[f"optimizer state ({cfg.optim.name})"] = opt_bytes
    plan.resident["gradients"] = _nbytes(list(policy.params.values()))
    ema = EMA(policy.params, cfg.policy.ema_decay) if cfg.policy.ema_decay > 0 else None
    if ema:
        plan.resident["EMA (float32)"] = _nbytes(list(ema.weights.values()))
    micro, _ = split_batch(cfg.batch_size, cfg.micro_batch, world)
    tracked = [t for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
               for t in list(m.parameters()) + list(m.buffers())]
    tracked += [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    tracked += list(ema.weights.values()) if ema else []
    extra = sum(v for k, v in plan.resident.items() if k.startswith("text encoders (T5"))
    prompt = "the red circle is to the left of the blue square"
    with flash_attention():
        meter = LiveBytes()
        meter.track(*tracked)
        with meter:
            images = torch.zeros(micro, 3, cfg.image_size, cfg.image_size, device="meta", dtype=pipe.vae.dtype)
            with torch.no_grad():
                lat = pipe.vae.encode(images).latent_dist.mode()
            b, c, h, w = lat.shape
            emb, pooled = sampler.encode([prompt] * micro)
            for _ in range(2):
                x = pipe._pack_latents(lat, b, c, h, w)
                pred = sampler.velocity(x, torch.full((b,), 0.5, device="meta"), emb, pooled)
                ((pred.float() - x.float()) ** 2).mean().backward()
            opt.step()
            plan.phases["train"] = meter.peak + extra
        for p in policy.params.values():
            p.grad = None
        n_eval = (len(cfg.grid_prompts) or cfg.eval_prompts) * cfg.eval_seeds
        per_rank = math.ceil(n_eval / world)
        echunk = min(cfg.sample_batch or per_rank, per_rank)
        meter.reset_peak()
        with meter, torch.no_grad():
            ev = sampler.sample([prompt] * echunk, list(range(echunk)), sde=False)
            plan.phases["evaluate"] = meter.peak + extra + (math.ceil(per_rank / echunk) - 1) * _nbytes([ev.images])
    plan.phases["checkpoint / export"] = sum(plan.resident.values()) - plan.resident["gradients"]
    plan.notes.append(f"a micro-batch: {micro} images of {cfg.image_size} px")
    return plan


def plan_run(kind: str, cfg, *, world: int, gpu_gib: float) -> Plan:
    """The memory plan of a ``grpo``, ``reward`` or ``sft`` config on ``world`` ranks of ``gpu_gib`` GiB."""
    if kind == "grpo":
        return plan_grpo(cfg, world, gpu_gib)
    if kind == "reward":
        return plan_reward(cfg, world, gpu_gib)
    if kind == "sft":
        return plan_sft(cfg, world, gpu_gib)
    raise ConfigError("KIND", f"plans exist for grpo, reward and sft configs, not {kind!r}")
