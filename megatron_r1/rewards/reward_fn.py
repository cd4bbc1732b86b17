"""`RewardFn`: the weighted sum of rule rewards (and plug-ins) for a batch of rollouts.

Every reward function runs under a time limit and a guard: one that raises or runs past
``RewardConfig.timeout_s`` scores 0 for that sample, is counted in ``RewardBatch.failures`` and
logged once per (function, error type). A broken verifier must not stop a long training run.
"""

from __future__ import annotations

import importlib
import logging
import math
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from megatron_r1.config import ConfigError, RewardConfig
from megatron_r1.rewards.accuracy import gym_accuracy, math_accuracy
from megatron_r1.rewards.code import score_code_items
from megatron_r1.rewards.format import extract_think, format_reward
from megatron_r1.rewards.language import language_identifier

logger = logging.getLogger(__name__)

R = TypeVar("R")
CustomReward = Callable[[str, str, dict], float]
BUILTIN_COMPONENTS = ("accuracy", "format", "language")


class RewardTimeout(TimeoutError):
    """A reward function ran past its time limit."""


# --------------------------------------------------------------------------------------------
# Time limits


class _Alarm:
    """Shared state between a timed call and its SIGALRM handler."""

    def __init__(self) -> None:
        self.done = False  # set once the call is over: a late signal must not raise any more
        self.fired = False  # the limit was hit (even if the function swallowed the exception)


def _timer_usable() -> bool:
    # Signal handlers can only be installed from the main thread of the main interpreter.
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def call_with_timeout(fn: Callable[..., R], *args: Any, timeout_s: float | None) -> R:
    """``fn(*args)``, raising `RewardTimeout` if it takes longer than ``timeout_s`` seconds.

    In the main thread a one-shot ``ITIMER_REAL`` interrupts the call (at the next Python
    bytecode: a single long C call, e.g. a huge integer power, still runs to its end). Elsewhere
    signals are unavailable, so the call runs to completion and is only *measured*; its result is
    discarded if it was too slow. A function that catches the exception itself and carries on is
    not interrupted a second time, but its late result is discarded too. ``timeout_s`` None or
    <= 0 means no limit.
    """
    if timeout_s is None or timeout_s <= 0:
        return fn(*args)
    if not _timer_usable():
        start = time.monotonic()
        result = fn(*args)
        elapsed = time.monotonic() - start
        if elapsed > timeout_s:
            raise RewardTimeout(
                f"took {elapsed:.2f}s, limit {timeout_s}s (measured: no hard limit off the main thread)"
            )
        return result
    return _call_with_itimer(fn, args, timeout_s)


def _call_with_itimer(fn: Callable[..., R], args: tuple, timeout_s: float) -> R:
    alarm = _Alarm()

    def on_alarm(signum: int, frame: Any) -> None:
        if not alarm.done:
            alarm.fired = True
            raise RewardTimeout(f"exceeded {timeout_s}s")

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    # One-shot (no interval): a single signal can land at most once, which is what makes the
    # clean-up below race-free. setitimer returns any timer someone else had armed.
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    start = time.monotonic()
    try:
        result = fn(*args)
    finally:
        try:
            alarm.done = True
        except RewardTimeout:  # the one signal arrived just before the line above
            alarm.done = True
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            # Give an outer timer (e.g. pytest-timeout's) what is left of it; one that expired
            # during the call fires right now instead of being lost.
            remaining = max(previous_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)
    if alarm.fired:  # the function caught the exception itself and returned late
        raise RewardTimeout(f"exceeded {timeout_s}s")
    return result


# --------------------------------------------------------------------------------------------
# Plug-ins by import path


def load_reward_function(path: str) -> CustomReward:
    """Import ``"package.module:function"``; a bad path raises one-line `ConfigError` (a ValueError)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward.custom: {path!r} is not of the form 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's path or module
        reason = (str(e).splitlines() or [""])[0]
        raise ConfigError(
            f"reward.custom: cannot import {module_name!r} for {path!r} ({type(e).__name__}: {reason}); "
            "is its directory on PYTHONPATH?"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reward.custom: {module_name!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward.custom: {path!r} is not callable")
    return obj


# --------------------------------------------------------------------------------------------
# The batch reward


@dataclass
class RewardBatch:
    """Rewards of N rollouts."""

    total: Tensor  # [N] float32: the weighted sum that feeds the advantages
    components: dict[str, Tensor]  # name -> [N] unweighted scores: accuracy, format, language, custom paths
    failures: int  # reward calls that raised or timed out (each scored 0)
    code_outcomes: dict[str, int] = field(default_factory=dict)  # code items: sandbox outcome (passed, timeout, ...) -> runs


class RewardFn:
    """Weighted rule rewards from a `RewardConfig`.

    Components (all computed and reported, each weighted by its config weight in ``total``):

    * ``accuracy``: ``item["entry"]`` (a reasoning-gym entry) is scored by its task's scorer;
      otherwise a string ``item["answer"]`` is checked with math_verify; no reference: 0.
      Code items (`code.is_code_item`, e.g. HumanEval) run the response's program against their
      tests in the sandbox, all of a call's code items at once (``cfg.code_*``; `code.py`).
    * ``format``: `format_reward` in ``cfg.format_mode``.
    * ``language``: share of chain-of-thought words in the question's language
      (``item["language"]`` if given, else detected from ``item["question"]``, else from the prompt).
    * one per ``cfg.custom`` entry, keyed by its import path: ``fn(prompt, response, item) -> float``.

    Calls are sequential; each is limited to ``cfg.timeout_s`` (see `call_with_timeout`), so a
    batch where everything times out takes N x components x timeout_s.
    """

    def __init__(self, cfg: RewardConfig):
        clash = set(cfg.custom) & set(BUILTIN_COMPONENTS)
        if clash:
            raise ConfigError(f"reward.custom: {sorted(clash)} clash with built-in reward names")
        if cfg.code_timeout_s <= 0 or cfg.code_workers < 0 or cfg.code_memory_mb < 64:
            raise ConfigError("reward.code_timeout_s must be > 0, reward.code_workers >= 0 (0: CPU count), reward.code_memory_mb >= 64")
        self.cfg = cfg
        self.weights = {"accuracy": cfg.accuracy_weight, "format": cfg.format_weight, "language": cfg.language_weight}
        self.custom = {path: load_reward_function(path) for path in cfg.custom}
        try:
            self.languages = language_identifier(tuple(cfg.languages))
        except ValueError as e:
            raise ConfigError(f"reward.languages: {e}") from None
        self.weights.update(cfg.custom)
        self._warned: set[tuple[str, str]] = set()
        # Import the verifiers now so the first timed call does not pay for the imports.
        import math_verify  # noqa: F401
        import reasoning_gym  # noqa: F401

    # The built-in components, as functions of one sample.

    @staticmethod
    def accuracy(response: str, item: dict) -> float:
        if item.get("entry") is not None:
            return gym_accuracy(response, item["entry"])
        answer = item.get("answer")
        if isinstance(answer, str) and answer.strip():
            return math_accuracy(response, answer)
        return 0.0

    def format(self, response: str) -> float:
        return format_reward(response, self.cfg.format_mode)

    def target_language(self, prompt: str, item: dict) -> str:
        """The language a response should think in: the item's, else the question's (detected), else English."""
        return item.get("language") or self.languages.detect(item.get("question") or prompt) or "en"

    def language(self, prompt: str, response: str, item: dict) -> float:
        return self.languages.consistency(extract_think(response) or "", self.target_language(prompt, item))

    def __call__(self, prompts: list[str], responses: list[str], items: list[dict]) -> RewardBatch:
        if not len(prompts) == len(responses) == len(items):
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses, {len(items)} items")
        scores: dict[str, list[float]] = {name: [] for name in self.weights}
        # Code items are scored first, as one parallel batch of sandboxed runs (never raises); runs
        # the sandbox itself failed are reward failures, not the program's.
        code, code_outcomes = score_code_items(responses, items, self.cfg.code_timeout_s, self.cfg.code_workers or None, self.cfg.code_memory_mb)
        failures = code_outcomes["error"] + code_outcomes["sandbox_error"]
        for i, (prompt, response, item) in enumerate(zip(prompts, responses, items)):
            calls: dict[str, tuple[Callable[..., float], tuple]] = {
                "accuracy": (code.__getitem__, (i,)) if i in code else (self.accuracy, (response, item)),
                "format": (self.format, (response,)),
                "language": (self.language, (prompt, response, item)),
            }
            for path, fn in self.custom.items():
                calls[path] = (fn, (prompt, response, item))
            for name, (fn, args) in calls.items():
                value = self._guarded(name, fn, args)
                failures += value is None
                scores[name].append(0.0 if value is None else value)

        components = {name: torch.tensor(vals, dtype=torch.float32) for name, vals in scores.items()}
        total = torch.zeros(len(responses), dtype=torch.float32)
        for name, weight in self.weights.items():
            total += weight * components[name]
        return RewardBatch(total=total, components=components, failures=failures, code_outcomes=dict(code_outcomes))

    def _guarded(self, name: str, fn: Callable[..., float], args: tuple) -> float | None:
        """The score as a finite float, or None (logged) if the call failed or was too slow."""
        try:
            value = call_with_timeout(fn, *args, timeout_s=self.cfg.timeout_s)
            if isinstance(value, (str, bytes)):  # float("1") would pass silently
                raise TypeError(f"returned a string ({value!r:.40}), not a number")
            score = float(value)
            if not math.isfinite(score):
                raise ValueError(f"returned {score}")
            return score
        except Exception as e:  # noqa: BLE001 - any failure of a reward is scored 0, by design
            key = (name, type(e).__name__)
            if key not in self._warned:
                self._warned.add(key)
                logger.warning(
                    "reward %r failed (%s: %s); scoring 0 (further %s from it are not logged)",
                    name, type(e).__name__, e, type(e).__name__,
                )
            return None


Split = Callable[[Sequence[int], Callable[[list[int]], list]], list]


def score_split(reward_fn: RewardFn, prompts: list[str], responses: list[str], items: list[dict], split: Split | None = None) -> RewardBatch:
    """`reward_fn` over the samples, with the work divided by `split(indices, fn)`: a function that
    runs `fn` on parts of `indices` (e.g. one part per rank of an engine) and returns every result
    in order (`rollout.layout.EngineGroups.split_work`). Without `split`, one call does it all."""
    if split is None:
        return reward_fn(prompts, responses, items)

    def score(indices: list[int]) -> list[tuple[float, dict[str, float], int, dict[str, int]]]:
        if not indices:
            return []
        part = reward_fn([prompts[i] for i in indices], [responses[i] for i in indices], [items[i] for i in indices])
        # The failure and outcome counts of a part are attached to its first sample; the totals add up the same.
        return [
            (float(part.total[j]), {k: float(v[j]) for k, v in part.components.items()}, part.failures if j == 0 else 0,
             part.code_outcomes if j == 0 else {})
            for j in range(len(indices))
        ]

    rows = split(list(range(len(responses))), score)
    names = list(rows[0][1]) if rows else list(reward_fn.weights)
    return RewardBatch(
        total=torch.tensor([r[0] for r in rows], dtype=torch.float32),
        components={k: torch.tensor([r[1][k] for r in rows], dtype=torch.float32) for k in names},
        failures=sum(r[2] for r in rows),
        code_outcomes=dict(sum((Counter(r[3]) for r in rows), Counter())),
    )
