"""Where each rank works: colocated (every rank trains and generates) or disaggregated.

`placement: colocated` (the default) is SPMD colocation (`rollout.vllm_engine`): one torch.distributed
world, every rank holds a trainer rank and a vLLM worker, and generation and the update take turns
on the same devices.

`placement: disaggregated` splits the job in two sides that never share a device:

    job ranks 0 .. M-1          the trainer: Megatron-Core (TP/PP/EP/DP over M ranks), no engine
    job ranks M .. M+N-1        the rollout side: vLLM engines only (N = parallel.rollout_ranks)

Megatron builds its groups over the whole torch.distributed world and vLLM's external launcher runs
its engines over the whole world too, so each side gets a world of its own: both are made from the
job's one rendezvous store, under different key prefixes (`trainer/`, `rollout/`), and inside each
side `dist.get_rank()` / `dist.get_world_size()` mean that side's ranks. The two sides meet in

* the job store itself (small messages: batches, evaluations, control; `rollout.bridge`), and
* the *bridge* group: trainer rank 0 plus every rollout rank, a process group of its own (gloo on
  CPU, NCCL on GPU) over which the new weights are broadcast after each update.

The heartbeat runs over the whole job (`heartbeat.py`), so a dead rank on either side ends the job
with its job rank named.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_r1 import platform
from megatron_r1.heartbeat import store_barrier
from megatron_r1.config import ConfigError

log = logging.getLogger(__name__)

TRAINER, ROLLOUT = "trainer", "rollout"


@dataclasses.dataclass(frozen=True)
class Role:
    """This process's side of a disaggregated job."""

    side: str  # "trainer" | "rollout"
    job_rank: int
    job_world: int
    trainer_ranks: int  # M: job ranks 0 .. M-1
    rollout_ranks: int  # N: job ranks M .. M+N-1
    local_rank: int  # on its node (picks the GPU)

    @property
    def side_rank(self) -> int:
        """Rank inside its own side's world."""
        return self.job_rank if self.side == TRAINER else self.job_rank - self.trainer_ranks

    @property
    def bridge_rank(self) -> int | None:
        """Rank in the bridge group (trainer rank 0 is 0, rollout ranks 1 .. N); None: not a member."""
        if self.side == ROLLOUT:
            return 1 + self.side_rank
        return 0 if self.job_rank == 0 else None

    def describe(self) -> str:
        return f"{self.trainer_ranks} trainer rank(s) + {self.rollout_ranks} rollout rank(s)"


def assign(job_rank: int, job_world: int, rollout_ranks: int, local_rank: int = 0) -> Role:
    """The role of `job_rank` when the last `rollout_ranks` of `job_world` ranks host the engines."""
    if rollout_ranks < 1 or rollout_ranks >= job_world:
        raise ConfigError(
            f"placement=disaggregated with parallel.rollout_ranks={rollout_ranks} leaves "
            f"{'no trainer' if rollout_ranks >= job_world else 'no rollout'} rank in a job of {job_world}: "
            f"launch more processes (e.g. torchrun --nproc-per-node {max(2, rollout_ranks + 1)}) or set parallel.rollout_ranks between 1 and {job_world - 1}"
        )
    trainers = job_world - rollout_ranks
    side = TRAINER if job_rank < trainers else ROLLOUT
    return Role(side, job_rank, job_world, trainers, rollout_ranks, local_rank)


@dataclasses.dataclass
class Disaggregated:
    """The process groups of a disaggregated job, from this process's point of view."""

    role: Role
    store: dist.Store  # the job's store (both sides)
    bridge: dist.ProcessGroup | None  # trainer rank 0 + the rollout ranks; None on other trainer ranks
    backend: str


_current: Disaggregated | None = None


def current() -> Disaggregated | None:
    """The disaggregated job this process belongs to (None: colocated or not initialised)."""
    return _current


def init(env, rollout_ranks: int, backend: str = "auto", timeout_minutes: float = 30.0) -> Disaggregated:
    """Join the job's rendezvous (`env`: the launcher's `distributed.DistEnv`) and build this side's
    world and the bridge (idempotent). Sets the default process group to this side's world; RANK /
    LOCAL_RANK follow it (vLLM reads them)."""
    global _current
    if _current is not None:
        return _current
    role = assign(env.rank, env.world_size, rollout_ranks, env.local_rank)
    if dist.is_initialized():
        raise RuntimeError("placement=disaggregated must set up torch.distributed itself; a process group exists already")
    if platform.has_cuda():
        torch.cuda.set_device(env.local_rank)
    timeout = timedelta(minutes=timeout_minutes)
    store, _, _ = next(dist.rendezvous(f"tcp://{env.master_addr}:{env.master_port}?rank={env.rank}&world_size={env.world_size}", timeout=timeout))
    backend = platform.distributed_backend(backend)
    size = role.trainer_ranks if role.side == TRAINER else role.rollout_ranks
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"{role.side}/", store), rank=role.side_rank,
                            world_size=size, timeout=timeout)
    os.environ["RANK"], os.environ["LOCAL_RANK"] = str(role.side_rank), str(env.local_rank)
    bridge = None
    if role.bridge_rank is not None:
        bridge = _bridge_group(dist.PrefixStore("bridge/", store), role.bridge_rank, 1 + role.rollout_ranks, backend, timeout)
    _current = Disaggregated(role, store, bridge, backend)
    log.info("job rank %d/%d: %s rank %d (%s)", role.job_rank, role.job_world, role.side, role.side_rank, role.describe())
    return _current


def _bridge_group(store: dist.Store, rank: int, size: int, backend: str, timeout: timedelta) -> dist.ProcessGroup:
    """A process group outside the default world: the trainer's rank 0 and the rollout ranks."""
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, options)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def leave() -> None:
    """End of a disaggregated job: wait for every rank of both sides (rank 0's process may serve the
    store), then forget the groups."""
    global _current
    if _current is None:
        return
    job, _current = _current, None
    store_barrier(job.store, "megatron_r1/left", job.role.job_world)
    # Job rank 0 may host the store (a Slurm or mp launch; torchrun's agent hosts it otherwise), and
    # the others may still be polling the barrier when it passes: it leaves only once they are done.
    job.store.add("megatron_r1/out", 1)
    if job.role.job_rank == 0:
        store_barrier(job.store, "megatron_r1/out", job.role.job_world, timeout_s=60.0, add=False)
