"""Every training command keeps the same promises, because one loop (`train/loop.py`) keeps them:

* a preemption signal (SIGUSR1, as Slurm sends before the time limit) during step k finishes step k,
  saves it and exits with the requeue status 75; rerunning the same command resumes and reaches
  the uninterrupted run's numbers at every later step, each step logged once;
* `optimizer.max_nonfinite_steps` skipped updates in a row save the last state and stop with one
  line (exit 1);
* a fresh start (`checkpoint.resume=false`) begins an empty metrics.jsonl.

The signal is sent by the process to itself at the step boundary of step k (the real signal and
handler; only the moment is fixed, so the test does not race the run).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_r1.train.preemption import REQUEUE_EXIT_CODE
from tests.e2e.conftest import ROOT
from tests.e2e.test_r1_zero import TINY_RUN
from tests.e2e.test_sft import _conversations

# The CLI, once per run of argv[1] (a JSON list of {"argv", "signal_at"}), with SIGUSR1 delivered while
# step `signal_at` ends. Several runs share one process where they can (the stages without an engine),
# as a user's reruns of the same command would each start one: it saves the start-up per run.
HARNESS = """
import io, json, logging, os, signal, sys
from megatron_r1.train.preemption import PreemptionWatch
from megatron_r1.cli import main

logging.basicConfig(level=logging.INFO, stream=sys.stderr)  # logs to the real stderr, whatever main() swaps

real, results = PreemptionWatch.stop_requested, []
for run in json.loads(sys.argv[1]):
    def stop_requested(self, step, at=run["signal_at"]):
        if step == at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, step)
    PreemptionWatch.stop_requested = stop_requested
    stderr, sys.stderr = sys.stderr, io.StringIO()  # what the CLI prints (logs go to the real stderr)
    try:
        code = main(run["argv"])
    finally:
        printed, sys.stderr = sys.stderr.getvalue(), stderr
    results.append({"code": code, "printed": printed.strip().splitlines()})
print("RESULTS " + json.dumps(results))
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
        "r1-zero": ["r1-zero", "conf/stages/r1_zero_tiny.yaml", *start, *TINY_RUN, *quiet, "rollout.probe_every=2", "logging.eval_every=0",
                    "grpo.kl_beta=0.01"],  # a reference model, for the swap to move
    }[stage]


def _runs(runs: list[tuple[list[str], int]], separate: bool = False) -> tuple[list[dict], str]:
    """Each (argv, signal_at) through the harness: one process for all, or one each (`separate`)."""
    if separate:
        outcomes = [_runs([run]) for run in runs]
        return [r for results, _ in outcomes for r in results], "".join(log for _, log in outcomes)
    spec = json.dumps([{"argv": argv, "signal_at": at} for argv, at in runs])
    out = subprocess.run([sys.executable, "-c", HARNESS, spec], cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULTS ")]
    assert out.returncode == 0 and lines, out.stderr[-5000:]
    return json.loads(lines[-1][len("RESULTS "):]), out.stderr


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
    straight, preempted, wrecked = tmp_path / "straight", tmp_path / "preempted", tmp_path / "wrecked"
    longer = {"r1-zero": ["steps=8"], "sft": ["sft.max_steps=8"]}.get(stage, [])  # RL: a step may have no gradient
    wreck = ["checkpoint.resume=false", "optimizer.lr=1e30", "optimizer.clip_grad=0", "optimizer.max_nonfinite_steps=2"]
    wrecked.mkdir()
    (wrecked / "metrics.jsonl").write_text(json.dumps({"step": 9, key: 0.0}) + "\n")  # an earlier run's row
    # RL: the interrupted run moves the trainer off the device during generation, the straight one
    # does not; both promises (resume, swap) are bit-for-bit, so the runs must agree exactly.
    swap = ["memory.swap_during_rollout=all"] if stage == "r1-zero" else []
    results, log = _runs([
        ([*args, f"logging.run_dir={straight}"], 0),  # uninterrupted
        ([*args, *swap, f"logging.run_dir={preempted}"], 2),  # SIGUSR1 during step 2
        ([*args, *swap, f"logging.run_dir={preempted}"], 0),  # the same command again
        ([*args, *longer, *wreck, f"logging.run_dir={wrecked}"], 0),  # a fresh start that goes wrong
    ], separate=stage == "r1-zero")  # a vLLM engine per process, as users run it
    reference = _trained(straight, key)
    assert results[0]["code"] == 0 and sorted(reference) == list(range(1, STEPS + 1))

    # The preempted run saved step 2 and asked for a requeue, in one line.
    assert results[1]["code"] == REQUEUE_EXIT_CODE, results[1]
    assert "step 2 of 4 is saved" in results[1]["printed"][-1]

    # Rerun: resumed at step 3, ended where the straight run ended, each step logged once.
    assert results[2]["code"] == 0 and "resumed from" in log, results[2]
    resumed = _trained(preempted, key)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (step, resumed, reference)
    if swap:  # every number a step logs (times aside) and the exported weights, exactly
        volatile = ("time/", "perf/", "sync/seconds", "sync/gb_per_s", "sync/probe_seconds")
        rows = [{k: v for k, v in r.items() if not k.startswith(volatile)} for r in _rows(straight)]
        assert [{k: v for k, v in r.items() if not k.startswith(volatile)} for r in _rows(preempted)] == rows
        assert any("train/kl" in r for r in rows) and any("sync/logprob_abs_diff_max" in r for r in rows)
        assert (preempted / "hf/model.safetensors").read_bytes() == (straight / "hf/model.safetensors").read_bytes()

    # The fresh start with a learning rate that wrecks the weights: the updates after the first are
    # skipped as non-finite, two in a row stop the run (exit 1, one line), and metrics.jsonl holds this
    # run's rows only (the earlier run's row is gone).
    result = results[3]
    assert result["code"] == 1, result
    match = re.match(r"megatron-r1: stopped at step (\d+): 2 steps in a row had a non-finite loss", result["printed"][-1])
    assert match, result
    stop = int(match[1])
    losses = _trained(wrecked, key)
    assert sorted(losses) == list(range(1, stop + 1))
    assert math.isnan(losses[stop]) and math.isnan(losses[stop - 1])  # the skipped updates' NaN stays in the log
    assert (wrecked / "checkpoints/latest").read_text().strip() == str(stop)
