"""Two gloo ranks: a preemption signal that reaches only one rank stops both at the same step
boundary (the all-reduce in `PreemptionWatch.stop_requested`), and no rank stops without one."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch.multiprocessing as mp

from megatron_r1.distributed import free_port

WORLD = 2


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from megatron_r1.train.preemption import PreemptionWatch

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    decisions = []
    with PreemptionWatch() as watch:
        for step in range(1, 4):
            if rank == 1 and step == 2:  # the signal reaches one rank only, in the middle of step 2
                os.kill(os.getpid(), signal.SIGUSR1)
            decisions.append(watch.stop_requested(step))
            if decisions[-1]:
                break
    Path(out, f"rank{rank}.json").write_text(json.dumps({"decisions": decisions, "received": watch.received}))
    dist.destroy_process_group()


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["decisions"] for r in ranks] == [[False, True], [False, True]]
    assert ranks[0]["received"] is None and ranks[1]["received"] == signal.SIGUSR1
