"""Disaggregated GRPO under torchrun, as users launch it: 1 trainer rank + 1 rollout rank.

* `async.max_staleness=0` is the synchronous algorithm: the same run as colocated on one rank
  (the same batches, rewards, evaluations; the same weights to float rounding), with every batch
  sampled by the newest policy;
* `async.max_staleness=1` (slow): batch t is sampled with the weights of step t-1 while the trainer
  updates; a preemption signal mid-run saves (with the batch the rollout rank already sampled),
  both sides leave with the requeue status, and the rerun ends bit-for-bit where an uninterrupted
  run ends;
* a rollout rank that freezes (slow) ends the job within the heartbeat timeout, its rank named.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from megatron_r1.train.preemption import REQUEUE_EXIT_CODE
from tests.e2e.conftest import ROOT, cli
from tests.e2e.test_r1_zero import STAGE, TINY_RUN

VOLATILE = ("time/", "perf/", "sync/seconds", "sync/gb_per_s", "sync/probe_seconds", "async/trainer_wait_s", "async/rollout_wait_s", "async/rollout_s")

# The CLI with SIGUSR1 delivered to the trainer while step SIGNAL_AT ends (as Slurm signals before the
# time limit). A file, not `-c`: torchrun runs a script, and the checkpoint writer's spawned helper
# imports it again (hence the __main__ guard).
HARNESS = """
import os, signal, sys
from megatron_r1.cli import main
from megatron_r1.train.preemption import PreemptionWatch

def stop_requested(self, step, real=PreemptionWatch.stop_requested, at=int(os.environ["SIGNAL_AT"])):
    if step == at:
        os.kill(os.getpid(), signal.SIGUSR1)
    return real(self, step)

if __name__ == "__main__":
    PreemptionWatch.stop_requested = stop_requested
    sys.exit(main(sys.argv[1:]))
"""


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _steady(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _weights(run_dir: Path) -> dict:
    return load_file(run_dir / "hf/model.safetensors")


def _args(base_model: Path, run_dir: Path, *more: str) -> list[str]:
    return ["r1-zero", str(STAGE), f"checkpoint.load_hf={base_model}", "checkpoint.base_stage=", *TINY_RUN, f"logging.run_dir={run_dir}", *more]


def test_disaggregated_with_no_staleness_is_the_colocated_run(base_model, tmp_path):
    colocated, apart = tmp_path / "colocated", tmp_path / "disaggregated"
    cli(*_args(base_model, colocated, "steps=3"))
    out = cli(*_args(base_model, apart, "steps=3", "placement=disaggregated"), ranks=2)
    assert "disaggregated: 1 rollout engine(s) of TP 1 on 1 rollout rank(s), trainer DP 1 on 1" in out.stdout

    a, b = _rows(colocated), _rows(apart)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):  # the same prompts, samples, rewards and evaluations
        for key in ("reward/mean", "reward/accuracy", "response/length_mean", "eval/accuracy", "eval/maj_accuracy"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
        if "train/loss" in ra:
            assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-4, abs=1e-6)
            assert rb["async/staleness_max"] == 0.0 and rb["async/version"] == ra["step"] - 1
    assert any("sync/logprob_abs_diff_max" in r for r in b)  # the parity probe checks the refits across the bridge

    wa, wb = _weights(colocated), _weights(apart)
    assert wa.keys() == wb.keys()
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < 1e-4

    layout = json.loads((apart / "summary.json").read_text())["layout"]
    assert (layout["placement"], layout["trainer_ranks"], layout["rollout_ranks"], layout["max_staleness"]) == ("disaggregated", 1, 1, 0)


@pytest.mark.slow
def test_one_step_stale_rollouts_resume_exactly_after_a_preemption(base_model, tmp_path):
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    common = ["steps=4", "placement=disaggregated", "async.max_staleness=1"]
    cli(*_args(base_model, straight, *common), ranks=2)
    rows = _rows(straight)
    trained = [r for r in rows if "train/loss" in r]
    assert [r["async/staleness_max"] for r in trained] == [0.0, 1.0, 1.0, 1.0]  # batch t: the weights of step t-1
    assert [r["async/version"] for r in trained] == [0.0, 0.0, 1.0, 2.0]
    assert all(r["async/trainer_wait_s"] >= 0 and r["async/rollout_s"] > 0 for r in trained)

    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(harness), *_args(base_model, preempted, *common)]
    env = {**os.environ, "SIGNAL_AT": "3", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode != 0 and f"exitcode  : {REQUEUE_EXIT_CODE}" in log, log[-5000:]
    assert "megatron-r1: step 3 of 4 is saved" in log
    assert (preempted / "checkpoints/latest").read_text().strip() == "3"

    again = cli(*_args(base_model, preempted, *common), ranks=2)
    assert "resumed from" in again.stdout + again.stderr
    assert _steady(_rows(preempted)) == _steady(rows)  # every step once, every number as uninterrupted
    assert (preempted / "hf/model.safetensors").read_bytes() == (straight / "hf/model.safetensors").read_bytes()


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def _launch_rank(pid: int) -> int:
    """The RANK torchrun gave a worker (its environment at start, before it joins a side's world)."""
    env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    return int(env["RANK"])


@pytest.mark.slow  # ~1.5 minutes
def test_a_frozen_rollout_rank_ends_the_job_with_its_rank_named(base_model, tmp_path):
    """SIGSTOP on the rollout rank (alive to the launcher, silent to the job): the trainer's heartbeat
    names job rank 1 and exits 76 within the timeout, instead of waiting for a batch forever."""
    import signal
    import time

    run_dir, log_path = tmp_path / "run", tmp_path / "log.txt"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_r1.cli",
              *_args(base_model, run_dir, "steps=200", "placement=disaggregated", "async.max_staleness=1", "parallel.heartbeat_timeout_s=10")]
    with open(log_path, "w") as log:
        job = subprocess.Popen(launch, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").exists() or '"step": 1,' not in (run_dir / "metrics.jsonl").read_text():
            assert job.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.5)
        ranks = {_launch_rank(pid): pid for pid in _children(job.pid)}
        assert sorted(ranks) == [0, 1], ranks
        rollout = ranks[1]  # the last rank is the rollout rank
        os.kill(rollout, signal.SIGSTOP)
        stopped = time.monotonic()
        while "stopped responding" not in log_path.read_text():
            assert time.monotonic() - stopped < 90, log_path.read_text()[-4000:]
            time.sleep(0.5)
        noticed = time.monotonic() - stopped
        os.kill(rollout, signal.SIGKILL)  # a stopped process would hold the launcher's shutdown for its grace period
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    log = log_path.read_text()
    assert "megatron-r1 [rank 0]: rank 1 stopped responding" in log and "exitcode  : 76" in log, log[-4000:]
    assert noticed < 10 + 30  # the timeout, plus the watcher's check interval and the step in progress
