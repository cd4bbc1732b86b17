"""GRPO's math as pure tensor functions: advantages, policy loss, KL, sampling filters. No I/O."""

from megatron_r1.algorithms.advantages import group_advantages
from megatron_r1.algorithms.kl import KL_ESTIMATORS, entropy_from_logits, kl_penalty
from megatron_r1.algorithms.mismatch import importance_weights
from megatron_r1.algorithms.losses import LOSS_AGG_MODES, aggregate, loss_denominator, policy_loss
from megatron_r1.algorithms.sampling import GroupAccumulator, groups_with_signal, overlong_penalty

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "GroupAccumulator",
    "aggregate",
    "entropy_from_logits",
    "group_advantages",
    "importance_weights",
    "groups_with_signal",
    "kl_penalty",
    "loss_denominator",
    "overlong_penalty",
    "policy_loss",
]
