"""`make r1-pipeline` shows what each DeepSeek-R1 stage is for: the direction of every stage's effect,
on the shipped pipeline itself (conf/pipelines/r1_tiny.yaml, the shipped bases, the headroom task).

The effects need the stages' full lengths (language consistency moves over ~150 GRPO steps), so this
runs the whole pipeline: about 30 minutes on 2 cores (`make test-slow`). On the way it is killed in
the middle of reasoning RL, as a preempted job is, and rerun: the finished commands are skipped, the
killed stage resumes from its checkpoint (resume is exact, so the effects are those of one run), and
each stage starts from the previous one's output; a rerun of the finished pipeline does no work.
To check a pipeline that has already run, point R1_PIPELINE_RUN_DIR at its run_dir (e.g. runs/r1_tiny):
finished commands are skipped, so only the table is rebuilt and checked.

Directions, not the README's digits: another CPU rounds the RL runs differently, so margins are
loose where the effect is large and absent where only the sign is claimed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_r1.pipeline import load_pipeline
from tests.e2e.conftest import ROOT

PIPELINE = "conf/pipelines/r1_tiny.yaml"


def run_pipeline(run_dir: Path) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "megatron_r1.cli", "pipeline", PIPELINE, f"run_dir={run_dir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=7000)
    assert out.returncode == 0, f"the pipeline failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def kill_during_reasoning_rl(run_dir: Path) -> None:
    """Start the pipeline and SIGKILL it (pipeline and stage process alike) once reasoning RL has saved a checkpoint."""
    proc = subprocess.Popen([sys.executable, "-m", "megatron_r1.cli", "pipeline", PIPELINE, f"run_dir={run_dir}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run_dir / "reasoning_rl/checkpoints/latest"
    deadline = time.monotonic() + 3600
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.exists() and not (run_dir / "reasoning_rl/summary.json").exists(), "reasoning RL was not caught mid-way"


@pytest.mark.slow
@pytest.mark.timeout(2 * 3600)  # the whole pipeline: past the suite's 15-minute limit per test
def test_each_stage_does_its_job(tmp_path):
    finished = os.environ.get("R1_PIPELINE_RUN_DIR")
    run_dir = Path(finished or tmp_path / "r1_tiny")
    stages = load_pipeline(ROOT / PIPELINE, [f"run_dir={run_dir}"]).stages
    jobs = sum(len(s.jobs) for s in stages)
    if not finished:
        kill_during_reasoning_rl(run_dir)
        out = run_pipeline(run_dir)
        before = sum(len(s.jobs) for s in stages[: [s.name for s in stages].index("reasoning_rl")])
        assert out.stderr.count("done already") == before and "resumed from" in out.stderr
    else:
        run_pipeline(run_dir)  # finished commands are skipped: the table is rebuilt
    rows = {r["stage"]: r for r in json.loads((run_dir / "pipeline.json").read_text())["stages"]}
    r1_zero, cold, rl, sft, final = (rows[s] for s in ("r1_zero", "cold_start_sft", "reasoning_rl", "sft", "final_rl"))

    # R1-Zero learns the task from rule rewards alone and leaves headroom; its chains of thought mix languages.
    assert r1_zero["start_accuracy"] + 0.15 < r1_zero["accuracy"] < 0.75
    assert r1_zero["language_consistency"] < 0.65
    # The cold start makes the chain of thought follow the question's language at about the same accuracy.
    assert cold["language_consistency"] > r1_zero["language_consistency"] + 0.05
    assert abs(cold["accuracy"] - r1_zero["accuracy"]) < 0.08
    # Reasoning RL with the language reward: consistency up markedly, accuracy within a few points.
    assert rl["language_consistency"] > cold["language_consistency"] + 0.05
    assert abs(rl["accuracy"] - cold["accuracy"]) < 0.05
    # Rejection sampling keeps verified samples; SFT of the base on them reaches the RL model's accuracy.
    assert 0 < rows["rejection_sampling"]["samples_kept"] < rows["rejection_sampling"]["samples"]
    assert sft["accuracy"] > rl["accuracy"] - 0.05
    # Final RL: the reward model's score on held-out general prompts rises; reasoning accuracy holds.
    assert rows["reward_model"]["pair_accuracy"] > 0.7
    assert final["rm_score_source"] == "held-out" and final["rm_score_end"] > final["rm_score_start"]
    assert final["accuracy"] > sft["accuracy"] - 0.05
    # Distillation beats R1-Zero RL on the same small student.
    assert rows["distill"]["accuracy"] > rows["student_rl"]["accuracy"]

    # Each stage starts from the previous one's output.
    rl_summary = json.loads((run_dir / "reasoning_rl/summary.json").read_text())
    same = lambda recorded, path: (ROOT / recorded).resolve() == (ROOT / path).resolve()  # noqa: E731  (relative to the repository)
    assert same(rl_summary["base_model"], run_dir / "cold_start_sft/hf")
    final_summary = json.loads((run_dir / "final_rl/summary.json").read_text())
    assert same(final_summary["config"]["reward"]["model_path"], run_dir / "reward_model/hf")
    steps = [json.loads(line) for line in (run_dir / "final_rl/metrics.jsonl").read_text().splitlines() if line.strip()]
    assert all("reward/general/reward_model" in r and "reward/reasoning/accuracy" in r for r in steps if "time/step" in r)

    # A finished pipeline: nothing runs again.
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("summary.json")}
    assert run_pipeline(run_dir).stderr.count("done already") == jobs
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("summary.json")} == stamps
