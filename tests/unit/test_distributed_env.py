"""Rank and rendezvous from torchrun, Slurm, or nothing."""

import pytest

from megatron_r1.distributed import first_slurm_host, read_env


@pytest.mark.parametrize(
    "nodelist, host",
    [("gpu[012-015,020],cpu7", "gpu012"), ("node7", "node7"), ("h100-[3,5]", "h100-3"), ("a,b", "a")],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_torchrun_env():
    env = read_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 8, 3, "n0", 1234)


def test_slurm_env():
    env = read_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[04-05]"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (9, 16, 1, "gpu04")


def test_no_launcher_is_a_single_process():
    env = read_env({})
    assert (env.rank, env.world_size) == (0, 1) and env.master_port > 0
