"""DAPO's sampling-side fixes: dynamic sampling and the soft overlong penalty.

Dynamic sampling: a group whose G rewards are all equal has all-zero advantages, so it adds
tokens to the loss denominator but no gradient. Such groups are dropped and more prompts are
sampled until the batch holds ``target_groups`` groups with signal (or a round cap is reached).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def groups_with_signal(rewards: Tensor, atol: float = 0.0) -> Tensor:
    """``[num_groups, G]`` rewards -> ``[num_groups]`` bool: True where the rewards are not all
    equal (max - min > ``atol``), i.e. where GRPO's advantages are not all zero."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, G], got shape {tuple(rewards.shape)}")
    spread = rewards.max(dim=1).values - rewards.min(dim=1).values
    return spread > atol


class GroupAccumulator(Generic[T]):
    """Collects groups with signal over several sampling rounds.

    Usage::

        acc = GroupAccumulator(target_groups=16, max_rounds=3)
        while not acc.done:
            groups, rewards = sample_and_score(acc.needed)   # rewards: [len(groups), G]
            acc.add(rewards, groups)
        groups, rewards = acc.result()

    ``groups`` are whatever the caller keeps per prompt (token ids, texts, ...); the accumulator
    only looks at the rewards. After ``max_rounds`` rounds it stops even if short of the target,
    so ``result()`` may hold fewer than ``target_groups`` groups (possibly none: the caller
    decides whether to skip the update). Extra groups beyond the target are discarded and counted
    in ``surplus``.
    """

    def __init__(self, target_groups: int, max_rounds: int, atol: float = 0.0):
        if target_groups < 1 or max_rounds < 1:
            raise ValueError("target_groups and max_rounds must be >= 1")
        self.target_groups = target_groups
        self.max_rounds = max_rounds
        self.atol = atol
        self.rounds = 0  # sampling rounds consumed
        self.dropped = 0  # groups discarded for having no signal
        self.surplus = 0  # groups with signal discarded because the target was already met
        self._groups: list[T] = []
        self._rewards: list[Tensor] = []

    @property
    def kept(self) -> int:
        return len(self._groups)

    @property
    def needed(self) -> int:
        """Groups still missing to reach the target."""
        return max(self.target_groups - self.kept, 0)

    @property
    def done(self) -> bool:
        return self.kept >= self.target_groups or self.rounds >= self.max_rounds

    def add(self, rewards: Tensor, groups: Sequence[T], keep: Tensor | None = None) -> Tensor:
        """Record one sampling round; returns the ``[num_groups]`` keep mask of that round.

        ``keep`` overrides the signal filter (e.g. all True when dynamic sampling is off, so the
        same code path collects one unfiltered round).
        """
        if rewards.shape[0] != len(groups):
            raise ValueError(f"{rewards.shape[0]} reward rows for {len(groups)} groups")
        if self.done:
            raise RuntimeError("GroupAccumulator.add called after it was done")
        self.rounds += 1
        signal = groups_with_signal(rewards, self.atol) if keep is None else keep.bool()
        self.dropped += int((~signal).sum())
        for i in torch.nonzero(signal).flatten().tolist():
            if self.kept < self.target_groups:
                self._groups.append(groups[i])
                self._rewards.append(rewards[i])
            else:
                self.surplus += 1
        return signal

    def result(self) -> tuple[list[T], Tensor]:
        """The kept groups and their ``[kept, G]`` rewards (``[0, 0]`` when none were kept)."""
        rewards = torch.stack(self._rewards) if self._rewards else torch.zeros(0, 0)
        return list(self._groups), rewards

    def stats(self) -> dict[str, int]:
        """Counters for logging."""
        return {"rounds": self.rounds, "kept": self.kept, "dropped": self.dropped, "surplus": self.surplus}


def overlong_penalty(
    response_lengths: Tensor,
    max_tokens: int,
    buffer_tokens: int,
    penalty: float = 1.0,
) -> Tensor:
    """DAPO's soft overlong punishment, added to the reward.

    0 for lengths up to ``max_tokens - buffer_tokens``, then falling linearly to ``-penalty`` at
    ``max_tokens`` (and staying there beyond). A response cut at the budget is not necessarily
    wrong, so a hard -1 would be noisy; the ramp tells the policy it is getting close.
    ``buffer_tokens = 0`` disables the penalty.
    """
    lengths = response_lengths.to(torch.float32)
    if buffer_tokens <= 0:
        return torch.zeros_like(lengths)
    if buffer_tokens > max_tokens:
        raise ValueError(f"buffer_tokens={buffer_tokens} exceeds max_tokens={max_tokens}")
    over = (lengths - (max_tokens - buffer_tokens)) / buffer_tokens
    return -penalty * over.clamp(0.0, 1.0)
