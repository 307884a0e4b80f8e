"""Fused math with plain PyTorch references (installed as ``spatialcore.kernels``).

Each module holds one kernel family, in the same order: the math (docstring), the plain PyTorch
reference, the Triton kernels, the autograd wrapper and the public op (``backend="auto"|"triton"|"torch"``).
``launch`` holds what they share: the optional Triton import, the backend switch, launch settings.
"""

from .advantages import (
    ADVANTAGE_PRESETS,
    TOPK_PRESETS,
    GroupAdvantages,
    group_advantages,
    group_advantages_reference,
    preset_top_k,
    topk_keep,
)

__all__ = ["ADVANTAGE_PRESETS", "TOPK_PRESETS", "GroupAdvantages", "group_advantages", "group_advantages_reference",
           "preset_top_k", "topk_keep"]
from .sde_step import ode_step, sde_step_logprob, sde_step_reference, step_coefficients  # noqa: E402

__all__ += ["ode_step", "sde_step_logprob", "sde_step_reference", "step_coefficients"]
from .grpo_loss import KL_CONVENTIONS, GRPOLoss, flow_grpo_loss, flow_grpo_loss_reference, kl_std  # noqa: E402
from .reward_head import (  # noqa: E402
    pair_loss,
    pair_loss_reference,
    pairwise_accuracy,
    reward_head,
    reward_head_reference,
)

__all__ += ["KL_CONVENTIONS", "GRPOLoss", "flow_grpo_loss", "flow_grpo_loss_reference", "kl_std", "pair_loss",
            "pair_loss_reference",
            "pairwise_accuracy", "reward_head", "reward_head_reference"]
