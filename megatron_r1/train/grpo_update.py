"""The GRPO policy update: the trainer's batch of rollouts, the objective, and the mini-batched update.

The objective is the clipped surrogate of `algorithms.losses.policy_loss` with the engine/trainer
mismatch correction (`algorithms.mismatch`), an optional KL term against the reference model and an
optional entropy bonus, aggregated as `grpo.loss_agg` says.
"""

from __future__ import annotations

import time

import torch
from megatron.core.utils import get_model_config

from megatron_r1.algorithms import aggregate, importance_weights, kl_penalty, policy_loss
from megatron_r1.config import StageConfig
from megatron_r1.train import moe_routing
from megatron_r1.train.metrics import PhaseTimer
from megatron_r1.train.step import Batch, compute_logprobs, train_step


def make_batch(samples: list, advantages, pad_id, routing_layers: list[int] | None = None) -> Batch:
    """`samples` (`rollout.collect.Sample`: prompt_ids, response_ids, logprobs) as a trainer batch.
    Right-padded prompt+response tokens; the loss covers response tokens only. The engine's
    log-probs of the response tokens, when every sample has them, ride along target-aligned as
    `extras["rollout_logprobs"]` (the target of position t is token t + 1). The engine's routing,
    when every sample has it (R3), becomes `Batch.routing` for the MoE layers `routing_layers`
    (positions in the model's list of MoE layers: this pipeline stage's, `moe_routing.stage_moe_indices`)."""
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
    return Batch(tokens=tokens, loss_mask=mask, advantages=advantages.float(), extras=extras, routing=_engine_routing(samples, width, routing_layers))


def _engine_routing(samples: list, width: int, layers: list[int] | None):
    """`[B, width, L, k]` int16 from each sample's `[T, L_moe, k]` engine routing (None unless every
    sample has it). Positions the engine never ran (the last sampled token, right padding) get
    `moe_routing.pad_routes`: no trained logit depends on them."""
    if not samples or any(getattr(s, "routing", None) is None for s in samples):
        return None
    first = samples[0].routing
    layers = list(range(first.shape[1])) if layers is None else layers
    k = first.shape[2]
    routing = moe_routing.pad_routes(k).expand(len(samples), width, len(layers), k).clone()
    for i, s in enumerate(samples):
        rows = s.routing[:, layers]
        limit = len(s.prompt_ids) + len(s.response_ids)
        if rows.shape[0] > limit:
            raise ValueError(f"the engine's routing covers {rows.shape[0]} positions, the sequence has {limit}")
        routing[i, : rows.shape[0]] = rows.to(torch.int16)
    return routing


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
    (timed as the phases `logprob` and `train` when a timer is given).

    MoE routing replay (`grpo.routing_replay`, train/moe_routing.py): with `r3` the batch already
    carries the engine's routing, which the old-logprob pass and the updates replay; with `r2` the
    old-logprob pass records its routing for the updates to replay. The reference model always
    routes by itself."""
    timer = timer or PhaseTimer()
    mb = cfg.grpo.micro_batch_size
    replay = cfg.grpo.routing_replay
    if replay == "r3" and batch.routing is None:
        raise ValueError("grpo.routing_replay=r3 needs the engine's routing on every sample (rollout.collect.Sample.routing)")
    with timer("logprob"):
        if cfg.grpo.kl_beta > 0:
            batch.ref_logprobs = compute_logprobs(reference, batch.tokens, mb)
        if cfg.grpo.updates_per_rollout > 1:  # later mini-batches are off-policy: keep the sampler's logprobs
            if replay == "r2":
                batch.old_logprobs, batch.routing = compute_logprobs(ddp, batch.tokens, mb, record_routing=True)
            else:
                batch.old_logprobs = compute_logprobs(ddp, batch.tokens, mb, routing=batch.routing, real_tokens=batch.loss_mask > 0)
    metrics: dict[str, float] = {}
    parts = batch.split(cfg.grpo.updates_per_rollout)
    tokens, start = 0.0, time.perf_counter()
    with timer("train"):
        for part in parts:
            out = train_step(ddp, optimizer, scheduler, part, grpo_loss_fn(cfg), mb, with_entropy=True,
                             max_tokens=cfg.memory.max_tokens_per_microbatch)
            tokens += out["sequence_tokens"]
            for k, v in out.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / len(parts)
    # Real tokens (prompt + response, no padding) the update trained on per second, all trainer ranks
    # (a timing: the stage logs it as perf/train_tokens_per_s).
    metrics["tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
    if get_model_config(ddp).num_moe_experts:
        metrics["routing_replay"] = float(replay != "none")
    return metrics
