"""Four gloo ranks as a disaggregated job (2 trainer ranks + 2 rollout ranks, `placement.py`): each
side is a world of its own, the store carries messages both ways, the bridge streams a model's worth
of mixed-dtype tensors in several buckets to every rollout rank exactly, and a failure on one side
reaches a rank waiting on the other as a one-line RemoteFailure."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from megatron_r1.distributed import free_port

WORLD, ROLLOUT_RANKS = 4, 2


def _weights() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        ("embed.weight", torch.randn(64, 32, generator=g)),
        ("layer.0.norm", torch.randn(33, generator=g).to(torch.bfloat16)),  # odd size: the next tensor is realigned
        ("layer.0.experts", torch.randn(4, 16, 8, generator=g).to(torch.bfloat16)),
        ("layer.0.bias", torch.arange(5, dtype=torch.int64)),
        ("lm_head.weight", torch.randn(64, 32, generator=g)),  # larger than a bucket: travels alone
    ]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from megatron_r1 import placement
    from megatron_r1.distributed import read_env
    from megatron_r1.rollout.bridge import Bridge, RemoteFailure

    job = placement.init(read_env(), ROLLOUT_RANKS, "gloo", timeout_minutes=2)
    bridge = Bridge(job, timeout_s=60)
    side_sum = torch.tensor([float(rank)])
    dist.all_reduce(side_sum)  # over this side's world only
    result = {"side": job.role.side, "side_rank": dist.get_rank(), "side_world": dist.get_world_size(),
              "env_rank": os.environ["RANK"], "side_sum": side_sum.item(), "in_bridge": job.bridge is not None}
    if job.role.side == placement.TRAINER:
        if job.role.job_rank == 0:
            bridge.put("hello", {"from": "trainer"})
        result["sync"] = bridge.send_weights(3, _weights(), bucket_bytes=4096, after={"probe": [0.5, -1.25]})
        reply = bridge.get("reply", "the rollout side's reply")
        result["reply"] = reply
        try:  # the rollout side fails while this rank waits for a batch
            bridge.get("batch/0", "the rollout batch of step 0")
        except RemoteFailure as e:
            result["failure"] = str(e)
    else:
        result["hello"] = bridge.get("hello", "the trainer's hello")
        stream, tail = bridge.receive_weights(3)
        received = {name: tensor.clone() for name, tensor in stream}
        expected = dict(_weights())
        result["names"] = list(received)
        result["exact"] = all(received[n].dtype == t.dtype and torch.equal(received[n], t) for n, t in expected.items())
        result["after"] = tail["after"]
        dist.barrier()  # both rollout ranks have the stream before one of them reports and fails
        if job.role.side_rank == 0:
            bridge.put("reply", {"got": len(received)})
            bridge.fail("rollout rank 2 failed: ValueError: a reward crashed the engine")
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    placement.leave()
    dist.destroy_process_group()


def test_the_bridge_carries_messages_weights_and_failures_between_two_worlds(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [(r["side"], r["side_rank"], r["side_world"], r["env_rank"]) for r in ranks] == [
        ("trainer", 0, 2, "0"), ("trainer", 1, 2, "1"), ("rollout", 0, 2, "0"), ("rollout", 1, 2, "1")]
    assert [r["side_sum"] for r in ranks] == [1.0, 1.0, 5.0, 5.0]  # 0+1 and 2+3: two separate worlds
    assert [r["in_bridge"] for r in ranks] == [True, False, True, True]  # trainer rank 0 + the rollout ranks
    for r in ranks[2:]:
        assert r["hello"] == {"from": "trainer"}
        assert r["names"] == [n for n, _ in _weights()] and r["exact"], r
        assert r["after"] == {"probe": [0.5, -1.25]}
    sent = ranks[0]["sync"]
    assert sent["sync/buckets"] >= 3 and sent["sync/mb_sent"] * 2**20 >= sum(t.numel() * t.element_size() for _, t in _weights())
    assert ranks[1]["sync"]["sync/buckets"] == 0  # the other trainer ranks only take part in the gathers
    for r in ranks[:2]:
        assert r["reply"] == {"got": 5}
        assert r["failure"] == "rollout rank 2 failed: ValueError: a reward crashed the engine"
