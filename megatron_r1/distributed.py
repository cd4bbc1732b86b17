"""Process groups from torchrun or Slurm, then Megatron's `parallel_state` from a ParallelConfig.

Launchers and the variables they set:

| launcher            | rank            | world size        | local rank         | rendezvous                            |
|---------------------|-----------------|-------------------|--------------------|---------------------------------------|
| torchrun            | RANK            | WORLD_SIZE        | LOCAL_RANK         | MASTER_ADDR / MASTER_PORT             |
| srun (no torchrun)  | SLURM_PROCID    | SLURM_NTASKS      | SLURM_LOCALID      | first host of SLURM_JOB_NODELIST:PORT |
| plain `python`      | 0               | 1                 | 0                  | 127.0.0.1 on a free port              |

NCCL on GPUs, gloo on CPUs (`platform.distributed_backend`). A dead or stuck rank ends the job
within `parallel.timeout_minutes` (collectives) or `parallel.heartbeat_timeout_s` (a dead or frozen
process, named in the last line: heartbeat.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_r1 import heartbeat, placement, platform
from megatron_r1.config import ConfigError, ParallelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[012-015,020],cpu7' -> 'gpu012'."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = head.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (single-process runs and multi-process tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env(environ: dict | None = None) -> DistEnv:
    """Work out rank, world size and rendezvous from the launcher's environment variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    return DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=free_port())


def ensure_process_group(backend: str = "auto", env: DistEnv | None = None, timeout_minutes: float = 30.0) -> DistEnv:
    """Initialise torch.distributed from the launcher's environment unless it already is; idempotent.

    Also exports RANK and LOCAL_RANK, which vLLM's external launcher reads (a Slurm task or a
    plain `python` process has no torchrun to set them). Nothing else is exported, so a child
    process started from here does not mistake itself for a member of this job. A collective that
    waits longer than `timeout_minutes` fails (for an existing group, its own timeout holds).
    """
    env = env or read_env()
    if not dist.is_initialized():
        if platform.has_cuda():
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(
            backend=platform.distributed_backend(backend),
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    # One side of a disaggregated job is a world of its own, but its GPUs are still the launcher's.
    launched = env.world_size == dist.get_world_size() and env.rank == dist.get_rank() or placement.current() is not None
    os.environ["RANK"] = str(dist.get_rank())
    # A group made by hand (tests, notebooks) on one machine: the local rank is the rank.
    os.environ["LOCAL_RANK"] = str(env.local_rank if launched else dist.get_rank())
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]), env.master_addr, env.master_port)


def init_distributed(parallel: ParallelConfig, seed: int = 1234, env: DistEnv | None = None) -> DistEnv:
    """Initialise torch.distributed and Megatron's model-parallel groups; idempotent per process."""
    platform.setup()
    env = ensure_process_group(parallel.backend, env, parallel.timeout_minutes)
    heartbeat.start(parallel.heartbeat_timeout_s, placement.current())
    init_model_parallel(parallel, seed)
    return env


def init_model_parallel(parallel: ParallelConfig, seed: int = 1234) -> None:
    """(Re)build Megatron's parallel_state groups for `parallel` and seed the model-parallel RNG."""
    from megatron.core import parallel_state, tensor_parallel

    world = dist.get_world_size()
    model_parallel = (
        parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size * parallel.context_parallel_size
    )
    if world % model_parallel:
        raise ConfigError(
            f"world size {world} is not divisible by TP x PP x CP = {model_parallel} "
            f"(TP={parallel.tensor_model_parallel_size}, PP={parallel.pipeline_model_parallel_size}, "
            f"CP={parallel.context_parallel_size}); launch a multiple of {model_parallel} processes or change parallel.*"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    log.info(
        "rank %d/%d on %s: TP=%d PP=%d EP=%d CP=%d",
        dist.get_rank(),
        world,
        platform.describe(),
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.expert_model_parallel_size,
        parallel.context_parallel_size,
    )


def destroy() -> None:
    """Tear down Megatron's groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        heartbeat.stop()
        dist.barrier()  # every rank has stopped watching before any leaves: leaving is no failure
        placement.leave()  # a disaggregated job: the other side too
        dist.destroy_process_group()


def report_once(message: str, grace_s: float = 5.0) -> bool:
    """Whether this rank should print `message`, a user error every rank may hit at once (a config
    mistake under torchrun): only the first rank to report it does. Rank 0 then waits (at most
    `grace_s`) for the others to have reported it, since its process may serve the job's store."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    key = "megatron_r1/reported/" + hashlib.sha1(message.encode()).hexdigest()
    try:
        store = dist.distributed_c10d._get_default_store()
        first = store.add(key, 1) == 1
        deadline = time.monotonic() + grace_s
        while dist.get_rank() == 0 and store.add(key, 0) < dist.get_world_size() and time.monotonic() < deadline:
            time.sleep(0.05)
        return first
    except Exception:  # the store has gone with rank 0: better twice than never
        return True


def even_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `n` items are cut into `parts` contiguous near-equal parts
    (the first ``n % parts`` parts get one more)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def is_main() -> bool:
    """Rank 0 (or no process group at all) writes files and prints."""
    return not dist.is_initialized() or dist.get_rank() == 0
