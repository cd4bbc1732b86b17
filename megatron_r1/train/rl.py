"""The GRPO loop (DeepSeek-R1-Zero): rollout -> reward -> advantages -> logprobs -> update -> sync.

Read `run` top to bottom: it is the algorithm. Megatron-Core holds the policy (any TP/PP/EP/DP);
every rank also hosts one vLLM worker (SPMD colocation, `rollout.vllm_engine`). Each engine samples
and scores its share of a step's prompts; the scored groups are put back in order on every rank;
each trainer data-parallel rank trains on its part of the batch; then every rank loads the new
policy into its own worker.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_r1 import distributed, platform
from megatron_r1.algorithms import aggregate, group_advantages, importance_weights, kl_penalty, overlong_penalty, policy_loss
from megatron_r1.algorithms.sampling import GroupAccumulator
from megatron_r1.config import ConfigError, StageConfig, to_dict
from megatron_r1.convert import model_info
from megatron_r1.data.prompts import MixedSampler, load_general_prompts, load_prompts
from megatron_r1.data.templates import TEMPLATES
from megatron_r1.data.tokenizer import load_tokenizer
from megatron_r1.models.build import build_model, num_parameters
from megatron_r1.models.hf.base import export_hf_tensors, load_hf, read_hf_config, save_hf
from megatron_r1.rewards.general import SCORERS as GENERAL_SCORERS
from megatron_r1.rewards.general import GeneralReward
from megatron_r1.rewards.reward_fn import RewardFn, score_split
from megatron_r1.rollout.layout import EngineLayout
from megatron_r1.rollout.vllm_engine import VLLMEngine
from megatron_r1.rollout.weight_sync import ParityProbe, WeightSync, probe_thresholds
from megatron_r1.train import checkpoint as ckpt
from megatron_r1.train.evaluate import evaluate, stop_conditions
from megatron_r1.train.guards import RunGuard, TrainingHalted
from megatron_r1.train.memory import free_for_engine, release_fp8_weight_caches
from megatron_r1.train.metrics import MetricsLogger, PhaseTimer, plot_run
from megatron_r1.train.optim import build_optimizer
from megatron_r1.train.preemption import Preempted, PreemptionWatch
from megatron_r1.train.pretrain import prepare_base_model
from megatron_r1.train.step import Batch, compute_logprobs, data_parallel_share, train_step

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Set-up: base model, policy (+ reference), engine, data, rewards.


def _build_policy(cfg: StageConfig, hf_dir: Path):
    model_cfg = dataclasses.replace(
        read_hf_config(hf_dir), params_dtype=cfg.model.params_dtype, fp8_recipe=cfg.model.fp8_recipe
    )
    model = build_model(model_cfg, cfg.parallel, cfg.memory)
    load_hf(model, model_cfg, hf_dir)
    ddp, optimizer, scheduler = build_optimizer(model, cfg.optimizer, cfg.parallel, cfg.steps, cfg.memory)
    reference = None
    if cfg.grpo.kl_beta > 0:  # beta = 0 skips the reference model: no memory, no forward
        reference = build_model(model_cfg, cfg.parallel, cfg.memory)
        load_hf(reference, model_cfg, hf_dir)
        reference.eval().requires_grad_(False)
    return model_cfg, model, ddp, optimizer, scheduler, reference


# --------------------------------------------------------------------------------------------
# One phase per function.


@dataclasses.dataclass
class Sample:
    """One sampled response, with where it came from."""

    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt: int  # position of its prompt in the step's batch of prompts
    engine: int  # the engine (vLLM data-parallel rank) that sampled it
    logprobs: list[float] | None = None  # the engine's log-probs of the response tokens (mismatch correction)


def sampling_seed(seed: int, step: int, round_: int, engine: int) -> int:
    """Per step, sampling round and engine: a resumed run samples what an uninterrupted one would,
    every rank of an engine draws the same tokens, and different engines draw different ones."""
    return seed * 1_000_003 + step * 101 + round_ * 7 + engine * 7919


def rollout_phase(cfg, engine, tokenizer, sampler, reward_fn, step, general=None):
    """Sample G responses per prompt and score them, each engine its share of the prompts; returns
    the whole batch (every group, in prompt order) on every rank. With dynamic sampling, groups
    whose rewards are all equal (no signal: zero advantage) are dropped and more prompts are
    sampled until the batch is full or the round cap is reached.

    General prompts (`general`, a `GeneralReward`) are rewarded by the judge (each engine, on what it
    sampled) or the reward model (every rank, on the gathered batch) instead of the rules."""
    g = cfg.rollout.n_samples_per_prompt
    layout, groups = engine.layout, engine.groups
    dynamic = cfg.grpo.dynamic_sampling
    acc = GroupAccumulator(cfg.grpo.prompts_per_step, cfg.grpo.max_sampling_rounds if dynamic else 1)
    failures, malformed, timings, sampled_here = 0, 0, {"rollout": 0.0, "reward": 0.0}, 0
    code_outcomes: Counter = Counter()  # sandbox outcomes of code items (passed, timeout, memory, ...)
    while not acc.done:
        prompts = sampler.next_batch()  # the same on every rank
        start, _ = layout.shard_bounds(len(prompts))
        mine = layout.shard(prompts)
        t0 = time.perf_counter()
        torch.manual_seed(sampling_seed(cfg.seed, step, acc.rounds, layout.engine_index))
        stop_ids, stop_strings = stop_conditions(tokenizer, cfg.rollout.stop)
        out = engine.generate(
            [p.prompt_ids for p in mine],
            n=g,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_tokens=cfg.rollout.max_response_tokens,
            stop_token_ids=stop_ids,
            stop=stop_strings,
        )
        sampled_here += len(out)
        timings["rollout"] += time.perf_counter() - t0

        # Rewards run where the responses were sampled, split over the ranks of the engine.
        t0 = time.perf_counter()
        texts = [tokenizer.decode(r.response_ids, skip_special_tokens=False).replace(tokenizer.eos_token, "") for r in out]
        items = [mine[i // g] for i in range(len(out))]
        scored = score_split(reward_fn, [p.prompt for p in items], texts, [p.as_reward_item() for p in items], groups.split_work)
        rewards = scored.total.clone()
        components = dict(scored.components)
        bad_verdicts = 0
        if general is not None:
            is_general = torch.tensor([float(p.source == "general") for p in items])
            components["general"] = is_general
            components[general.kind] = torch.zeros(len(out))
            if not general.collective:  # the judge: this engine grades what it sampled
                index = [j for j, p in enumerate(items) if p.source == "general"]
                scores, bad = general([items[j].question for j in index], [texts[j] for j in index])
                bad_verdicts = bad
                components[general.kind][index] = scores
                rewards[index] = general.weight * scores
        lengths = torch.tensor([len(r.response_ids) for r in out], dtype=torch.float32)
        penalty = torch.zeros(len(out))
        if cfg.grpo.overlong_buffer_tokens > 0:
            penalty = overlong_penalty(lengths, cfg.rollout.max_response_tokens, cfg.grpo.overlong_buffer_tokens, cfg.grpo.overlong_penalty)
        rewards += penalty
        local = [
            {
                "samples": [Sample(r.prompt_ids, r.response_ids, r.finish_reason, start + i, layout.engine_index, r.logprobs) for r in out[i * g : (i + 1) * g]],
                "rewards": rewards[i * g : (i + 1) * g],
                "lengths": lengths[i * g : (i + 1) * g],
                "components": {k: v[i * g : (i + 1) * g] for k, v in components.items()},
                "general": mine[i].source == "general",
                "question": mine[i].question,
                "texts": texts[i * g : (i + 1) * g],
                "penalty": penalty[i * g : (i + 1) * g],
            }
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
        timings["reward"] += time.perf_counter() - t0
        rewards_round = torch.stack([grp["rewards"] for grp in round_groups]) if round_groups else torch.zeros(0, g)
        acc.add(rewards_round, round_groups, keep=None if dynamic else torch.ones(len(round_groups), dtype=torch.bool))
    kept, rewards = acc.result()
    batch = {
        "samples": [s for grp in kept for s in grp["samples"]],
        "rewards": rewards.flatten(),
        "lengths": torch.cat([grp["lengths"] for grp in kept]) if kept else torch.zeros(0),
        "components": {k: torch.cat([grp["components"][k] for grp in kept]) for k in (kept[0]["components"] if kept else {})},
    }
    stats = {
        "reward/failures": float(failures),
        **{f"reward/code_{k}": float(v) for k, v in sorted(code_outcomes.items())},
        **({"reward/judge_malformed": float(malformed)} if general is not None and general.kind == "judge" else {}),
        "rollout/sequences_sampled_per_engine": float(sampled_here),
        **{f"sampling/{k}": float(v) for k, v in acc.stats().items()},
    }
    return batch, stats, timings


def _score_general_groups(round_groups: list[dict], general) -> None:
    """Reward every response of the general groups with the reward model (collective, in place)."""
    mine = [grp for grp in round_groups if grp["general"]]
    questions = [grp["question"] for grp in mine for _ in grp["texts"]]
    scores = general(questions, [t for grp in mine for t in grp["texts"]])[0]
    for i, grp in enumerate(mine):
        part = scores[i * len(grp["texts"]) : (i + 1) * len(grp["texts"])]
        grp["components"][general.kind] = part
        grp["rewards"] = general.weight * part + grp["penalty"]


def make_batch(samples: list[Sample], advantages, pad_id) -> Batch:
    """Right-padded prompt+response tokens; the loss covers response tokens only. The engine's
    log-probs of the response tokens, when every sample has them, ride along target-aligned as
    `extras["rollout_logprobs"]` (the target of position t is token t + 1)."""
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    tokens = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.float32)
    with_engine = all(s.logprobs is not None and len(s.logprobs) == len(s.response_ids) for s in samples)
    engine_logprobs = torch.zeros((len(samples), width - 1), dtype=torch.float32)
    for i, s in enumerate(samples):
        prompt, seq = s.prompt_ids, s.prompt_ids + s.response_ids
        tokens[i, : len(seq)] = torch.tensor(seq)
        mask[i, len(prompt) : len(seq)] = 1.0
        if with_engine and s.response_ids:
            engine_logprobs[i, len(prompt) - 1 : len(seq) - 1] = torch.tensor(s.logprobs, dtype=torch.float32)
    extras = {"rollout_logprobs": engine_logprobs} if with_engine else {}
    return Batch(tokens=tokens, loss_mask=mask, advantages=advantages.float(), extras=extras)


def grpo_loss_fn(cfg: StageConfig):
    """The GRPO objective for one micro-batch. Losses are divided by whole-batch denominators
    (`micro.num_tokens` / `micro.num_sequences`), so micro-batch losses add up to the batch loss."""
    g = cfg.grpo
    max_tokens = cfg.rollout.max_response_tokens

    def loss_fn(logprobs, entropy, micro):
        mask = micro.mask
        denominator = micro.num_tokens if g.loss_agg == "token-mean" else micro.num_sequences
        # On-policy (one update per rollout): the sampling policy IS the current one, so the ratio
        # is exactly 1 and only its gradient matters: no separate old-logprob forward is needed.
        old = micro.old_logprobs if micro.old_logprobs is not None else logprobs.detach()
        # The engine sampled, the trainer learns: measure their gap every step, correct it if asked.
        is_weights, mismatch = None, {}
        if "rollout_logprobs" in micro.extras:
            weights, _, mismatch = importance_weights(
                old, micro.extras["rollout_logprobs"], mask, g.mismatch_correction, g.mismatch_level, g.mismatch_max, g.mismatch_min
            )
            is_weights = weights if g.mismatch_correction != "none" else None
        loss, metrics = policy_loss(
            logprobs, old, micro.advantages, mask,
            clip_eps_low=g.clip_eps_low, clip_eps_high=g.clip_eps_high,
            loss_agg=g.loss_agg, max_response_tokens=max_tokens, global_denominator=denominator,
            clip_ratio_c=g.clip_ratio_c, is_weights=is_weights,
        )
        metrics.update(mismatch)
        if g.kl_beta > 0:
            kl = kl_penalty(logprobs, micro.ref_logprobs, g.kl_estimator, mask=mask)
            loss = loss + g.kl_beta * aggregate(kl, mask, g.loss_agg, max_tokens, denominator)
            metrics["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1)
        if entropy is not None:
            metrics["entropy"] = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
            if g.entropy_coeff:
                loss = loss - g.entropy_coeff * aggregate(entropy, mask, g.loss_agg, max_tokens, denominator)
        return loss, metrics

    return loss_fn


def update_phase(cfg, ddp, optimizer, scheduler, reference, batch: Batch, timer: PhaseTimer | None = None) -> dict:
    """Reference logprobs (if beta > 0), then the policy update in `updates_per_rollout` mini-batches
    (timed as the phases `logprob` and `train` when a timer is given)."""
    timer = timer or PhaseTimer()
    mb = cfg.grpo.micro_batch_size
    with timer("logprob"):
        if cfg.grpo.kl_beta > 0:
            batch.ref_logprobs = compute_logprobs(reference, batch.tokens, mb)
        if cfg.grpo.updates_per_rollout > 1:  # later mini-batches are off-policy: keep the sampler's logprobs
            batch.old_logprobs = compute_logprobs(ddp, batch.tokens, mb)
    metrics: dict[str, float] = {}
    parts = batch.split(cfg.grpo.updates_per_rollout)
    with timer("train"):
        for part in parts:
            out = train_step(ddp, optimizer, scheduler, part, grpo_loss_fn(cfg), mb, with_entropy=True)
            for k, v in out.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / len(parts)
    return metrics


def sync_phase(engine, model, model_cfg, syncer, probe, step: int, probe_every: int, reference=None) -> dict:
    """Refit every rank's own worker, in the order that keeps device memory lowest: free what the
    trainer does not need (cached blocks, the FP8 weight caches of policy and reference), wake the
    engine's weights, stream the new policy in (bucketed), wake its KV cache, then check logprob
    parity (the probe runs the engine, so it needs its KV cache)."""
    free_for_engine(model, reference)
    engine.wake_up(["weights"])
    traffic = {"received": 0}
    s = syncer.sync(export_hf_tensors(model, model_cfg, traffic), traffic)
    engine.wake_up(["kv_cache"])
    stats = {
        "sync/seconds": s.seconds,
        "sync/gb_per_s": s.gb_per_s,
        "sync/buckets": float(s.buckets),
        "sync/mb_loaded_per_rank": s.bytes / 2**20,
        "sync/mb_received_per_rank": s.received_bytes / 2**20,
        "sync/peak_extra_mb": s.peak_extra_bytes / 2**20,
    }
    if probe is not None and probe_every and step % probe_every == 0:
        stats.update(probe.check())
    return stats


# --------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class Policy:
    """The trained model and everything that updates it."""

    model_cfg: object
    model: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: object
    scheduler: object
    reference: torch.nn.Module | None


def _resume(cfg: StageConfig, ckpt_dir: Path, policy: Policy, sampler: MixedSampler, metrics: MetricsLogger) -> tuple[int, float, float | None]:
    """(first step, RL seconds so far, base accuracy) from the latest checkpoint, or a fresh start."""
    if not cfg.checkpoint.resume or (latest := ckpt.resume_step(ckpt_dir, cfg.checkpoint.verify)) is None:
        return 0, 0.0, None
    extra = ckpt.load_checkpoint(ckpt_dir, latest, policy.ddp, policy.optimizer, policy.scheduler)
    sampler.load_state_dict(extra["sampler"])
    metrics.truncate_after(latest)
    if distributed.is_main():
        log.info("resumed from %s at step %d", ckpt_dir, latest)
    return latest, extra["wall_seconds"], extra.get("base_accuracy")


def _load_megatron_weights(cfg: StageConfig, policy: Policy) -> bool:
    """Start the policy (and the reference) from `checkpoint.load_megatron`'s latest checkpoint."""
    root = cfg.checkpoint.load_megatron
    if not root:
        return False
    step = ckpt.resume_step(root, cfg.checkpoint.verify)
    if step is None:
        raise ConfigError(f"checkpoint.load_megatron={root} holds no complete checkpoint (no 'latest' file)")
    ckpt.load_checkpoint(root, step, policy.ddp, None, None, load_rng=False)  # weights only: any layout
    policy.optimizer.reload_model_params()  # fp32 master copies (bf16 training) follow the loaded weights
    if policy.reference is not None:
        ckpt.load_checkpoint(root, step, policy.reference, None, None, load_rng=False)
    if distributed.is_main():
        log.info("policy weights from %s step %d", root, step)
    return True


def _step_row(rewards, lengths, components, samples, share: slice, stats: dict, train: dict, sync: dict, rollout_seconds: float) -> dict:
    """The metrics row of one step (the same on every rank)."""
    by_source = {}
    if "general" in components:  # final RL: every reward also per prompt source
        is_general = components["general"] > 0
        for source, mask in (("reasoning", ~is_general), ("general", is_general)):
            if mask.any():
                by_source[f"reward/{source}/mean"] = float(rewards[mask].mean())
                by_source.update({f"reward/{source}/{k}": float(v[mask].mean()) for k, v in components.items()
                                  if k != "general" and (source == "general" or k not in GENERAL_SCORERS)})
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        **{f"reward/{k}": float(v.mean()) for k, v in components.items()},
        **by_source,
        **stats,
        "rollout/sequences": float(len(samples)),
        "rollout/sequences_per_rank": float(share.stop - share.start),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/clipped_ratio": sum(s.finish_reason == "length" for s in samples) / len(samples),
        # Rollout tokens of all engines per second of (parallel) rollout time.
        "perf/tokens_per_s": float(lengths.sum()) / max(rollout_seconds, 1e-9),
        **{f"train/{k}": v for k, v in train.items()},
        **sync,
    }


def _save_rollouts(run_dir: Path, step: int, samples: list[Sample], rewards, advantages) -> None:
    """`rollouts/step_NNNNNN.jsonl`: every sampled sequence of a step, with where it came from."""
    out = run_dir / "rollouts"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"step_{step:06d}.jsonl", "w") as f:
        for s, r, a in zip(samples, rewards.tolist(), advantages.tolist()):
            row = {"prompt": s.prompt, "engine": s.engine, "prompt_ids": s.prompt_ids, "response_ids": s.response_ids,
                   "finish_reason": s.finish_reason, "reward": r, "advantage": a}
            f.write(json.dumps(row) + "\n")


def run(cfg: StageConfig) -> dict:
    """Run R1-Zero GRPO as configured (every rank of the job calls it); returns the summary
    (also written to summary.json) on rank 0."""
    distributed.init_distributed(cfg.parallel, cfg.seed)
    ckpt.require_async_support(cfg.checkpoint.async_save)
    preemption = PreemptionWatch()  # from here on SIGUSR1/SIGTERM mean: finish the step, save, exit
    main = distributed.is_main()
    run_dir = Path(cfg.logging.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    hf_dir, base_seconds = prepare_base_model(cfg)
    wall_start = time.perf_counter()  # pretraining the base is its own stage: the RL clock starts here
    tokenizer = load_tokenizer(hf_dir)

    policy = Policy(*_build_policy(cfg, hf_dir))
    train_set = load_prompts(cfg.data, "train", tokenizer)
    eval_set = load_prompts(cfg.data, "eval", tokenizer)
    general_set = load_general_prompts(cfg.data, tokenizer) if cfg.data.general_share > 0 else None
    sampler = MixedSampler(train_set, general_set, cfg.grpo.prompts_per_step, cfg.data.general_share, seed=cfg.seed)
    reward_fn = RewardFn(cfg.reward)
    metrics = MetricsLogger(run_dir, enabled=main, tensorboard=cfg.logging.tensorboard)
    start_step, prior_wall, base_accuracy = _resume(cfg, ckpt_dir, policy, sampler, metrics)
    from_megatron = start_step == 0 and _load_megatron_weights(cfg, policy)

    _check_batch_fits(cfg, EngineLayout.from_config(cfg.rollout, dist.get_world_size(), dist.get_rank()), len(eval_set.items))
    engine = VLLMEngine(cfg.rollout, str(hf_dir))  # one worker on every rank
    platform.install_cuda_stand_ins()  # vLLM's CPU worker replaces torch.cuda's streams/events
    syncer = WeightSync(engine, cfg.rollout.sync_bucket_mb)
    general = GeneralReward(cfg, engine, tokenizer) if general_set is not None else None
    if general is not None and main:
        log.info("general prompts: %d, %d per step, rewarded by the %s (weight %g)", len(general_set),
                 sampler.general.batch_size, general.kind.replace("_", " "), general.weight)
    if main:
        log.info("policy: %s parameters on %s; %s", f"{num_parameters(policy.model):,}", platform.describe(), engine.layout.describe())
    probe = _make_probe(cfg, engine, tokenizer, eval_set, policy.model)
    if start_step > 0 or from_megatron:  # the engines loaded the HF weights; bring them to the policy
        sync_phase(engine, policy.model, policy.model_cfg, syncer, probe, 0, 1, policy.reference)

    def run_eval(step: int):
        return evaluate(engine, tokenizer, eval_set.items, reward_fn, cfg.rollout.max_response_tokens,
                        cfg.logging.eval_samples, cfg.rollout.temperature, seed=cfg.seed + step, stop=cfg.rollout.stop)

    if base_accuracy is None:
        base = run_eval(0)
        base_accuracy = base.accuracy
        metrics.log(0, base.metrics(cfg.logging.eval_samples))
        if main:
            log.info("base model: held-out accuracy %.1f %%, format %.1f %%, %.1f tokens; e.g. %r",
                     100 * base.accuracy, 100 * base.format_rate, base.length_mean, base.samples[0]["response"][:120])

    timer = PhaseTimer()
    guard = RunGuard(cfg.optimizer.max_nonfinite_steps, cfg.reward.max_failure_rate, cfg.reward.failure_patience)
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="GRPO", disable=not (main and cfg.logging.progress_bar), dynamic_ncols=True)
    last_eval = None
    for step in bar:
        ckpt.finish_pending_saves()  # an asynchronous save written in the background: rename it now
        # 1-2. rollout and reward: each engine its share of the prompts; whole groups on every rank
        sampled, sampling_stats, timings = rollout_phase(cfg, engine, tokenizer, sampler, reward_fn, step, general)
        for phase, seconds in timings.items():
            timer.seconds[phase] += seconds
        if not sampled["samples"]:  # dynamic sampling found no group with signal: nothing to learn
            metrics.log(step + 1, {**sampling_stats, **timer.finish()})
            continue
        samples, rewards = sampled["samples"], sampled["rewards"]
        # 3. advantages, over whole groups; then this data-parallel rank's part of the batch
        advantages = group_advantages(rewards, cfg.rollout.n_samples_per_prompt, scale_by_std=cfg.grpo.scale_advantages_by_std)
        share = data_parallel_share(len(samples), "raise grpo.prompts_per_step or rollout.n_samples_per_prompt")
        batch = make_batch(samples[share], advantages[share], tokenizer.pad_token_id)
        if main and cfg.logging.save_rollouts:
            _save_rollouts(run_dir, step + 1, samples, rewards, advantages)
        # 4-5. logprobs and policy update, with the engine's device memory handed to the trainer
        engine.sleep()
        train_metrics = update_phase(cfg, policy.ddp, policy.optimizer, policy.scheduler, policy.reference, batch, timer)
        # 6. every rank refits its own worker, then the parity probe
        with timer("sync"):
            sync_metrics = sync_phase(engine, policy.model, policy.model_cfg, syncer, probe, step + 1, cfg.rollout.probe_every, policy.reference)
        # 7. metrics, evaluation, checkpoint
        row = _step_row(rewards, sampled["lengths"], sampled["components"], samples, share, sampling_stats,
                        train_metrics, sync_metrics, timings["rollout"])
        done = step + 1
        if cfg.logging.eval_every and done % cfg.logging.eval_every == 0 or done == cfg.steps:
            with timer("eval"):
                last_eval = run_eval(done)
            row.update(last_eval.metrics(cfg.logging.eval_samples))
        stop = preemption.stop_requested(done)  # a signal reached some rank: save this step, then exit
        # Updates skipped for inf/nan, or rewards that keep failing: save the last good state and stop.
        halt = guard.update(train_metrics.get("nonfinite", 0.0), sampling_stats["reward/failures"], len(samples))
        if stop or halt or cfg.checkpoint.save_every and done % cfg.checkpoint.save_every == 0 or done == cfg.steps:
            with timer("checkpoint"):
                wall = prior_wall + time.perf_counter() - wall_start
                ckpt.save_checkpoint(ckpt_dir, done, policy.ddp, policy.optimizer, policy.scheduler,
                                     {"sampler": sampler.state_dict(), "wall_seconds": wall, "base_accuracy": base_accuracy,
                                      "model_info": model_info(policy.model_cfg, hf_dir)},
                                     keep_last=cfg.checkpoint.keep_last, verify=cfg.checkpoint.verify,
                                     # the last save before an exit must be complete when the process leaves
                                     async_save=cfg.checkpoint.async_save and not (stop or halt or done == cfg.steps))
        row.update(timer.finish())
        row["time/wall"] = prior_wall + time.perf_counter() - wall_start
        metrics.log(done, row)
        bar.set_postfix(reward=f"{row['reward/mean']:.2f}", acc=f"{row.get('reward/accuracy', 0):.2f}", len=f"{row['response/length_mean']:.0f}")
        if stop:
            raise Preempted(f"step {done} of {cfg.steps} is saved in {ckpt_dir}; rerun the same command to resume")
        if halt:
            raise TrainingHalted(f"stopped at step {done}: {halt}; the last good state is saved in {ckpt_dir}")
    bar.close()
    preemption.close()

    if last_eval is None:  # resumed at the end: evaluate what we have
        last_eval = run_eval(cfg.steps)
    engine.shutdown()
    wall = prior_wall + time.perf_counter() - wall_start
    return _finish(cfg, run_dir, policy.model, policy.model_cfg, hf_dir, metrics, base_accuracy, last_eval, wall, base_seconds, engine.layout,
                   len(eval_set.items))


def _check_batch_fits(cfg: StageConfig, layout: EngineLayout, eval_prompts: int) -> None:
    """Every engine needs at least one prompt per step and per evaluation, every trainer
    data-parallel rank at least one sequence."""
    from megatron.core import parallel_state

    engines, dp = layout.num_engines, parallel_state.get_data_parallel_world_size()
    sequences = cfg.grpo.prompts_per_step * cfg.rollout.n_samples_per_prompt
    if sequences < dp * cfg.grpo.updates_per_rollout:
        # Every data-parallel rank must take the same number of optimizer steps.
        raise ConfigError(
            f"{sequences} sequences per step cannot give each of {dp} data-parallel ranks "
            f"grpo.updates_per_rollout={cfg.grpo.updates_per_rollout} mini-batches; raise grpo.prompts_per_step"
        )
    if cfg.grpo.prompts_per_step < engines:
        raise ConfigError(f"grpo.prompts_per_step={cfg.grpo.prompts_per_step} leaves some of the {engines} rollout engines without a prompt; raise it to at least {engines}")
    if eval_prompts < engines:
        raise ConfigError(f"{eval_prompts} held-out prompts leave some of the {engines} rollout engines without one; raise data.eval_size")


def _make_probe(cfg, engine, tokenizer, eval_set, model):
    """The logprob parity probe: a fixed batch scored by every engine and by the trainer after each sync."""
    if not cfg.rollout.probe_every:
        return None
    prompts = [p.prompt_ids for p in eval_set.items[: cfg.rollout.probe_prompts]]

    def trainer_logprobs(sequences):
        width = max(len(s) for s in sequences)
        tokens = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
        for i, s in enumerate(sequences):
            tokens[i, : len(s)] = torch.tensor(s)
        lp = compute_logprobs(model, tokens, cfg.grpo.micro_batch_size)
        release_fp8_weight_caches(model)  # the engine is awake: this forward's FP8 caches must not stay
        return [lp[i, : len(s) - 1] for i, s in enumerate(sequences)]

    mean_threshold, max_threshold = probe_thresholds(cfg.rollout, engine.dtype)
    return ParityProbe(engine, trainer_logprobs, prompts, mean_threshold, max_threshold)


def _trainer_data_parallel_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def _finish(cfg, run_dir, model, model_cfg, base_dir, metrics, base_accuracy, final, wall, base_seconds, layout, eval_size: int) -> dict:
    """Export the policy, write summary.json and plot.png, print the table."""
    if cfg.checkpoint.export_hf:
        save_hf(model, model_cfg, run_dir / "hf", tokenizer_dir=base_dir)
    metrics.close()
    if not distributed.is_main():
        return {}
    from megatron_r1.train.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "time/step" in r]
    phases = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("time/") and k not in ("time/step", "time/wall"):
                phases[k[5:]] = phases.get(k[5:], 0.0) + v
    task = {"name": cfg.data.task, "options": cfg.data.task_options} if cfg.data.source == "reasoning_gym" else {"name": "jsonl", "path": cfg.data.train_path}
    summary = {
        "stage": cfg.name,
        "base_accuracy": base_accuracy,
        "final_accuracy": final.accuracy,
        "final_maj_accuracy": final.maj_accuracy,
        "final_format_rate": final.format_rate,
        "final_language_consistency": final.language_consistency,
        "final_response_length": final.length_mean,
        "steps": cfg.steps,
        "wall_seconds": round(wall, 1),  # RL only: checkpoints keep it across restarts
        "base_pretrain_seconds": round(base_seconds, 1),  # 0 unless this run pretrained the base
        "seconds_by_phase": {k: round(v, 1) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
        "task": task,
        "layout": {**layout.as_dict(), "data_parallel_size": _trainer_data_parallel_size()},
        "eval_size": eval_size,  # the held-out prompts used (jsonl files and dropped rows make it differ from data.eval_size)
        "prompt_template": TEMPLATES[cfg.data.template],
        "base_model": str(base_dir),
        "examples": final.samples,
        "config": to_dict(cfg),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_run(run_dir / "metrics.jsonl", run_dir / "plot.png", title=f"R1-Zero GRPO on {task['name']} ({cfg.steps} steps)")
    _print_table(summary, run_dir)
    return summary


def _print_table(s: dict, run_dir: Path) -> None:
    lines = [
        "",
        f"GRPO ({s['stage']}) finished: {run_dir}",
        f"  held-out accuracy   base {100 * s['base_accuracy']:5.1f} %  ->  final {100 * s['final_accuracy']:5.1f} %  (maj@k {100 * s['final_maj_accuracy']:.1f} %)",
        f"  format rate         {100 * s['final_format_rate']:.1f} %",
        f"  response length     {s['final_response_length']:.1f} tokens",
        f"  steps               {s['steps']}",
        "  layout              {world_size} rank(s): {rollout_engines} rollout engine(s) of TP {engine_tensor_parallel_size}, trainer DP {data_parallel_size}".format(**s["layout"]),
        f"  wall time           {s['wall_seconds']:.0f} s"
        + (f" (after {s['base_pretrain_seconds']:.0f} s pretraining the base model)" if s["base_pretrain_seconds"] else ""),
        "  time by phase       " + ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds_by_phase"].items()),
        f"  plot                {run_dir / 'plot.png'}",
        "",
    ]
    print("\n".join(lines), flush=True)
