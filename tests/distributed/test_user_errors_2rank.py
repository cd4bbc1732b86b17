"""A config mistake found inside a stage's run() on every rank of a 2-rank job is printed once
(not once per rank), without a traceback, and every rank exits with status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from megatron_r1.distributed import free_port
from tests.unit.test_user_errors import make_hf_dir


def test_a_config_error_on_every_rank_is_printed_once(tmp_path):
    hf = make_hf_dir(tmp_path / "hf")
    port = free_port()
    args = [sys.executable, "-m", "megatron_r1.cli", "--log-level", "WARNING", "evaluate", "r1_zero_tiny",
            f"checkpoint.load_hf={hf}", f"logging.run_dir={tmp_path / 'run'}", "data.train_size=40", "data.eval_size=8",
            "data.task=chain_sun"]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], errs
    assert not any("Traceback" in e for e in errs), errs
    lines = [line for e in errs for line in e.splitlines() if line.startswith("megatron-r1")]
    assert len(lines) == 1 and "did you mean chain_sum" in lines[0], errs


def test_under_torchrun_the_line_reaches_the_console_whichever_rank_exits_first(tmp_path):
    """torchrun stops the other ranks as soon as one exits: the rank that prints must not be the one
    stopped first. The first local rank prints at once; the others wait before exiting."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_r1.cli",
                          "r1-zero", "conf/stages/r1_zero_tiny.yaml", "nonsense=x"],
                         cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=240)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("megatron-r1: config error:")]
    assert len(lines) == 1 and "unknown config key 'nonsense'" in lines[0], out.stdout[-2000:] + out.stderr[-3000:]
    assert out.returncode != 0
