"""How the colocated engines span the job, and the collectives that share their work.

Every rank of the job hosts one vLLM worker (see `rollout.vllm_engine`). vLLM groups the workers
of consecutive ranks into engines of ``t x p`` ranks (engine tensor x pipeline parallel) and
numbers the engines as its data-parallel ranks: with W ranks there are ``W / (t p)`` engines, and
engine ``d`` is ranks ``d t p .. (d + 1) t p - 1``. For example:

    8 GPUs, t = 1:          8 engines, one per GPU; each samples 1/8 of the prompts.
    8 GPUs, t = 4:          engines [0..3] and [4..7]; each samples half of the prompts.
    2 nodes x 8, t = 16:    one engine over both nodes (a model one node cannot hold).

The trainer's layout (Megatron TP/PP/EP/DP) is independent of the engines'. A step's prompts are
cut into contiguous shares, one per engine (`shard`); every rank of an engine samples the same
share and gets the same responses; the ranks of one engine split the scoring between them
(`split_work`); the engines' results are then put back in prompt order on every rank (`gather`),
where each trainer data-parallel rank takes its own part of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

from megatron_r1.config import ConfigError, RolloutConfig
from megatron_r1.distributed import even_bounds

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class EngineLayout:
    """Where one rank sits among the engines (pure: no process groups)."""

    world_size: int
    rank: int
    tensor_parallel_size: int = 1  # ranks of one engine along TP
    pipeline_parallel_size: int = 1  # ranks of one engine along PP

    def __post_init__(self) -> None:
        per = self.tensor_parallel_size * self.pipeline_parallel_size
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ConfigError("rollout.engine_tensor_parallel_size and rollout.engine_pipeline_parallel_size must be >= 1")
        if self.world_size % per:
            raise ConfigError(
                f"an engine spans rollout.engine_tensor_parallel_size x rollout.engine_pipeline_parallel_size = {per} ranks, "
                f"which does not divide the {self.world_size} ranks of the job; change one of them or the number of processes"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a job of {self.world_size} ranks")

    @classmethod
    def from_config(cls, cfg: RolloutConfig, world_size: int, rank: int) -> EngineLayout:
        return cls(world_size, rank, cfg.engine_tensor_parallel_size, cfg.engine_pipeline_parallel_size)

    @property
    def ranks_per_engine(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def num_engines(self) -> int:
        """Engines in the job: vLLM's data-parallel size."""
        return self.world_size // self.ranks_per_engine

    @property
    def engine_index(self) -> int:
        """This rank's engine: vLLM's data-parallel rank."""
        return self.rank // self.ranks_per_engine

    @property
    def rank_in_engine(self) -> int:
        return self.rank % self.ranks_per_engine

    @property
    def is_engine_leader(self) -> bool:
        """The first rank of its engine speaks for it when results are gathered."""
        return self.rank_in_engine == 0

    def engine_ranks(self, engine: int | None = None) -> list[int]:
        """Global ranks of engine `engine` (default: this rank's)."""
        engine = self.engine_index if engine is None else engine
        return list(range(engine * self.ranks_per_engine, (engine + 1) * self.ranks_per_engine))

    def shard_bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) of this engine's share of `n` items."""
        return even_bounds(n, self.num_engines, self.engine_index)

    def shard(self, items: Sequence[T]) -> list[T]:
        """This engine's contiguous share of `items` (the same on every rank of the engine)."""
        start, stop = self.shard_bounds(len(items))
        return list(items[start:stop])

    def describe(self) -> str:
        return (
            f"{self.num_engines} engine(s) of TP {self.tensor_parallel_size} x PP {self.pipeline_parallel_size} "
            f"over {self.world_size} rank(s)"
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "world_size": self.world_size,
            "rollout_engines": self.num_engines,
            "engine_tensor_parallel_size": self.tensor_parallel_size,
            "engine_pipeline_parallel_size": self.pipeline_parallel_size,
        }


class EngineGroups:
    """The layout plus the process groups its collectives need. Build it on every rank at once
    (it creates one group per multi-rank engine, in the same order everywhere)."""

    def __init__(self, layout: EngineLayout) -> None:
        self.layout = layout
        self.engine_group: dist.ProcessGroup | None = None
        if layout.ranks_per_engine > 1:
            for engine in range(layout.num_engines):  # new_group is collective over the whole world
                group = dist.new_group(layout.engine_ranks(engine))
                if engine == layout.engine_index:
                    self.engine_group = group

    def split_work(self, items: Sequence[T], fn: Callable[[list[T]], list[R]]) -> list[R]:
        """`fn` over `items` (the same list on every rank of this engine), each rank of the engine
        doing every ``ranks_per_engine``-th item; every rank of the engine returns all results in order."""
        per = self.layout.ranks_per_engine
        if per == 1:
            return list(fn(list(items)))
        mine = list(fn(list(items[self.layout.rank_in_engine :: per])))
        parts: list[Any] = [None] * per
        dist.all_gather_object(parts, mine, group=self.engine_group)
        out: list[Any] = [None] * len(items)
        for i, part in enumerate(parts):
            out[i::per] = part
        return out

    def gather(self, share: Sequence[T]) -> list[T]:
        """Every engine's `share`, concatenated in engine order, on every rank of the job. With
        contiguous shares (`EngineLayout.shard`) this restores the original order."""
        if self.layout.world_size == 1:
            return list(share)
        parts: list[Any] = [None] * self.layout.world_size
        dist.all_gather_object(parts, list(share) if self.layout.is_engine_leader else None)
        return [item for part in parts if part is not None for item in part]

    def all_gather(self, value: T) -> list[T]:
        """`value` from every rank, in rank order."""
        if self.layout.world_size == 1:
            return [value]
        parts: list[Any] = [None] * self.layout.world_size
        dist.all_gather_object(parts, value)
        return parts
