"""The bounded-staleness contract both sides of a disaggregated job follow (`rollout/bridge.py`),
the split of a job into trainer and rollout ranks (`placement.py`) and their configuration."""

from __future__ import annotations

import pytest
import torch

from megatron_r1.config import ConfigError, load_config, to_dict
from megatron_r1.placement import ROLLOUT, TRAINER, assign
from megatron_r1.rollout.bridge import AsyncSchedule, pack, unpack


def test_batch_i_is_sampled_with_the_weights_of_update_i_minus_k():
    s = AsyncSchedule(steps=6, max_staleness=2)
    assert [s.generation_version(i) for i in range(6)] == [0, 0, 0, 1, 2, 3]
    assert [AsyncSchedule(6, 0).generation_version(i) for i in range(6)] == [0, 1, 2, 3, 4, 5]


def test_only_the_versions_a_later_batch_or_an_evaluation_needs_cross_the_bridge():
    s = AsyncSchedule(steps=6, max_staleness=1, eval_every=4)
    # 1..4 sample batches 2..5; 5 samples nothing and is no evaluation; 6 is the final evaluation
    assert [v for v in range(1, 7) if s.weights_needed(v)] == [1, 2, 3, 4, 6]
    assert s.versions_before(2, received=0) == [1]
    assert s.versions_before(6, received=1) == [2, 3, 4, 6]  # the end of the run: what is left
    assert s.is_eval(0) and s.is_eval(4) and s.is_eval(6) and not s.is_eval(5)


@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("eval_every", [0, 2, 5])
def test_the_rollout_side_receives_exactly_what_the_trainer_sends_and_never_waits_for_an_update_not_yet_due(steps, k, eval_every):
    s = AsyncSchedule(steps, k, eval_every)
    sent = [v for v in range(1, steps + 1) if s.weights_needed(v)]  # the trainer: publish(v) after update v
    received, held = [], 0
    for i in range(steps):  # the rollout side, before sampling batch i
        new = s.versions_before(i, held)
        assert all(v <= max(0, i - k) for v in new)  # batch i never waits for an update after i - k
        received += new
        held = new[-1] if new else held
        assert held == s.generation_version(i) or not s.weights_needed(s.generation_version(i))
    received += s.versions_before(steps, held)
    assert received == sent
    assert steps in sent  # the final evaluation always sees the last update


def test_the_last_ranks_host_the_engines():
    roles = [assign(r, 4, rollout_ranks=1) for r in range(4)]
    assert [r.side for r in roles] == [TRAINER, TRAINER, TRAINER, ROLLOUT]
    assert [r.side_rank for r in roles] == [0, 1, 2, 0]
    assert [r.bridge_rank for r in roles] == [0, None, None, 1]  # trainer rank 0 sends to every rollout rank
    assert roles[0].describe() == "3 trainer rank(s) + 1 rollout rank(s)"


@pytest.mark.parametrize("world, rollout_ranks, says", [(1, 1, "no trainer rank in a job of 1"), (4, 4, "no trainer rank"), (2, 0, "no rollout rank")])
def test_a_split_without_one_side_names_the_launch_to_fix_it(world, rollout_ranks, says):
    with pytest.raises(ConfigError, match=says) as e:
        assign(0, world, rollout_ranks)
    assert "torchrun --nproc-per-node" in str(e.value)


def test_the_async_section_reads_and_writes_under_its_yaml_name():
    cfg = load_config(None, ["placement=disaggregated", "async.max_staleness=2", "parallel.rollout_ranks=3"])
    assert (cfg.placement, cfg.async_.max_staleness, cfg.parallel.rollout_ranks) == ("disaggregated", 2, 3)
    plain = to_dict(cfg)
    assert plain["async"] == {"max_staleness": 2} and "async_" not in plain
    assert load_config(None, [f"async.max_staleness={plain['async']['max_staleness']}", "placement=disaggregated"]).async_.max_staleness == 2


@pytest.mark.parametrize("overrides, says", [
    (["async.max_staleness=1"], "set placement=disaggregated"),
    (["placement=disaggregated", "async.max_staleness=-1"], "must be >= 0"),
    (["placement=disaggregated", "parallel.rollout_ranks=0"], "parallel.rollout_ranks=0 must be >= 1"),
    (["async.max_stalenes=1"], "max_staleness"),
    (["placement=elsewhere"], "placement"),
])
def test_bad_async_settings_are_one_line_errors(overrides, says):
    with pytest.raises(ConfigError, match=says):
        load_config(None, overrides)


def test_messages_kept_in_a_checkpoint_round_trip_through_text():
    message = {"step": 3, "version": 2, "logprobs": torch.tensor([-0.5, -1.25]), "sampler": {"epoch": 1, "order": [3, 1, 2]}}
    text = pack(message)
    assert isinstance(text, str) and text.isascii()
    back = unpack(text)
    assert back["sampler"] == message["sampler"] and torch.equal(back["logprobs"], message["logprobs"])
