"""`make r1-pipeline` shows what each DeepSeek-R1 stage is for: the direction of every stage's effect,
on the shipped pipeline itself (conf/pipelines/r1_tiny.yaml, the shipped bases, the headroom task).

The effects need the stages' full lengths (language consistency moves over ~150 GRPO steps), so this
runs the whole pipeline: about 30 minutes on 2 cores (`make test-slow`). To check a pipeline that has
already run, point R1_PIPELINE_RUN_DIR at its run_dir (e.g. runs/r1_tiny): finished commands are
skipped, so only the table is rebuilt and checked.

Directions, not the README's digits: another CPU rounds the RL runs differently, so margins are
loose where the effect is large and absent where only the sign is claimed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT


@pytest.mark.slow
@pytest.mark.timeout(2 * 3600)  # the whole pipeline: past the suite's 15-minute limit per test
def test_each_stage_does_its_job(tmp_path):
    run_dir = Path(os.environ.get("R1_PIPELINE_RUN_DIR") or tmp_path / "r1_tiny")
    out = subprocess.run([sys.executable, "-m", "megatron_r1.cli", "pipeline", "conf/pipelines/r1_tiny.yaml", f"run_dir={run_dir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=7000)
    assert out.returncode == 0, f"the pipeline failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
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
