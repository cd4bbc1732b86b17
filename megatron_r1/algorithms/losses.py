"""The clipped policy-gradient loss and the token aggregation shared by every loss term.

Shapes: ``B`` sequences (responses), ``T`` response positions. ``mask[b, t]`` is 1 for a real
response token and 0 for prompt or padding positions, whose values may be garbage.

Gradient accumulation: the trainer splits a batch into micro-batches and sums their gradients.
A per-micro-batch mean would weight tokens of short micro-batches more than the full-batch loss
does, so every aggregation accepts ``global_denominator``: the denominator of the *whole* batch
(see `loss_denominator`). With it, the sum of the micro-batch losses equals the full-batch loss
exactly, and so do the gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# exp() of a log-ratio beyond this is inf in fp32-adjacent dtypes; such a ratio is clipped anyway
# for one sign of the advantage, and without the clamp one wild token turns the loss into nan.
_MAX_LOG_RATIO = 20.0


def _check_mode(loss_agg: str) -> None:
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg={loss_agg!r} is not one of: {', '.join(LOSS_AGG_MODES)}")


def loss_denominator(mask: Tensor, loss_agg: str) -> Tensor:
    """The denominator `aggregate` uses for this batch: response tokens for ``token-mean``,
    sequences for the ``seq-mean-*`` modes.

    Compute it on the full batch (summed over data-parallel ranks if the loss should be a global
    mean) and pass it as ``global_denominator`` to every micro-batch.
    """
    _check_mode(loss_agg)
    if loss_agg == "token-mean":
        return mask.to(torch.float32).sum()
    return torch.tensor(float(mask.shape[0]), device=mask.device)


def aggregate(
    values: Tensor,
    mask: Tensor,
    loss_agg: str,
    max_response_tokens: int | None = None,
    global_denominator: float | Tensor | None = None,
) -> Tensor:
    """Reduce per-token ``values [B, T]`` over the response tokens to a scalar.

    Modes:
      * ``token-mean``: sum over all response tokens / number of response tokens. Every token
        weighs the same, so long responses dominate (DAPO's choice).
      * ``seq-mean-token-mean``: mean over each sequence's tokens, then mean over sequences
        (original GRPO). Every sequence weighs the same, so tokens of long ones weigh less.
      * ``seq-mean-token-sum-norm``: sum over each sequence's tokens / ``max_response_tokens``
        (a constant), then mean over sequences (Dr. GRPO): no length bias in either direction.

    ``global_denominator`` (> 0) replaces the batch's own token count (``token-mean``) or sequence
    count (``seq-mean-*``), so that micro-batch results add up to the full-batch result. A sequence
    without response tokens counts as a sequence (contributing 0) in the ``seq-mean-*`` modes.
    """
    _check_mode(loss_agg)
    keep = mask.bool()
    # where(), not multiplication: masked positions may hold inf/nan and inf * 0 is nan.
    masked = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if loss_agg == "token-mean":
        return masked.sum() / _denominator(keep.sum(), global_denominator, values)

    per_seq = masked.sum(dim=-1)
    if loss_agg == "seq-mean-token-mean":
        per_seq = per_seq / keep.sum(dim=-1).clamp(min=1).to(values.dtype)
    else:
        if max_response_tokens is None or max_response_tokens <= 0:
            raise ValueError("loss_agg='seq-mean-token-sum-norm' needs max_response_tokens > 0")
        per_seq = per_seq / max_response_tokens
    return per_seq.sum() / _denominator(per_seq.shape[0], global_denominator, values)


def _denominator(own_count: Tensor | int, global_denominator: float | Tensor | None, like: Tensor) -> Tensor:
    # The batch's own count is clamped so an all-padding micro-batch gives 0, not nan; a given
    # global denominator is used as is (the caller may scale it, e.g. by the data-parallel size).
    # A global denominator of 0 means the whole batch has nothing to learn from (every numerator is 0
    # too): the loss is 0, not 0/0.
    if global_denominator is None:
        return torch.as_tensor(own_count, device=like.device, dtype=like.dtype).clamp(min=1)
    den = torch.as_tensor(global_denominator, device=like.device, dtype=like.dtype)
    return torch.where(den > 0, den, torch.ones_like(den))


def _masked_mean(values: Tensor, keep: Tensor) -> Tensor:
    """Plain token mean for metrics (detached, local to this micro-batch)."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(keep, values, zero).sum() / keep.sum().clamp(min=1)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    loss_agg: str = "token-mean",
    max_response_tokens: int | None = None,
    global_denominator: float | Tensor | None = None,
    clip_ratio_c: float | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip surrogate with asymmetric bounds (DAPO's clip-higher), as a loss to minimise.

    Per token: ``ratio = exp(logprobs - old_logprobs)`` and
    ``loss = -min(ratio * A, clip(ratio, 1 - clip_eps_low, 1 + clip_eps_high) * A)``.
    A larger ``clip_eps_high`` lets unlikely tokens with positive advantage grow further, which
    keeps entropy from collapsing; the lower bound stays tight.

    Args:
        logprobs: ``[B, T]`` log-probabilities of the sampled tokens under the current policy
            (with grad).
        old_logprobs: ``[B, T]`` the same under the policy that sampled them (no grad).
        advantages: ``[B]`` one per sequence (broadcast over its tokens), or ``[B, T]``.
        mask: ``[B, T]`` response-token mask.
        clip_eps_low, clip_eps_high: the clip range is ``[1 - clip_eps_low, 1 + clip_eps_high]``.
        loss_agg, max_response_tokens, global_denominator: see `aggregate`.
        clip_ratio_c: dual-clip (Ye et al., 2020): for a negative advantage the per-token loss is
            capped at ``-clip_ratio_c * A`` (> 1, e.g. 3), so a token whose ratio has run far above
            1 cannot push the loss up linearly in the ratio. ``None``: off.
        is_weights: ``[B, T]`` constant per-token weights (the engine/trainer mismatch correction
            of `algorithms.mismatch`; 0 drops a token). ``None``: all 1.

    Returns:
        ``(loss, metrics)``; metrics are detached scalar tensors, token means over this call's
        mask: ``clip_fraction`` (tokens whose clipped branch was taken, i.e. no gradient),
        ``clip_fraction_low`` / ``clip_fraction_high`` (that branch on the lower / upper bound),
        ``ratio_mean``, ``ratio_max`` and ``approx_kl`` (k3 estimate of KL(old || current)).
    """
    keep = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(logprobs.dtype)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)

    log_ratio = torch.where(keep, logprobs - old_logprobs.to(logprobs.dtype), zero)
    log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
        dual = torch.minimum(per_token, -clip_ratio_c * advantages)
        per_token = torch.where(advantages < 0, dual, per_token)
    if is_weights is not None:
        per_token = per_token * is_weights.to(per_token.dtype)
    loss = aggregate(per_token, mask, loss_agg, max_response_tokens, global_denominator)

    with torch.no_grad():
        # The clipped branch "wins" where it is strictly smaller; there the gradient is zero.
        took_clip = (clipped < unclipped) & keep
        low = took_clip & (ratio < 1.0 - clip_eps_low)
        high = took_clip & (ratio > 1.0 + clip_eps_high)
        as_float = torch.ones((), dtype=logprobs.dtype, device=logprobs.device)
        metrics = {
            "clip_fraction": _masked_mean(took_clip * as_float, keep),
            "clip_fraction_low": _masked_mean(low * as_float, keep),
            "clip_fraction_high": _masked_mean(high * as_float, keep),
            "ratio_mean": _masked_mean(ratio, keep),
            # ratio > 0, so the zero fill never wins unless nothing is kept (then 0).
            "ratio_max": torch.where(keep, ratio, zero).amax(),
            "approx_kl": _masked_mean(ratio - 1.0 - log_ratio, keep),
        }
        if clip_ratio_c is not None:
            metrics["dual_clip_fraction"] = _masked_mean(((advantages < 0) & (-clip_ratio_c * advantages < -torch.minimum(unclipped, clipped)) & keep) * as_float, keep)
    return loss, {k: v.detach() for k, v in metrics.items()}
