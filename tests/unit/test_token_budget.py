"""Token-budget micro-batches (`memory.max_tokens_per_microbatch`, train/step.py) give the same loss and
gradients as the padded fixed-size micro-batches, on one CPU rank, for every loss the trainer runs: the GRPO
objective under each loss aggregation (with the engine's logprobs, old logprobs and a KL term riding along
as target-aligned tensors), the language-model loss on packed SFT rows, and the reward model's pairs.
(Two data-parallel ranks: tests/distributed/test_token_budget_2rank.py.)"""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import pytest
import torch

from megatron_r1.config import ConfigError, ModelConfig, OptimizerConfig, ParallelConfig, StageConfig, load_config
from megatron_r1.distributed import init_distributed
from megatron_r1.models.build import build_model
from megatron_r1.train.grpo_update import grpo_loss_fn, make_batch
from megatron_r1.train.optim import build_optimizer
from megatron_r1.train.step import Batch, forward_backward, lm_loss_fn, needed_widths, token_budget_plan

PARALLEL = ParallelConfig()
SEED = 1234
PAD = 0


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    init_distributed(PARALLEL, seed=SEED)


def skewed_samples(n: int = 24, seed: int = 0, vocab: int = 512) -> list:
    """GRPO samples as R1-Zero makes them: prompts of 20-30 tokens, responses from 5 to 96 tokens
    (most short, a few long), the engine's logprob for every response token."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(20, 30))]
        length = 96 if i % 7 == 0 else rng.randint(5, 40)
        response = [rng.randrange(1, vocab) for _ in range(length)]
        samples.append(SimpleNamespace(prompt_ids=prompt, response_ids=response, logprobs=[-rng.random() * 3 for _ in response]))
    return samples


def grpo_batch(samples, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    batch = make_batch(samples, torch.randn(len(samples), generator=g), PAD)
    width = batch.seq_len - 1
    # Off-policy and KL tensors (target-aligned [B, S-1]) near the current policy's values.
    batch.old_logprobs = -torch.rand(batch.size, width, generator=g) * 3
    batch.ref_logprobs = -torch.rand(batch.size, width, generator=g) * 3
    return batch


def fresh(model_cfg: ModelConfig | None = None):
    init_distributed(PARALLEL, seed=SEED)  # every build starts from the same weights
    return build_optimizer(build_model(model_cfg or ModelConfig(), PARALLEL), OptimizerConfig(lr=1e-3), PARALLEL, 10)[0]


def run(ddp, batch, loss_fn, **kw) -> tuple[dict, list[torch.Tensor]]:
    ddp.zero_grad_buffer()
    out = forward_backward(ddp, batch, loss_fn, **kw)
    return out, [p.main_grad.detach().clone() for p in ddp.parameters()]


def assert_same(a, b, what: str) -> None:
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert out_a["loss"] == pytest.approx(out_b["loss"], abs=1e-6, rel=1e-6), what
    # Token means are exact; a per-micro-batch max or percentile (ratio_max, is_ratio_p05) depends on the grouping.
    means = [k for k in out_a if k != "padding_share" and not re.search(r"(max|min|_p\d+)$", k)]
    for key in means:
        assert out_a[key] == pytest.approx(out_b[key], abs=1e-6, rel=1e-5), (what, key)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5, msg=what)


def test_the_plan_covers_every_row_once_within_the_budget_longest_first():
    widths = [30, 120, 8, 64, 64, 9, 200, 31]
    plan = token_budget_plan(widths, max_tokens=256, multiple=8)
    assert sorted(r for mb in plan for r in mb) == list(range(len(widths)))
    for mb in plan:
        width = -(-max(widths[r] for r in mb) // 8) * 8
        assert len(mb) * width <= 256 or len(mb) == 1  # only a row wider than the budget may exceed it, alone
    assert plan[0] == [6]  # longest first: a row of 200 leaves no room for another
    firsts = [max(widths[r] for r in mb) for mb in plan]
    assert firsts == sorted(firsts, reverse=True)


def test_long_rows_do_not_carry_short_ones_at_their_width():
    """Three long responses and twenty short ones under a budget all of them would fit: two micro-batches,
    the long ones together and the short ones together (greedy filling would pad seven short rows to 100)."""
    widths = [100, 10, 10, 100, 10, 10, 10, 100] + [10] * 15
    plan = token_budget_plan(widths, max_tokens=1000)
    assert sorted(plan[0]) == [0, 3, 7] and len(plan) == 2 and len(plan[1]) == 20


def test_packed_micro_batches_count_real_tokens_only():
    """Packed (`thd`, GPU) a micro-batch holds the sum of its rows' widths, not rows x the widest."""
    widths = [100, 10, 10, 100, 10, 10, 10, 100] + [10] * 15
    plan = token_budget_plan(widths, max_tokens=520, packed=True)
    assert len(plan) == 1  # 300 + 200 real tokens fit one packed micro-batch of 520
    assert len(token_budget_plan(widths, max_tokens=520)) == 2  # bucketed: 3 x 100 and 20 x 10


def test_units_stay_together():
    widths = [10, 90, 50, 12, 70, 71]  # pairs (0, 1), (2, 3), (4, 5)
    plan = token_budget_plan(widths, max_tokens=200, rows_per_unit=2)
    for mb in plan:
        assert len(mb) % 2 == 0 and all(mb[i] % 2 == 0 and mb[i + 1] == mb[i] + 1 for i in range(0, len(mb), 2))
    with pytest.raises(ValueError, match="units of 2"):
        token_budget_plan([1, 2, 3], 100, rows_per_unit=2)


def test_needed_width_is_the_last_trained_position_plus_one():
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    assert needed_widths(mask).tolist() == [4, 6, 2]


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_grpo_loss_and_gradients_equal_the_padded_micro_batches(loss_agg):
    cfg = StageConfig()
    cfg.grpo.loss_agg, cfg.grpo.kl_beta, cfg.grpo.mismatch_correction = loss_agg, 0.05, "truncate"
    cfg.grpo.entropy_coeff = 0.01
    cfg.rollout.max_response_tokens = 96  # Dr. GRPO's constant normaliser
    batch = grpo_batch(skewed_samples())
    ddp = fresh()
    padded = run(ddp, batch, grpo_loss_fn(cfg), micro_batch_size=4, with_entropy=True)
    budget = run(ddp, batch, grpo_loss_fn(cfg), micro_batch_size=4, with_entropy=True, max_tokens=256)
    assert_same(padded, budget, loss_agg)
    assert padded[0]["sequence_tokens"] == budget[0]["sequence_tokens"] == float(sum(needed_widths(batch.loss_mask)))
    # The skewed batch is mostly padding when every micro-batch is as wide as its longest row.
    assert padded[0]["padding_share"] > 0.4 and budget[0]["padding_share"] < 0.2 * padded[0]["padding_share"] + 0.05


def test_packed_sft_rows_and_a_tiny_budget_are_exact():
    """Packed SFT rows (per-document attention, a prompt masked out in each document) under a budget
    below one row's width: each row alone, cut after its last trained token."""
    from megatron_r1.data.sft import Row
    from megatron_r1.stages.sft import collate

    rng = random.Random(3)
    rows = []
    for docs in ((50, 12), (33, 7), (64,), (9, 9, 9)):
        ids, mask, segments = [], [], []
        for d, n in enumerate(docs, start=1):
            ids += [rng.randrange(1, 512) for _ in range(n)]
            mask += [0] * 4 + [1] * (n - 4)  # the first 4 tokens of each document are its prompt
            segments += [d] * n
        mask[-2:] = [0, 0]  # a trailing untrained stretch the budget path cuts away
        rows.append(Row(ids=ids, loss_mask=mask, segments=segments))
    batch = collate(rows, PAD, packed=True)
    ddp = fresh()
    padded = run(ddp, batch, lm_loss_fn, micro_batch_size=2)
    alone = run(ddp, batch, lm_loss_fn, micro_batch_size=2, max_tokens=1)
    assert_same(padded, alone, "packed")


def test_reward_model_pairs_are_exact():
    from megatron_r1.models.reward_model import build_reward_model
    from megatron_r1.stages.reward_model import EncodedPair, bradley_terry_loss_fn, pair_batch

    rng = random.Random(5)
    pairs = [EncodedPair(chosen=[rng.randrange(1, 512) for _ in range(rng.randint(6, 60))],
                         rejected=[rng.randrange(1, 512) for _ in range(rng.randint(6, 60))], kind="k") for _ in range(6)]
    batch = pair_batch(pairs, PAD)
    init_distributed(PARALLEL, seed=SEED)
    ddp, _, _ = build_optimizer(build_reward_model(ModelConfig(), PARALLEL), OptimizerConfig(lr=1e-3), PARALLEL, 10)
    padded = run(ddp, batch, bradley_terry_loss_fn, micro_batch_size=4, head="value")
    budget = run(ddp, batch, bradley_terry_loss_fn, micro_batch_size=4, head="value", max_tokens=128, rows_per_unit=2)
    assert_same(padded, budget, "reward model")


def test_the_budget_is_refused_where_micro_batches_must_share_one_shape():
    with pytest.raises(ConfigError, match="max_tokens_per_microbatch.*pipeline_model_parallel_size=1"):
        load_config("conf/stages/r1_zero_tiny.yaml", ["memory.max_tokens_per_microbatch=512", "parallel.pipeline_model_parallel_size=2"])
    with pytest.raises(ConfigError, match="must be >= 0"):
        load_config("conf/stages/r1_zero_tiny.yaml", ["memory.max_tokens_per_microbatch=-1"])
