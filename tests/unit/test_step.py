"""Megatron forward/backward on one CPU rank: log-probabilities, micro-batching, Adam steps, lr schedule."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_r1.config import ConfigError, ModelConfig, OptimizerConfig, ParallelConfig
from megatron_r1.distributed import init_distributed
from megatron_r1.models.build import build_model
from megatron_r1.train.optim import build_optimizer, current_lr
from megatron_r1.train.step import (
    Batch,
    MicroBatch,
    compute_logprobs,
    forward_backward,
    lm_loss_fn,
    token_entropy,
    token_logprobs,
    train_step,
)

PARALLEL = ParallelConfig()
SEED = 1234


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    # Idempotent: reuses a process group set up by a conftest fixture or an earlier test module.
    init_distributed(PARALLEL, seed=SEED)


def fresh(opt: OptimizerConfig | None = None, total_steps: int = 20):
    """A freshly initialised tiny model (same weights every call), wrapped for training."""
    init_distributed(PARALLEL, seed=SEED)  # re-seeds, so every model starts from the same weights
    model = build_model(ModelConfig(), PARALLEL)
    return build_optimizer(model, opt or OptimizerConfig(lr=1e-3, clip_grad=0.0), PARALLEL, total_steps)


def make_batch(batch_size: int = 4, seq_len: int = 12, seed: int = 0) -> Batch:
    """Random tokens; masks of different lengths, so token-mean and mean-of-means differ."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ModelConfig().vocab_size, (batch_size, seq_len), generator=g)
    mask = torch.zeros_like(tokens)
    for i in range(batch_size):
        start = 2 + i % 3
        mask[i, start : seq_len - i] = 1  # a "response" of varying length, right padding after it
    return Batch(tokens=tokens, loss_mask=mask)


def grads(ddp_model) -> list[torch.Tensor]:
    return [p.main_grad.detach().clone() for p in ddp_model.parameters()]


# --------------------------------------------------------------------------------------------


def test_token_logprobs_equal_log_softmax_gather():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 50, generator=g) * 3
    targets = torch.randint(0, 50, (3, 7), generator=g)
    before = logits.clone()
    expected = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, targets), expected, atol=1e-6, rtol=0)
    assert torch.equal(logits, before), "token_logprobs must not modify the logits"

    p = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(token_entropy(logits), -(p * p.log()).sum(-1), atol=1e-5, rtol=0)


def test_token_logprobs_backward_matches_autograd_reference():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 5, 30, generator=g)).requires_grad_()
    targets = torch.randint(0, 30, (2, 5), generator=g)
    (token_logprobs(logits, targets).sum() + token_entropy(logits).sum()).backward()
    ours = logits.grad.clone()
    ref = logits.detach().clone().requires_grad_()
    logp = torch.log_softmax(ref, -1)
    (logp.gather(-1, targets.unsqueeze(-1)).sum() - (logp.exp() * logp).sum()).backward()
    torch.testing.assert_close(ours, ref.grad, atol=1e-5, rtol=0)


def test_compute_logprobs_matches_a_plain_forward():
    ddp, _, _ = fresh()
    batch = make_batch()
    lp = compute_logprobs(ddp, batch.tokens, micro_batch_size=3)  # 4 = 3 + 1: a ragged last micro-batch
    assert lp.shape == (4, 11) and lp.dtype == torch.float32
    with torch.no_grad():
        positions = torch.arange(12).expand(4, 12)
        logits = ddp.module(batch.tokens, positions, None)
    expected = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(lp, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(compute_logprobs(ddp.module, batch.tokens, 4), lp, atol=1e-6, rtol=0)


def test_micro_batch_size_does_not_change_loss_or_grads():
    ddp, _, _ = fresh()
    batch = make_batch()
    results = {}
    for mbs in (4, 2, 3, 1):
        ddp.zero_grad_buffer()
        metrics = forward_backward(ddp, batch, lm_loss_fn, micro_batch_size=mbs)
        results[mbs] = (metrics["loss"], grads(ddp))
    loss4, grads4 = results[4]
    assert any(g.abs().sum() > 0 for g in grads4)
    for mbs in (2, 3, 1):
        loss, gs = results[mbs]
        assert loss == pytest.approx(loss4, abs=1e-6)
        for a, b in zip(gs, grads4):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

    # The loss is the global token mean of the NLL over the masked targets.
    lp = compute_logprobs(ddp, batch.tokens, 4)
    mask = batch.loss_mask[:, 1:].float()
    assert loss4 == pytest.approx((-(lp * mask).sum() / mask.sum()).item(), abs=1e-5)


def test_loss_fn_sees_target_aligned_fields_and_entropy():
    ddp, _, _ = fresh()
    batch = make_batch()
    B, S = batch.tokens.shape
    batch.advantages = torch.arange(B, dtype=torch.float32)
    batch.old_logprobs = compute_logprobs(ddp, batch.tokens, 4)  # [B, S-1], target-aligned
    batch.extras = {"token_aligned": torch.arange(S).expand(B, S).float()}
    seen = []

    def loss_fn(logprobs, entropy, micro: MicroBatch):
        seen.append((tuple(micro.advantages.shape), tuple(micro.old_logprobs.shape), tuple(micro.ref_logprobs.shape) if micro.ref_logprobs is not None else None))
        assert logprobs.shape == micro.mask.shape == entropy.shape == micro.targets.shape == micro.old_logprobs.shape
        assert torch.equal(micro.targets, micro.tokens[:, 1:]) and torch.equal(micro.mask, micro.loss_mask[:, 1:].float())
        assert torch.equal(micro.extras["token_aligned"][0], torch.arange(1, S).float())  # shifted to the targets
        ratio = (logprobs - micro.old_logprobs).exp()
        per_token = -micro.advantages[:, None] * ratio - 0.01 * entropy
        loss = (per_token * micro.mask).sum() / micro.num_tokens
        mean_entropy = (entropy.detach() * micro.mask).sum() / micro.mask.sum()
        return loss, {"entropy": mean_entropy, "ratio": (ratio.detach() * micro.mask).sum() / micro.mask.sum()}

    ddp.zero_grad_buffer()
    metrics = forward_backward(ddp, batch, loss_fn, micro_batch_size=2, with_entropy=True)
    assert seen == [((2,), (2, S - 1), None)] * 2
    assert 0 < metrics["entropy"] <= math.log(ModelConfig().vocab_size) + 1e-4
    assert metrics["ratio"] == pytest.approx(1.0, abs=1e-5)  # on-policy: the old policy is the current one
    assert metrics["num_tokens"] == batch.loss_mask[:, 1:].sum().item()


def test_metrics_are_token_weighted_means_of_the_whole_batch():
    ddp, _, _ = fresh()
    batch = make_batch(batch_size=6)
    lp = compute_logprobs(ddp, batch.tokens, 6)
    mask = batch.loss_mask[:, 1:].float()
    expected = ((lp * mask).sum() / mask.sum()).item()  # mean log-prob over all masked targets

    def loss_fn(logprobs, entropy, micro):
        mean_lp = (logprobs.detach() * micro.mask).sum() / micro.mask.sum()
        return lm_loss_fn(logprobs, entropy, micro)[0], {"mean_logprob": mean_lp, "constant": 3.0}

    for mbs in (6, 4, 1):  # micro-batches with different token counts
        metrics = forward_backward(ddp, batch, loss_fn, micro_batch_size=mbs, forward_only=True)
        assert metrics["mean_logprob"] == pytest.approx(expected, abs=1e-5)
        assert metrics["loss"] == pytest.approx(-expected, abs=1e-5)
        assert metrics["constant"] == pytest.approx(3.0)


def test_batch_rows_and_split_keep_fields_together():
    batch = make_batch(batch_size=5)
    batch.advantages = torch.arange(5.0)
    batch.extras = {"id": torch.arange(5)}
    parts = batch.split(2)
    assert [p.size for p in parts] == [2, 3] or [p.size for p in parts] == [3, 2]
    assert torch.equal(torch.cat([p.advantages for p in parts]), batch.advantages)
    assert torch.equal(torch.cat([p.extras["id"] for p in parts]), batch.extras["id"])
    assert torch.equal(torch.cat([p.tokens for p in parts]), batch.tokens)
    assert parts[0].old_logprobs is None


def test_adam_steps_lower_the_loss():
    ddp, opt, sched = fresh(OptimizerConfig(lr=1e-3, clip_grad=1.0))
    batch = make_batch(seed=3)
    losses = []
    for _ in range(4):
        m = train_step(ddp, opt, sched, batch, lm_loss_fn, micro_batch_size=2)
        assert m["update_successful"] == 1.0 and m["grad_norm"] > 0 and m["lr"] == pytest.approx(1e-3)
        losses.append(m["loss"])
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_lr_schedule_warmup_then_decay(style):
    lr, min_lr, warmup, total = 1e-3, 1e-4, 3, 11
    _, opt, sched = fresh(OptimizerConfig(lr=lr, min_lr=min_lr, lr_warmup_steps=warmup, lr_decay_style=style), total)

    def expected(step: int) -> float:
        if step <= warmup:  # Megatron: linear from 0 at step 0 to the peak at the end of warm-up
            return lr * step / warmup
        if style == "constant":
            return lr
        ratio = min(1.0, (step - warmup) / (total - warmup))
        coeff = 1 - ratio if style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1)
        return min_lr + coeff * (lr - min_lr)

    for step in range(total + 3):
        assert current_lr(opt) == pytest.approx(expected(step), abs=1e-12), step
        assert all(g["lr"] == pytest.approx(expected(step)) for g in opt.param_groups)
        sched.step(1)
    if style != "constant":
        assert current_lr(opt) == pytest.approx(min_lr)


def test_train_step_reports_the_lr_it_used():
    ddp, opt, sched = fresh(OptimizerConfig(lr=1e-3, lr_warmup_steps=2, lr_decay_style="linear"), total_steps=4)
    batch = make_batch(batch_size=2)
    used = [train_step(ddp, opt, sched, batch, lm_loss_fn, 2)["lr"] for _ in range(4)]
    assert used == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])


def test_bad_schedule_settings_are_config_errors():
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        fresh(OptimizerConfig(lr_warmup_steps=5), total_steps=5)
    with pytest.raises(ConfigError, match="lr_decay_style"):
        fresh(OptimizerConfig(lr_decay_style="exponential"))


def test_batch_validates_shapes():
    with pytest.raises(ValueError, match="loss_mask"):
        Batch(tokens=torch.zeros(2, 5, dtype=torch.long), loss_mask=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="rows"):
        Batch(tokens=torch.zeros(2, 5, dtype=torch.long), loss_mask=torch.zeros(2, 5), extras={"a": torch.zeros(3)})
    with pytest.raises(ValueError, match="advantages"):
        Batch(tokens=torch.zeros(2, 5, dtype=torch.long), loss_mask=torch.zeros(2, 5), advantages=torch.zeros(3))


def test_sequence_multiple_under_sequence_parallel_and_fp8():
    from types import SimpleNamespace

    from megatron_r1.train.step import _sequence_multiple

    def cfg(tp, sp, fp8=None, recipe="tensorwise"):
        return SimpleNamespace(tensor_model_parallel_size=tp, sequence_parallel=sp, fp8=fp8, fp8_recipe=recipe)

    assert _sequence_multiple(cfg(4, False)) == 1
    assert _sequence_multiple(cfg(4, True)) == 4  # Megatron cuts the sequence over TP ranks
    assert _sequence_multiple(cfg(4, True, "hybrid")) == 64  # and FP8 GEMMs need multiples of 16
    assert _sequence_multiple(cfg(1, False, "e4m3")) == 16
    assert _sequence_multiple(cfg(1, False, "hybrid", "mxfp8")) == 32  # MXFP8: 32 (Megatron's get_fp8_align_size)


def test_padding_to_a_multiple_changes_neither_logprobs_nor_loss_nor_grads(monkeypatch):
    from megatron_r1.train import step

    ddp, _, _ = fresh()
    batch = make_batch()  # width 12
    lp = compute_logprobs(ddp, batch.tokens, micro_batch_size=2)
    ddp.zero_grad_buffer()
    loss = forward_backward(ddp, batch, lm_loss_fn, micro_batch_size=2)["loss"]
    plain_grads = grads(ddp)

    widths = []
    real_forward = step._forward
    monkeypatch.setattr(step, "_sequence_multiple", lambda config: 8)  # as sequence parallelism at TP 8 would
    monkeypatch.setattr(step, "_forward", lambda model, tokens, *args, **kw: widths.append(tokens.shape[1]) or real_forward(model, tokens, *args, **kw))
    padded_lp = compute_logprobs(ddp, batch.tokens, micro_batch_size=2)
    ddp.zero_grad_buffer()
    padded_loss = forward_backward(ddp, batch, lm_loss_fn, micro_batch_size=2)["loss"]
    assert set(widths) == {16}  # the model saw padded batches
    assert padded_lp.shape == lp.shape == (4, 11)
    torch.testing.assert_close(padded_lp, lp, atol=1e-6, rtol=0)
    assert padded_loss == pytest.approx(loss, abs=1e-6)
    for a, b in zip(grads(ddp), plain_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_a_nan_loss_skips_the_update_on_every_parameter():
    ddp, opt, sched = fresh(OptimizerConfig(lr=1e-2))
    before = [p.detach().clone() for p in ddp.parameters()]

    def nan_loss(logprobs, entropy, micro):
        return (logprobs * micro.mask).sum() / micro.num_tokens * float("nan"), {}

    out = train_step(ddp, opt, sched, make_batch(), nan_loss, 2)
    assert out["nonfinite"] == 1.0 and out["update_successful"] == 0.0 and math.isnan(out["loss"])
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, ddp.parameters()))
    assert sched.num_steps == 0  # the schedule did not advance either
    good = train_step(ddp, opt, sched, make_batch(), lm_loss_fn, 2)
    assert good["nonfinite"] == 0.0 and math.isfinite(good["grad_norm"])
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, ddp.parameters()))


def test_non_finite_metrics_are_logged_as_such(tmp_path):
    from megatron_r1.train.metrics import MetricsLogger, read_metrics

    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": float("nan"), "grad_norm": float("inf"), "reward": 0.5})
    logger.close()
    row = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert math.isnan(row["loss"]) and row["grad_norm"] == float("inf") and row["reward"] == 0.5
