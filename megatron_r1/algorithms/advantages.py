"""Group-relative advantages: GRPO's replacement for a learned value baseline.

Each prompt is sampled G times; an output's advantage is how much better its reward is than the
group's average, optionally divided by the group's spread. One scalar per output, later broadcast
over that output's tokens by the policy loss.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Advantages ``(r - mean(group)) / (std(group) + eps)``, or ``r - mean(group)`` (Dr. GRPO).

    Args:
        rewards: ``[num_groups * G]`` (groups laid out contiguously, as the rollout returns them)
            or ``[num_groups, G]``.
        group_size: G, outputs per prompt.
        scale_by_std: divide by the group's standard deviation (GRPO). ``False`` is Dr. GRPO,
            which drops the division because it up-weights prompts that are nearly always solved
            or nearly always failed (small std) and so biases the update toward them.
        eps: keeps the division finite for groups whose rewards are nearly equal.

    Returns:
        A float tensor with the same shape as ``rewards``.

    The std is the population std (``unbiased=False``): it makes each group's advantages have
    exactly zero mean and unit variance, and it stays defined for G = 1 (advantage 0) where the
    Bessel-corrected std divides by zero. Implementations that use ``torch.std``'s default
    (unbiased) produce advantages smaller by a factor ``sqrt((G - 1) / G)``.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    shape = rewards.shape
    if rewards.dim() == 2:
        if shape[1] != group_size:
            raise ValueError(f"rewards of shape {tuple(shape)} do not have group_size={group_size} columns")
    elif rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(shape)} cannot be split into groups of {group_size}")

    # Statistics in float64: in fp32 the mean of [0.7] * 8 is one ulp off 0.7, and the std of the
    # residue is one ulp too, so an all-equal group would get |A| ~ 0.06 of one sign. A group whose
    # rewards are all equal carries no signal and gets exactly 0, whatever the rounding.
    out_dtype = torch.promote_types(rewards.dtype, torch.float32)
    grouped = rewards.reshape(-1, group_size).to(torch.float64)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centered = centered / (grouped.std(dim=1, unbiased=False, keepdim=True) + eps)
    all_equal = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    centered = torch.where(all_equal, torch.zeros_like(centered), centered)
    return centered.to(out_dtype).reshape(shape)
