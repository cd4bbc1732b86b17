"""reasoning-gym datasets built from a *stream seed*, so that different seeds never share items.

reasoning-gym derives item ``i`` of a dataset created with ``seed=s`` from the item seed ``s + i``
(``random.Random(self.seed + idx)`` in its generators). Two datasets with nearby seeds therefore
overlap: with ``seed=1000, size=20000`` for training and ``seed=2000`` for evaluation, every
evaluation item is also a training item. We avoid that by giving each seed of ours its own block
of 2**32 item seeds: our seed ``s`` becomes reasoning-gym's seed ``s * 2**32``. Any two different
seeds then produce disjoint item-seed ranges for any dataset size below 2**32.

(The one generator that breaks with such seeds is ``pool_matrix``, which feeds them to numpy's legacy
32-bit global seeder; it fails with a clear error.)
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from megatron_r1.config import ConfigError

SEED_BLOCK = 2**32  # item seeds owned by one stream seed


def gym_seed(seed: int) -> int:
    """The reasoning-gym dataset seed that corresponds to our stream seed `seed` (>= 0)."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed * SEED_BLOCK


def make_gym_dataset(task: str, task_options: dict[str, Any], seed: int, size: int) -> Any:
    """`reasoning_gym.create_dataset(task, seed=gym_seed(seed), size=size, **task_options)`.

    A wrong task name or option ends in one ConfigError naming the valid choices instead of the
    library's traceback (errors a user can cause get one clear line).
    """
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        close = difflib.get_close_matches(task, list(DATASETS), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"{len(DATASETS)} tasks exist, e.g. chain_sum"
        raise ConfigError(f"data.task={task!r} is not a reasoning-gym dataset; {hint}")
    _, config_cls = DATASETS[task]
    valid = [p for p in inspect.signature(config_cls).parameters if p not in ("seed", "size")]
    unknown = sorted(set(task_options) - set(valid))
    if unknown:
        raise ConfigError(f"data.task_options: {', '.join(unknown)} not options of {task!r}; valid: {', '.join(valid)}")
    try:
        return reasoning_gym.create_dataset(task, seed=gym_seed(seed), size=size, **task_options)
    except (AssertionError, ValueError, TypeError) as e:
        raise ConfigError(f"data.task_options for {task!r} rejected by reasoning-gym: {e or type(e).__name__}") from None


def gym_entry(dataset: Any, index: int) -> dict[str, Any]:
    """Item `index` of `dataset`, with generator failures turned into one clear error."""
    try:
        return dataset[index]
    except Exception as e:  # a generator bug or an unsupported seed, reported with its task and index
        name = type(dataset).__name__
        raise ValueError(f"reasoning-gym {name} failed to generate item {index}: {type(e).__name__}: {e}") from None
