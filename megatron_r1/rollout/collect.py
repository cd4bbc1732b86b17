"""One GRPO step's rollouts: sample G responses per prompt on the engines and score them.

SPMD like the engines: each engine samples its share of the step's prompts and scores what it
sampled (the ranks of an engine split the scoring), then the scored groups are put back in prompt
order on every rank. With dynamic sampling, groups whose rewards are all equal (no signal: zero
advantage) are dropped and more prompts are sampled until the batch is full or the round cap is
reached.

General prompts (final RL, `GeneralReward`) are rewarded by the judge (each engine, on what it
sampled) or the reward model (every rank, on the gathered batch) instead of the rules.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import torch
from torch import Tensor

from megatron_r1.algorithms import overlong_penalty
from megatron_r1.algorithms.sampling import GroupAccumulator
from megatron_r1.config import StageConfig
from megatron_r1.data.tokenizer import decode_response, stop_conditions
from megatron_r1.rewards.reward_fn import score_split


@dataclasses.dataclass
class Sample:
    """One sampled response, with where it came from."""

    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt: int  # position of its prompt in the step's batch of prompts
    engine: int  # the engine (vLLM data-parallel rank) that sampled it
    logprobs: list[float] | None = None  # the engine's log-probs of the response tokens (mismatch correction)
    routing: Tensor | None = None  # [prompt + response - 1, MoE layers, top-k]: the engine's experts per token (R3)
    version: int = 0  # the policy version (updates applied) whose weights sampled it (placement=disaggregated)


@dataclasses.dataclass
class ScoredGroup:
    """The G responses to one prompt, with their rewards."""

    samples: list[Sample]
    rewards: Tensor  # [G] the total reward (rules or general scorer, plus the overlong penalty)
    lengths: Tensor  # [G] response tokens
    components: dict[str, Tensor]  # [G] each reward component (accuracy, format, language, ...)
    general: bool  # a general prompt (its reward comes from the judge or the reward model)
    question: str
    texts: list[str]  # the decoded responses
    penalty: Tensor  # [G] the overlong penalty (already in `rewards`)


@dataclasses.dataclass
class RolloutBatch:
    """A step's scored rollouts, in prompt order, the same on every rank."""

    samples: list[Sample]
    rewards: Tensor  # [N]
    lengths: Tensor  # [N]
    components: dict[str, Tensor]  # each [N]
    stats: dict[str, float]  # metrics: reward failures, sandbox outcomes, dynamic-sampling counts
    seconds: dict[str, float]  # wall seconds of the phases "rollout" and "reward"


def sampling_seed(seed: int, step: int, round_: int, engine: int) -> int:
    """Per step, sampling round and engine: a resumed run samples what an uninterrupted one would,
    every rank of an engine draws the same tokens, and different engines draw different ones."""
    return seed * 1_000_003 + step * 101 + round_ * 7 + engine * 7919


def collect_rollouts(cfg: StageConfig, engine, tokenizer, sampler, reward_fn, step: int, general=None) -> RolloutBatch:
    """Sample and score the batch of step `step` (collective: every rank calls it)."""
    g = cfg.rollout.n_samples_per_prompt
    layout, groups = engine.layout, engine.groups
    dynamic = cfg.grpo.dynamic_sampling
    acc: GroupAccumulator[ScoredGroup] = GroupAccumulator(cfg.grpo.prompts_per_step, cfg.grpo.max_sampling_rounds if dynamic else 1)
    stop_ids, stop_strings = stop_conditions(tokenizer, cfg.rollout.stop)
    failures, malformed, sampled_here = 0, 0, 0
    seconds = {"rollout": 0.0, "reward": 0.0}
    code_outcomes: Counter = Counter()  # sandbox outcomes of code items (passed, timeout, memory, ...)
    while not acc.done:
        prompts = sampler.next_batch()  # the same on every rank
        start, _ = layout.shard_bounds(len(prompts))
        mine = layout.shard(prompts)
        t0 = time.perf_counter()
        torch.manual_seed(sampling_seed(cfg.seed, step, acc.rounds, layout.engine_index))
        out = engine.generate([p.prompt_ids for p in mine], n=g, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                              max_tokens=cfg.rollout.max_response_tokens, stop_token_ids=stop_ids, stop=stop_strings,
                              min_tokens=cfg.rollout.min_response_tokens)
        sampled_here += len(out)
        seconds["rollout"] += time.perf_counter() - t0

        # Rewards run where the responses were sampled, split over the ranks of the engine.
        t0 = time.perf_counter()
        texts = [decode_response(tokenizer, r.response_ids) for r in out]
        items = [mine[i // g] for i in range(len(out))]
        scored = score_split(reward_fn, [p.prompt for p in items], texts, [p.as_reward_item() for p in items], groups.split_work)
        rewards = scored.total.clone()
        components = dict(scored.components)
        bad_verdicts = 0
        if general is not None:
            components["general"] = torch.tensor([float(p.source == "general") for p in items])
            components[general.kind] = torch.zeros(len(out))
            if not general.collective:  # the judge: this engine grades what it sampled
                index = [j for j, p in enumerate(items) if p.source == "general"]
                scores, bad_verdicts = general([items[j].question for j in index], [texts[j] for j in index])
                components[general.kind][index] = scores
                rewards[index] = general.weight * scores
        lengths = torch.tensor([len(r.response_ids) for r in out], dtype=torch.float32)
        penalty = torch.zeros(len(out))
        if cfg.grpo.overlong_buffer_tokens > 0:
            penalty = overlong_penalty(lengths, cfg.rollout.max_response_tokens, cfg.grpo.overlong_buffer_tokens, cfg.grpo.overlong_penalty)
        rewards += penalty
        part = lambda x, i: x[i * g : (i + 1) * g]  # noqa: E731  (prompt i's G responses)
        local = [
            ScoredGroup(
                samples=[Sample(r.prompt_ids, r.response_ids, r.finish_reason, start + i, layout.engine_index, r.logprobs, r.routing) for r in part(out, i)],
                rewards=part(rewards, i), lengths=part(lengths, i), components={k: part(v, i) for k, v in components.items()},
                general=mine[i].source == "general", question=mine[i].question, texts=part(texts, i), penalty=part(penalty, i),
            )
            for i in range(len(mine))
        ]
        round_groups = groups.gather(local)  # whole groups, in prompt order, on every rank
        failures += sum(groups.all_gather(scored.failures if layout.is_engine_leader else 0))
        for outcomes in groups.all_gather(scored.code_outcomes if layout.is_engine_leader else {}):
            code_outcomes.update(outcomes)
        if general is not None:
            malformed += sum(groups.all_gather(bad_verdicts if layout.is_engine_leader else 0))
            if general.collective:  # the reward model: every rank scores the gathered general groups together
                _score_general_groups(round_groups, general)
        seconds["reward"] += time.perf_counter() - t0
        rewards_round = torch.stack([grp.rewards for grp in round_groups]) if round_groups else torch.zeros(0, g)
        acc.add(rewards_round, round_groups, keep=None if dynamic else torch.ones(len(round_groups), dtype=torch.bool))
    kept, rewards = acc.result()
    stats = {
        "reward/failures": float(failures),
        **{f"reward/code_{k}": float(v) for k, v in sorted(code_outcomes.items())},
        **({"reward/judge_malformed": float(malformed)} if general is not None and general.kind == "judge" else {}),
        "rollout/sequences_sampled_per_engine": float(sampled_here),
        **{f"sampling/{k}": float(v) for k, v in acc.stats().items()},
    }
    return RolloutBatch(
        samples=[s for grp in kept for s in grp.samples],
        rewards=rewards.flatten(),
        lengths=torch.cat([grp.lengths for grp in kept]) if kept else torch.zeros(0),
        components={k: torch.cat([grp.components[k] for grp in kept]) for k in (kept[0].components if kept else {})},
        stats=stats,
        seconds=seconds,
    )


def _score_general_groups(round_groups: list[ScoredGroup], general) -> None:
    """Reward every response of the general groups with the reward model (collective, in place)."""
    mine = [grp for grp in round_groups if grp.general]
    questions = [grp.question for grp in mine for _ in grp.texts]
    scores = general(questions, [t for grp in mine for t in grp.texts])[0]
    for i, grp in enumerate(mine):
        part = scores[i * len(grp.texts) : (i + 1) * len(grp.texts)]
        grp.components[general.kind] = part
        grp.rewards = general.weight * part + grp.penalty
