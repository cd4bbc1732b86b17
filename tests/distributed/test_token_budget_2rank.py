"""Token-budget micro-batches on two gloo data-parallel ranks: each rank holds a different part of a skewed GRPO
batch (one mostly long responses, the other short ones), so the ranks run different numbers of micro-batches of
different widths; the all-reduced gradients and the loss still equal the padded fixed-size micro-batches', for
every loss aggregation (Dr. GRPO's constant normaliser included)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from megatron_r1.distributed import free_port

WORLD = 2
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
BUDGET = 256


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MEGATRON_R1_STRICT_DEVICES"] = "1"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from megatron_r1 import distributed
    from megatron_r1.config import ModelConfig, OptimizerConfig, ParallelConfig, StageConfig
    from megatron_r1.models.build import build_model
    from megatron_r1.train.grpo_update import grpo_loss_fn
    from megatron_r1.train.optim import build_optimizer
    from megatron_r1.train.step import forward_backward, needed_widths, token_budget_plan
    from tests.unit.test_token_budget import grpo_batch, skewed_samples

    parallel = ParallelConfig()
    distributed.init_distributed(parallel, seed=1234)
    samples = sorted(skewed_samples(32), key=lambda s: -len(s.response_ids))  # rank 0: the long half, rank 1: the short half
    batch = grpo_batch(samples)
    mine = batch.rows(slice(rank * 16, (rank + 1) * 16))
    results = {"micro_batches": len(token_budget_plan(needed_widths(mine.loss_mask).tolist(), BUDGET))}
    for agg in AGGREGATIONS:
        cfg = StageConfig()
        cfg.grpo.loss_agg, cfg.grpo.kl_beta, cfg.grpo.mismatch_correction = agg, 0.05, "truncate"
        cfg.rollout.max_response_tokens = 96
        distributed.init_distributed(parallel, seed=1234)  # the same weights for both runs
        ddp = build_optimizer(build_model(ModelConfig(), parallel), OptimizerConfig(lr=1e-3), parallel, 10)[0]
        runs = []
        for max_tokens in (0, BUDGET):
            ddp.zero_grad_buffer()
            out = forward_backward(ddp, mine, grpo_loss_fn(cfg), 4, with_entropy=True, max_tokens=max_tokens)
            runs.append((out, torch.cat([p.main_grad.detach().flatten() for p in ddp.parameters()])))
        (padded, g0), (budget, g1) = runs
        results[agg] = {"loss": [padded["loss"], budget["loss"]], "grad_max_diff": float((g0 - g1).abs().max()),
                        "grad_max": float(g0.abs().max()), "padding_share": [padded["padding_share"], budget["padding_share"]]}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    distributed.destroy()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("token_budget_2rank")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_ranks_run_different_micro_batches(ranks):
    assert ranks[0]["micro_batches"] != ranks[1]["micro_batches"]


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_gradients_and_loss_equal_the_padded_micro_batches_on_two_ranks(ranks, agg):
    for r in ranks:
        result = r[agg]
        assert result["loss"][0] == pytest.approx(result["loss"][1], abs=1e-6, rel=1e-6)
        assert result["grad_max"] > 1e-4 and result["grad_max_diff"] < 1e-6
        assert result["padding_share"][1] < result["padding_share"][0]
    assert ranks[0][agg]["loss"] == pytest.approx(ranks[1][agg]["loss"], abs=1e-9)  # one global loss on both ranks
