"""Per-token KL estimators against the reference policy, and the policy's entropy.

The tokens were sampled from the current (old) policy, so ``KL(pi || pi_ref)`` is estimated from
the two log-probabilities of each sampled token (J. Schulman, "Approximating KL Divergence").
With ``log_r = ref - logp``:

* ``k1 = -log_r``: unbiased, high variance, can be negative per token.
* ``k2 = 0.5 * log_r**2``: biased, low variance, always >= 0.
* ``k3 = exp(log_r) - log_r - 1``: unbiased, low variance, always >= 0 (GRPO's choice).

Reduce the per-token values with `losses.aggregate` like the policy loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")

# k3 grows like exp(log_r); clamping keeps one token the reference finds very likely from
# dominating (and overflowing) the whole penalty.
_MAX_LOG_RATIO = 20.0


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3", mask: Tensor | None = None) -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref); same shape as ``logprobs``.

    ``mask`` (response tokens) zeroes the log-ratio elsewhere *before* the nonlinearity: padding may
    hold inf/nan, and a later `where` would hide it in the forward only (0 * nan = nan in backward).
    """
    log_r = ref_logprobs.to(logprobs.dtype) - logprobs
    if mask is not None:
        log_r = torch.where(mask.bool(), log_r, torch.zeros((), dtype=log_r.dtype, device=log_r.device))
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        log_r = log_r.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return torch.exp(log_r) - log_r - 1.0
    raise ValueError(f"kl estimator {estimator!r} is not one of: {', '.join(KL_ESTIMATORS)}")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last dimension: ``[..., V] -> [...]``.

    ``H = logsumexp(z) - sum(softmax(z) * z)``, which avoids computing log(0) for tokens with
    vanishing probability. Computed in float32 (bf16 softmax sums are too coarse). The logits must
    cover the whole vocabulary: with tensor parallelism, gather them (or use a vocab-parallel
    entropy) first.
    """
    z = logits.float()
    probs = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (probs * z).sum(dim=-1)
