"""Correcting for the gap between the engine that sampled and the trainer that learns.

The rollout engine (vLLM: other kernels, other reduction order, maybe other precision) and the
trainer assign slightly different probabilities to the same tokens. GRPO's ratio uses the
trainer's ``old_logprobs``, but the tokens were drawn from the engine's distribution, so the
gradient is off-policy by ``w = pi_trainer_old / pi_engine`` per token. Left alone, rare tokens
where the two disagree a lot can dominate updates and collapse training (Yao et al., "Your
Efficient RL Framework Secretly Brings You Off-Policy RL Training", 2025; Liu et al., "When Speed
Kills Stability", 2025). The corrections, all with ``w`` treated as a constant:

* ``truncate`` (truncated importance sampling, TIS): multiply each token's loss by ``min(w, max)``;
* ``mask`` (masked importance sampling, MIS): drop tokens with ``w`` outside ``[min, max]``;
* ``level="sequence"``: the same with one weight per sequence, ``exp(mean_t log w)`` (the geometric
  mean, so long responses are not pushed out by length alone), applied to all its tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODES = ("none", "truncate", "mask")
LEVELS = ("token", "sequence")
_MAX_LOG_W = 20.0  # exp(20) ~ 5e8: beyond any threshold, and finite in fp32


def importance_weights(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    mask: Tensor,
    mode: str = "truncate",
    level: str = "token",
    w_max: float = 2.0,
    w_min: float = 0.0,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Per-token loss weights and the tokens kept, from the trainer's and the engine's log-probs.

    Args:
        old_logprobs: ``[B, T]`` the trainer's log-probs of the sampled tokens before the update.
        rollout_logprobs: ``[B, T]`` the engine's log-probs of the same tokens.
        mask: ``[B, T]`` response tokens (other positions may hold garbage).
        mode: ``none`` (weights 1; metrics only), ``truncate`` or ``mask``.
        level: ``token`` or ``sequence``.
        w_max, w_min: truncation cap / mask bounds (``w_min`` is used by ``mask`` only).

    Returns:
        ``(weights, keep, metrics)``: ``weights [B, T]`` (0 on dropped and non-response tokens),
        ``keep [B, T]`` bool (response tokens not masked out), and detached metrics over the
        response tokens: ``mismatch_kl`` (k3 estimate of KL(engine || trainer)), ``mismatch_abs_diff``
        (mean ``|log pi_trainer - log pi_engine|``: the parity probe's measure, on the sampled tokens), ``is_ratio_mean``,
        quantiles ``is_ratio_p05/p50/p95``, ``is_ratio_max``, ``is_masked_share``.
    """
    if mode not in MODES:
        raise ValueError(f"mismatch correction mode={mode!r} is not one of: {', '.join(MODES)}")
    if level not in LEVELS:
        raise ValueError(f"mismatch correction level={level!r} is not one of: {', '.join(LEVELS)}")
    response = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=old_logprobs.device)
    log_w = torch.where(response, old_logprobs.float() - rollout_logprobs.float(), zero).clamp(-_MAX_LOG_W, _MAX_LOG_W)
    if level == "sequence":
        lengths = response.sum(dim=-1, keepdim=True).clamp(min=1)
        log_w = (log_w.sum(dim=-1, keepdim=True) / lengths).expand_as(log_w)
    w = torch.exp(log_w)

    keep = response.clone()
    if mode == "truncate":
        weights = w.clamp(max=w_max)
    elif mode == "mask":
        keep &= (w >= w_min) & (w <= w_max)
        weights = torch.ones_like(w)
    else:
        weights = torch.ones_like(w)
    weights = torch.where(keep, weights, zero)

    with torch.no_grad():
        token_log_w = torch.where(response, old_logprobs.float() - rollout_logprobs.float(), zero).clamp(-_MAX_LOG_W, _MAX_LOG_W)
        n = response.sum().clamp(min=1)
        # k3 of KL(engine || trainer): the samples come from the engine, log(pi_t / pi_e) = log_w.
        k3 = torch.expm1(token_log_w) - token_log_w  # expm1: no rounding below 0 for tiny gaps
        ratios = w[response] if response.any() else torch.ones(1, device=w.device)
        q = torch.quantile(ratios.float(), torch.tensor([0.05, 0.5, 0.95], device=w.device))
        metrics = {
            "mismatch_kl": torch.where(response, k3, zero).sum() / n,
            "mismatch_abs_diff": token_log_w.abs().sum() / n,  # 0 off the response tokens already
            "is_ratio_mean": ratios.mean(),
            "is_ratio_p05": q[0],
            "is_ratio_p50": q[1],
            "is_ratio_p95": q[2],
            "is_ratio_max": ratios.max(),
            "is_masked_share": (response & ~keep).sum() / n,
        }
    return weights.detach(), keep, metrics
