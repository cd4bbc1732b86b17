"""Every training command keeps the same promises, because one loop (`train/loop.py`) keeps them:

* a preemption signal (SIGUSR1, as Slurm sends before the time limit) during step k finishes step k,
  saves it and exits with the requeue status 75; rerunning the same command resumes and reaches
  the uninterrupted run's numbers at every later step, each step logged once;
* `optimizer.max_nonfinite_steps` skipped updates in a row save the last state and stop with one
  line (exit 1);
* a fresh start (`checkpoint.resume=false`) begins an empty metrics.jsonl.

The signal is sent by the process to itself at the start of the step boundary of step k (the real
signal and handler; only the moment is fixed, so the test does not race the run).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_r1.train.preemption import REQUEUE_EXIT_CODE
from tests.e2e.conftest import ROOT, cli
from tests.e2e.test_r1_zero import TINY_RUN
from tests.e2e.test_sft import _conversations

# The CLI with SIGUSR1 delivered while step $SIGNAL_AT_STEP ends.
HARNESS = """
import os, signal, sys
from megatron_r1.train.preemption import PreemptionWatch

at = int(os.environ.get("SIGNAL_AT_STEP", "0"))
real = PreemptionWatch.stop_requested

def stop_requested(self, step):
    if step == at:
        os.kill(os.getpid(), signal.SIGUSR1)
    return real(self, step)

PreemptionWatch.stop_requested = stop_requested
from megatron_r1.cli import main
sys.exit(main(sys.argv[1:]))
"""

STEPS = 4


def _stage_args(stage: str, base: Path, data: Path) -> list[str]:
    quiet = ["logging.progress_bar=false", "checkpoint.save_every=0", f"steps={STEPS}", "optimizer.lr_warmup_steps=0"]
    start = [f"checkpoint.load_hf={base}", "checkpoint.base_stage="]
    return {
        "pretrain": ["pretrain", "conf/stages/pretrain_tiny.yaml", *quiet, "pretrain.tokenizer_texts=2000", "pretrain.batch_size=8",
                     "pretrain.probe_samples=0"],
        "sft": ["sft", "conf/stages/sft_tiny.yaml", *quiet, *start, f"sft.train_path={data}", "sft.eval_path=", "sft.packing=false", "sft.batch_size=4",
                "sft.micro_batch_size=2", f"sft.max_steps={STEPS}"],
        "reward-model": ["reward-model", "conf/stages/reward_model_tiny.yaml", *quiet, *start, "reward_model.synthetic_pairs=32",
                         "reward_model.synthetic_eval_pairs=8", "reward_model.batch_size=8", "reward_model.micro_batch_size=8",
                         "reward_model.eval_every=2"],
        "r1-zero": ["r1-zero", "conf/stages/r1_zero_tiny.yaml", *start, *TINY_RUN, *quiet, "rollout.probe_every=0", "logging.eval_every=0"],
    }[stage]


def _run(args: list[str], run_dir: Path, signal_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "SIGNAL_AT_STEP": str(signal_at)}
    return subprocess.run([sys.executable, "-c", HARNESS, *args, f"logging.run_dir={run_dir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _trained(run_dir: Path, key: str) -> dict[int, float]:
    rows = [r for r in _rows(run_dir) if key in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r[key] for r in rows}


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("contract_sft") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _conversations(32, seed=41)))
    return path


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward-model", "r1-zero"])
def test_every_training_stage_saves_on_a_signal_resumes_exactly_and_stops_on_nonfinite_updates(stage, base_model, sft_data, tmp_path):
    args = _stage_args(stage, base_model, sft_data)
    key = "pretrain/loss" if stage == "pretrain" else "train/loss"
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    cli(*args, f"logging.run_dir={straight}")
    reference = _trained(straight, key)
    assert sorted(reference) == list(range(1, STEPS + 1))

    # SIGUSR1 during step 2: step 2 is saved, the requeue status, one line saying so.
    out = _run(args, preempted, signal_at=2)
    assert out.returncode == REQUEUE_EXIT_CODE, out.stderr[-3000:]
    assert "step 2 of 4 is saved" in out.stderr.strip().splitlines()[-1]
    assert (preempted / "checkpoints/latest").read_text().strip() == "2"
    assert sorted(_trained(preempted, key)) == [1, 2]

    # The same command again: resumes at step 3 and ends where the straight run ended.
    out = _run(args, preempted)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr
    resumed = _trained(preempted, key)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (step, resumed, reference)

    # A fresh start in the same directory with a learning rate that wrecks the weights: the updates
    # after the first are skipped as non-finite, two in a row stop the run, and metrics.jsonl holds
    # this run's rows only.
    longer = {"r1-zero": ["steps=8"], "sft": ["sft.max_steps=8"]}.get(stage, [])  # RL: a step may have no gradient
    out = _run([*args, *longer, "checkpoint.resume=false", "optimizer.lr=1e30", "optimizer.clip_grad=0", "optimizer.max_nonfinite_steps=2"], straight)
    assert out.returncode == 1, out.stderr[-3000:]
    match = re.match(r"megatron-r1: stopped at step (\d+): 2 steps in a row had a non-finite loss", out.stderr.strip().splitlines()[-1])
    assert match, out.stderr[-2000:]
    stop = int(match[1])
    losses = _trained(straight, key)
    assert sorted(losses) == list(range(1, stop + 1))
    assert math.isnan(losses[stop]) and math.isnan(losses[stop - 1])  # the skipped updates' NaN stays in the log
    assert (straight / "checkpoints/latest").read_text().strip() == str(stop)
