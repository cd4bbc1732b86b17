"""Fail fast: one rank of a 2-rank gloo job is SIGKILLed (or hangs) mid-step; the other must end
within the configured time, with a message that names the lost rank (megatron_r1/heartbeat.py).

Each case starts two plain `python` ranks (the environment torchrun would set), lets them run a
few steps of collectives, then kills one: while the survivor is blocked in a collective with it
(gloo fails that collective at once; the verdict must still name the rank), while the survivor is
busy outside collectives (only the heartbeat can tell), and rank 0 itself (whose process serves
the job's store). The first case starts the ranks as every stage does (`init_distributed`, which
imports Megatron: ~15 s on two cores); the others start only the process group and the heartbeat.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_r1.distributed import free_port
from megatron_r1.heartbeat import PEER_LOST_EXIT_CODE

HEARTBEAT_S = 6.0
SLACK_S = 4.0  # detection runs every HEARTBEAT_S / 10, then rank 0 posts the verdict; plus process exit

_RANK = """
import sys, time
import torch, torch.distributed as dist
from megatron_r1 import heartbeat
from megatron_r1.config import ParallelConfig
from megatron_r1.distributed import ensure_process_group, init_distributed

victim, survivor_mode, heartbeat_s, timeout_min, full = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "full"
torch.set_num_threads(1)
if full:
    init_distributed(ParallelConfig(backend="gloo", heartbeat_timeout_s=heartbeat_s, timeout_minutes=timeout_min))
else:
    ensure_process_group("gloo", timeout_minutes=timeout_min)
    heartbeat.start(heartbeat_s)
rank = dist.get_rank()
x = torch.ones(4)
for step in range(3):  # a few healthy steps
    dist.all_reduce(x)
    time.sleep(0.05)
if rank == victim:
    print("MID-STEP", flush=True)  # the test kills (or leaves hanging) this rank now
    time.sleep(600)
elif survivor_mode == "busy":
    time.sleep(600)  # a long rollout: no collective to fail
else:
    dist.all_reduce(x)  # waits for the victim
print("NOT REACHED", flush=True)
"""


def _start(victim: int, survivor_mode: str, heartbeat_s: float = HEARTBEAT_S, timeout_min: float = 5.0, full: bool = False) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, str(victim), survivor_mode, str(heartbeat_s), str(timeout_min), "full" if full else "light"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait_mid_step(procs, victim: int) -> None:
    line = procs[victim].stdout.readline().strip()
    if line != "MID-STEP":
        for p in procs:
            p.kill()
        pytest.fail(f"rank {victim} did not reach its step: {line!r} {procs[victim].stderr.read()[-2000:]}")


@pytest.mark.parametrize(
    "victim, survivor_mode",
    [(1, "collective"), (1, "busy"), (0, "collective")],
    ids=["peer-killed-during-a-collective", "peer-killed-while-busy", "rank0-and-its-store-killed"],
)
def test_a_killed_rank_ends_the_job_within_the_heartbeat_timeout_naming_it(victim, survivor_mode):
    procs = _start(victim, survivor_mode, full=victim == 1 and survivor_mode == "collective")
    survivor = procs[1 - victim]
    try:
        _wait_mid_step(procs, victim)
        time.sleep(0.5)  # the survivor is now inside its collective (or its long computation)
        procs[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        survivor.wait(timeout=HEARTBEAT_S + SLACK_S + 10)
        elapsed = time.monotonic() - killed_at
    finally:
        for p in procs:
            p.kill()
            p.wait()
    err = survivor.stderr.read()
    last = err.strip().splitlines()[-1]
    assert survivor.returncode == PEER_LOST_EXIT_CODE, err[-3000:]
    assert f"rank {victim} stopped responding" in last and last.endswith("exiting"), last
    assert elapsed < HEARTBEAT_S + SLACK_S, elapsed
    assert "Traceback" not in err


def test_a_rank_that_never_arrives_fails_the_collective_after_parallel_timeout_minutes():
    # The victim is alive (it keeps beating) but never joins the collective: a logical hang, which
    # only the collective timeout bounds. 0.1 minutes = 6 s instead of the default 30 minutes.
    procs = _start(victim=1, survivor_mode="collective", heartbeat_s=0.0, timeout_min=0.1)
    try:
        _wait_mid_step(procs, 1)
        start = time.monotonic()
        procs[0].wait(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
            p.wait()
    err = procs[0].stderr.read()
    assert procs[0].returncode not in (0, None) and "NOT REACHED" not in procs[0].stdout.read()
    assert 4.0 < elapsed < 6.0 + SLACK_S + 5, (elapsed, err[-2000:])
    assert "timed out" in err.lower() or "timeout" in err.lower(), err[-2000:]
