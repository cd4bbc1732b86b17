"""Hand-computed checks of the GRPO tensor math (advantages, losses, KL, sampling filters)."""

import math

import pytest
import torch

from megatron_r1.algorithms import (
    GroupAccumulator,
    aggregate,
    entropy_from_logits,
    group_advantages,
    groups_with_signal,
    kl_penalty,
    loss_denominator,
    overlong_penalty,
    policy_loss,
)

# --------------------------------------------------------------------------------------------
# advantages


def test_group_advantages_std_scaled():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 2.0])
    adv = group_advantages(rewards, group_size=4, eps=0.0)
    # group 1: mean 0.5, population std 0.5; group 2: mean 0.5, population std sqrt(0.75)
    s = math.sqrt(0.75)
    expected = torch.tensor([1.0, -1.0, -1.0, 1.0, -0.5 / s, -0.5 / s, -0.5 / s, 1.5 / s])
    torch.testing.assert_close(adv, expected)
    assert adv.shape == rewards.shape


def test_group_advantages_dr_grpo_and_2d_shape():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    adv = group_advantages(rewards, group_size=4, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]))


def test_group_advantages_constant_group_is_zero_not_nan():
    adv = group_advantages(torch.tensor([2.0, 2.0, 2.0]), group_size=3)
    torch.testing.assert_close(adv, torch.zeros(3))
    # G = 1: population std is 0, advantage 0 (the unbiased std would be nan)
    torch.testing.assert_close(group_advantages(torch.tensor([5.0, 1.0]), group_size=1), torch.zeros(2))


def test_group_advantages_rejects_bad_shapes():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(7), group_size=4)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(2, 3), group_size=4)


# --------------------------------------------------------------------------------------------
# policy loss

# Ratios chosen so that each clip case appears once (old logprobs 0, so logprobs = log ratio):
#   seq 0, A = +1: ratio 1.0 (inside), 1.5 (clipped at 1 + eps_high), 0.5 (below, but A > 0: not clipped)
#   seq 1, A = -2: ratio 1.1 (inside), 0.7 (clipped at 1 - eps_low), padding (nan, masked out)
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 1.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -2.0])
# per-token losses -min(r*A, clip(r)*A) with eps_low=0.2, eps_high=0.28
PER_TOKEN = [[-1.0, -1.28, -0.5], [2.2, 1.6]]


def _inputs():
    logprobs = RATIOS.log().clone()
    logprobs[1, 2] = float("nan")  # garbage at a padding position must not leak into the loss
    logprobs.requires_grad_(True)
    return logprobs, torch.zeros(2, 3)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", (-1.0 - 1.28 - 0.5 + 2.2 + 1.6) / 5),
        ("seq-mean-token-mean", ((-1.0 - 1.28 - 0.5) / 3 + (2.2 + 1.6) / 2) / 2),
        ("seq-mean-token-sum-norm", ((-1.0 - 1.28 - 0.5) / 4 + (2.2 + 1.6) / 4) / 2),
    ],
)
def test_policy_loss_modes(mode, expected):
    logprobs, old = _inputs()
    loss, metrics = policy_loss(logprobs, old, ADV, MASK, 0.2, 0.28, mode, max_response_tokens=4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 5)
    assert metrics["clip_fraction_low"].item() == pytest.approx(1 / 5)
    assert metrics["clip_fraction_high"].item() == pytest.approx(1 / 5)
    assert metrics["ratio_mean"].item() == pytest.approx((1.0 + 1.5 + 0.5 + 1.1 + 0.7) / 5)
    assert metrics["ratio_max"].item() == pytest.approx(1.5)
    approx_kl = sum(r - 1 - math.log(r) for r in (1.0, 1.5, 0.5, 1.1, 0.7)) / 5
    assert metrics["approx_kl"].item() == pytest.approx(approx_kl, rel=1e-5)


def test_policy_loss_gradient_is_zero_on_clipped_tokens():
    logprobs, old = _inputs()
    loss, _ = policy_loss(logprobs, old, ADV, MASK, 0.2, 0.28, "token-mean")
    loss.backward()
    # d(-r*A)/d(logp) = -A*r, divided by the 5 tokens; clipped and padding tokens get 0.
    expected = torch.tensor([[-1.0 / 5, 0.0, -0.5 / 5], [2.0 * 1.1 / 5, 0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected)


def test_clip_higher_uses_the_two_eps_separately():
    def token_losses(eps_low, eps_high):
        logprobs, old = _inputs()
        # token-mean over a one-token mask is that token's loss
        out = torch.zeros(2, 3)
        for b in range(2):
            for t in range(3 if b == 0 else 2):
                m = torch.zeros(2, 3, dtype=torch.long)
                m[b, t] = 1
                out[b, t] = policy_loss(logprobs, old, ADV, m, eps_low, eps_high, "token-mean")[0]
        return out

    base = token_losses(0.2, 0.28)
    torch.testing.assert_close(base[0], torch.tensor(PER_TOKEN[0]))
    torch.testing.assert_close(base[1, :2], torch.tensor(PER_TOKEN[1]))
    # Only the upper bound moves the ratio-1.5 token; only the lower bound moves the ratio-0.7 token.
    high = token_losses(0.2, 0.4)
    assert high[0, 1].item() == pytest.approx(-1.4)
    assert high[1, 1].item() == pytest.approx(1.6)
    low = token_losses(0.1, 0.28)
    assert low[0, 1].item() == pytest.approx(-1.28)
    assert low[1, 1].item() == pytest.approx(1.8)


def test_seq_mean_token_sum_norm_needs_max_tokens():
    logprobs, old = _inputs()
    with pytest.raises(ValueError, match="max_response_tokens"):
        policy_loss(logprobs, old, ADV, MASK, 0.2, 0.2, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate(torch.zeros(2, 3), MASK, "sum")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_sum_to_the_full_batch_loss(mode):
    gen = torch.Generator().manual_seed(0)
    B, T = 6, 7
    logprobs = (-torch.rand(B, T, generator=gen) * 2).requires_grad_(True)
    old = logprobs.detach() + 0.3 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, generator=gen)
    lengths = torch.tensor([7, 1, 4, 0, 6, 3])  # includes an empty response
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, loss_agg=mode, max_response_tokens=8)

    full, _ = policy_loss(logprobs, old, adv, mask, **kwargs)
    (full_grad,) = torch.autograd.grad(full, logprobs)

    denom = loss_denominator(mask, mode)
    total, naive = 0.0, 0.0
    for sl in (slice(0, 2), slice(2, 5), slice(5, 6)):
        part, _ = policy_loss(logprobs[sl], old[sl], adv[sl], mask[sl], global_denominator=denom, **kwargs)
        total = total + part
        naive = naive + policy_loss(logprobs[sl], old[sl], adv[sl], mask[sl], **kwargs)[0]
    (acc_grad,) = torch.autograd.grad(total, logprobs)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(acc_grad, full_grad)
    # Without the global denominator the micro-batch means do not add up: the property is not vacuous.
    assert not torch.allclose(naive, full)


def test_aggregate_on_other_terms_and_denominators():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("inf"), 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(7 / 3)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum-norm", 10).item() == pytest.approx((0.3 + 0.4) / 2)
    assert aggregate(values, mask, "token-mean", global_denominator=7).item() == pytest.approx(1.0)
    assert loss_denominator(mask, "token-mean").item() == 3
    assert loss_denominator(mask, "seq-mean-token-mean").item() == 2


# --------------------------------------------------------------------------------------------
# KL and entropy


def test_kl_estimators():
    logp = torch.tensor([0.0, -1.0])
    ref = torch.tensor([-1.0, 0.0])  # log_r = ref - logp = [-1, 1]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.5, 0.5]))
    k3 = torch.tensor([math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1])
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), k3)
    # identical policies: every estimator is exactly 0
    for est in ("k1", "k2", "k3"):
        assert kl_penalty(logp, logp, est).abs().max().item() == 0.0
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


def test_entropy_from_logits():
    logits = torch.stack(
        [
            torch.zeros(4),  # uniform over 4: log 4
            torch.tensor([0.0, -1e4, -1e4, -1e4]),  # one-hot: 0
            torch.log(torch.tensor([0.25, 0.75, 1e-30, 1e-30])),  # two-way
        ]
    )
    expected = torch.tensor([math.log(4), 0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])
    torch.testing.assert_close(entropy_from_logits(logits), expected, atol=1e-5, rtol=1e-5)
    assert entropy_from_logits(torch.zeros(2, 3, 5)).shape == (2, 3)


# --------------------------------------------------------------------------------------------
# dynamic sampling and overlong penalty


def test_groups_with_signal():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [2.0, 2.0, 2.0]])
    assert groups_with_signal(rewards).tolist() == [False, True, False]
    assert groups_with_signal(torch.tensor([[0.0, 0.05]]), atol=0.1).tolist() == [False]


def test_group_accumulator_fills_target_across_rounds():
    acc = GroupAccumulator(target_groups=3, max_rounds=3)
    acc.add(torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]), ["a", "b", "c"])
    assert (acc.kept, acc.needed, acc.dropped, acc.done) == (2, 1, 1, False)
    keep = acc.add(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]), ["d", "e", "f"])
    assert keep.tolist() == [True, True, False]
    assert acc.done
    groups, rewards = acc.result()
    assert groups == ["b", "c", "d"]
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    assert acc.stats() == {"rounds": 2, "kept": 3, "dropped": 2, "surplus": 1}
    with pytest.raises(RuntimeError):
        acc.add(torch.tensor([[0.0, 1.0]]), ["g"])


def test_group_accumulator_round_cap():
    acc = GroupAccumulator(target_groups=5, max_rounds=2)
    while not acc.done:
        acc.add(torch.ones(4, 3), list(range(4)))
    groups, rewards = acc.result()
    assert groups == [] and rewards.numel() == 0
    assert acc.stats() == {"rounds": 2, "kept": 0, "dropped": 8, "surplus": 0}


def test_group_accumulator_without_filtering():
    # dynamic sampling off: one round, everything kept, constant groups included
    acc = GroupAccumulator(target_groups=2, max_rounds=1)
    acc.add(torch.ones(2, 3), ["a", "b"], keep=torch.ones(2, dtype=torch.bool))
    assert acc.done and acc.result()[0] == ["a", "b"] and acc.dropped == 0


def test_overlong_penalty():
    lengths = torch.tensor([0, 6, 7, 8, 10, 12])
    torch.testing.assert_close(
        overlong_penalty(lengths, max_tokens=10, buffer_tokens=4, penalty=1.0),
        torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]),
    )
    torch.testing.assert_close(
        overlong_penalty(lengths, max_tokens=10, buffer_tokens=4, penalty=0.5),
        torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]),
    )
    torch.testing.assert_close(overlong_penalty(lengths, 10, 0, 1.0), torch.zeros(6))


# --------------------------------------------------------------------------------------------
# numerics under edge cases


@pytest.mark.parametrize("value", [0.7, 0.1, 0.3, 1.1, 0.9, 2.7])
@pytest.mark.parametrize("group_size", [2, 3, 4, 5, 6, 7, 8, 16])
def test_all_equal_group_has_exactly_zero_advantage(value, group_size):
    rewards = torch.full((2 * group_size,), value)
    rewards[group_size:] = torch.arange(group_size) % 2  # a group with signal beside it
    adv = group_advantages(rewards, group_size)
    assert torch.equal(adv[:group_size], torch.zeros(group_size))
    assert adv[group_size:].abs().sum() > 0
    assert group_advantages(rewards[:group_size], group_size, scale_by_std=False).abs().max() == 0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_all_masked_batch_gives_zero_loss_and_finite_gradient(mode):
    logprobs = torch.randn(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3)
    den = loss_denominator(mask, mode)
    loss, _ = policy_loss(logprobs, torch.full((2, 3), float("nan")), torch.ones(2), mask, 0.2, 0.2, mode,
                          max_response_tokens=3, global_denominator=den if mode == "token-mean" else None)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logprobs.grad).all()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_gradient_is_finite_under_garbage_padding(estimator):
    logprobs = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, float("nan"), float("-inf")]])
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    per_token = kl_penalty(logprobs, ref, estimator, mask=mask)
    aggregate(per_token, mask, "token-mean").backward()
    assert torch.isfinite(logprobs.grad).all()
    log_r = -0.5
    expected = {"k1": 0.5, "k2": 0.5 * log_r**2, "k3": math.exp(log_r) - log_r - 1}[estimator]
    assert per_token[0, 0].item() == pytest.approx(expected)
    assert logprobs.grad[0, 1:].abs().sum() == 0


def test_dual_clip_caps_the_loss_of_negative_advantages():
    old = torch.zeros(1, 3)
    logprobs = torch.log(torch.tensor([[5.0, 0.5, 5.0]])).requires_grad_(True)
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3)
    plain, _ = policy_loss(logprobs, old, adv, mask, 0.2, 0.2, "token-mean")
    dual, metrics = policy_loss(logprobs, old, adv, mask, 0.2, 0.2, "token-mean", clip_ratio_c=3.0)
    # token 0: ratio 5, A = -1 -> PPO loss 5, dual-clip caps it at 3 (no gradient);
    # token 1: ratio 0.5 -> clipped at 0.8 -> 0.8, under the cap; token 2: A > 0 -> -min(5, 1.2) = -1.2.
    assert plain.item() == pytest.approx((5 + 0.8 - 1.2) / 3)
    assert dual.item() == pytest.approx((3 + 0.8 - 1.2) / 3)
    assert metrics["dual_clip_fraction"].item() == pytest.approx(1 / 3)
    dual.backward()
    assert logprobs.grad[0, 0] == 0
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        policy_loss(logprobs, old, adv, mask, 0.2, 0.2, clip_ratio_c=1.0)


def test_importance_weights_truncate_mask_and_sequence_level():
    from megatron_r1.algorithms.mismatch import importance_weights

    old = torch.log(torch.tensor([[0.5, 0.4, 0.9], [0.2, 0.2, 0.2]]))
    engine = torch.log(torch.tensor([[0.5, 0.1, 0.3], [0.4, 0.1, 0.2]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # token ratios old/engine: [1, 4, 3], [0.5, 2, (pad)]
    w, keep, m = importance_weights(old, engine, mask, "truncate", "token", w_max=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 2.0], [0.5, 2.0, 0.0]]))
    assert keep.tolist() == [[True, True, True], [True, True, False]]
    assert m["is_ratio_max"].item() == pytest.approx(4.0) and m["is_masked_share"].item() == 0
    assert m["is_ratio_p50"].item() == pytest.approx(2.0)
    expected_kl = sum(r - math.log(r) - 1 for r in (1, 4, 3, 0.5, 2)) / 5
    assert m["mismatch_kl"].item() == pytest.approx(expected_kl, rel=1e-5)
    assert m["mismatch_abs_diff"].item() == pytest.approx(sum(abs(math.log(r)) for r in (1, 4, 3, 0.5, 2)) / 5, rel=1e-5)

    w, keep, m = importance_weights(old, engine, mask, "mask", "token", w_max=2.5, w_min=0.6)
    assert keep.tolist() == [[True, False, False], [False, True, False]]
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert m["is_masked_share"].item() == pytest.approx(3 / 5)

    # sequence level: geometric mean of the token ratios; (1*4*3)^(1/3) = 2.289, (0.5*2)^(1/2) = 1
    w, keep, _ = importance_weights(old, engine, mask, "mask", "sequence", w_max=2.0)
    assert keep.tolist() == [[False, False, False], [True, True, False]]
    w, _, _ = importance_weights(old, engine, mask, "truncate", "sequence", w_max=5.0)
    torch.testing.assert_close(w[0], torch.full((3,), 12 ** (1 / 3)))


def test_policy_loss_applies_importance_weights():
    logprobs = torch.zeros(1, 2, requires_grad=True)
    adv = torch.ones(1)
    mask = torch.ones(1, 2)
    loss, _ = policy_loss(logprobs, torch.zeros(1, 2), adv, mask, 0.2, 0.2, is_weights=torch.tensor([[2.0, 0.0]]))
    assert loss.item() == pytest.approx(-1.0)  # (-1 * 2 + -1 * 0) / 2 tokens
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0, 0.0]]))


def test_run_guard_stops_after_n_bad_steps_in_a_row():
    from megatron_r1.train.guards import RunGuard

    guard = RunGuard(max_nonfinite_steps=3, max_failure_rate=0.5, failure_patience=2)
    assert guard.update(1.0, 0, 8) is None and guard.update(1.0, 0, 8) is None
    assert guard.update(0.0, 0, 8) is None  # a good step resets the count
    assert guard.update(0.5, 0, 8) is None and guard.update(1.0, 0, 8) is None
    assert "3 steps in a row had a non-finite" in guard.update(1.0, 0, 8)
    assert guard.nonfinite_total == 5
    rewards = RunGuard(max_nonfinite_steps=0, max_failure_rate=0.5, failure_patience=2)
    assert rewards.update(0, 5, 8) is None and rewards.update(0, 4, 8) is None  # 4/8 is not above 0.5
    assert rewards.update(0, 6, 8) is None
    assert "reward failed on 88% of the sequences for 2 steps" in rewards.update(0, 7, 8)
