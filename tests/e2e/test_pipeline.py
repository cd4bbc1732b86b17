"""`megatron-r1 pipeline` end to end on CPU: rejection sampling -> cold-start SFT (+ held-out evaluation)
-> reasoning RL with the language reward -> reward model -> final RL over mixed prompts, each stage
reading the previous one's output; killed mid-stage and rerun, it skips what finished and the killed
stage resumes from its checkpoint; a rerun of a finished pipeline does no work."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_r1.config import ConfigError
from megatron_r1.pipeline import load_pipeline
from tests.e2e.conftest import ROOT, cli
from tests.e2e.test_r1_zero import TINY_RUN

PIPELINE = """
name: tiny_test
run_dir: {run_dir}
stages:
  - name: cold_start_sft
    run:
      - rejection-sample conf/stages/rejection_sampling_tiny.yaml checkpoint.load_hf={base} logging.run_dir=${{stage}}/data rejection.max_prompts=32 rejection.samples_per_prompt=8 rollout.max_response_tokens=48 logging.progress_bar=false
      - sft conf/stages/sft_tiny.yaml checkpoint.load_hf={base} checkpoint.base_stage= sft.train_path=${{stage}}/data/data.jsonl sft.epochs=1 sft.max_steps=2 optimizer.lr_warmup_steps=0 logging.progress_bar=false logging.run_dir=${{stage}}
      - evaluate conf/stages/r1_zero_tiny.yaml checkpoint.load_hf=${{stage}}/hf checkpoint.base_stage= {tiny} logging.run_dir=${{stage}}/eval
  - name: reasoning_rl
    run: r1-zero conf/stages/r1_zero_tiny.yaml checkpoint.load_hf=${{cold_start_sft}}/hf checkpoint.base_stage= reward.language_weight=0.1 steps=3 {tiny} checkpoint.save_every=1 logging.run_dir=${{stage}}
  - name: reward_model
    run: reward-model conf/stages/reward_model_tiny.yaml checkpoint.load_hf=${{reasoning_rl}}/hf checkpoint.base_stage= reward_model.synthetic_pairs=64 reward_model.synthetic_eval_pairs=32 optimizer.lr_warmup_steps=0 logging.progress_bar=false logging.run_dir=${{stage}}
  - name: final_rl
    run: grpo conf/stages/final_rl_tiny.yaml checkpoint.load_hf=${{reasoning_rl}}/hf reward.model_path=${{reward_model}}/hf data.languages=[] steps=2 {tiny} logging.run_dir=${{stage}}
"""


@pytest.mark.slow  # ~9 minutes on 2 cores: every stage of the R1 pipeline, killed and resumed (`make test-slow`)
def test_pipeline_chains_stages_resumes_after_a_kill_and_skips_finished_ones(base_model, tmp_path):
    run_dir = tmp_path / "pipe"
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(PIPELINE.format(run_dir=run_dir, base=base_model, tiny=" ".join(TINY_RUN)))

    # Killed in the middle of the RL stage (pipeline and stage process alike), as a preempted job is.
    proc = subprocess.Popen([sys.executable, "-m", "megatron_r1.cli", "pipeline", str(spec)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run_dir / "reasoning_rl/checkpoints/latest"
    deadline = time.monotonic() + 900
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.exists() and not (run_dir / "reasoning_rl/summary.json").exists(), "the stage was not caught mid-way"

    # Rerun: the finished commands are skipped, the killed stage resumes from its checkpoint.
    out = cli("pipeline", str(spec))
    assert out.stderr.count("done already") == 3 and "resumed from" in out.stderr
    assert "pipeline tiny_test finished" in out.stdout
    table = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert [r["stage"] for r in table] == ["cold_start_sft", "reasoning_rl", "reward_model", "final_rl"]
    assert table[0]["samples_kept"] > 0 and table[0]["sft_loss"] > 0 and 0.0 <= table[0]["accuracy"] <= 1.0
    assert 0.0 <= table[1]["accuracy"] <= 1.0 and table[1]["language_consistency"] is not None
    assert 0.0 <= table[2]["pair_accuracy"] <= 1.0 and 0.0 <= table[3]["accuracy"] <= 1.0
    rl = json.loads((run_dir / "reasoning_rl/summary.json").read_text())
    assert rl["base_model"] == str(run_dir / "cold_start_sft/hf")  # each stage starts from the previous one's output
    assert rl["config"]["reward"]["language_weight"] == 0.1 and rl["steps"] == 3
    final = json.loads((run_dir / "final_rl/summary.json").read_text())
    assert final["config"]["reward"]["model_path"] == str(run_dir / "reward_model/hf") and final["stage"] == "final_rl"
    rows = [json.loads(line) for line in (run_dir / "final_rl/metrics.jsonl").read_text().splitlines()]
    assert all("reward/general/reward_model" in r and "reward/reasoning/accuracy" in r for r in rows if "time/step" in r)

    # A finished pipeline: nothing runs again.
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("summary.json")}
    again = cli("pipeline", str(spec))
    assert again.stderr.count("done already") == 6
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("summary.json")} == stamps


def test_pipeline_files_are_checked(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - name: warmup\n    run: sft conf/stages/sft_tiny.yaml\n")
    with pytest.raises(ConfigError, match="'warmup' is not one of: r1_zero, cold_start_sft"):
        load_pipeline(bad)
    bad.write_text("stages:\n  - name: sft\n    run: sft conf/stages/sft_tiny.yaml sft.train_path=${rejection_sampling}/data.jsonl\n")
    with pytest.raises(ConfigError, match="not an earlier stage"):
        load_pipeline(bad)
    bad.write_text("stages:\n  - name: sft\n    run: train conf/stages/sft_tiny.yaml\n")
    with pytest.raises(ConfigError, match="command of: r1-zero, grpo, reward-model, evaluate, sft, rejection-sample, pretrain"):
        load_pipeline(bad)
    bad.write_text("overrides: data.languages=[en]\nstages:\n  - name: sft\n    run: sft conf/stages/sft_tiny.yaml\n")
    with pytest.raises(ConfigError, match="overrides must be a list"):
        load_pipeline(bad)
    shipped = load_pipeline(ROOT / "conf/pipelines/r1_tiny.yaml")
    assert [s.name for s in shipped.stages] == ["r1_zero", "cold_start_sft", "reasoning_rl", "rejection_sampling", "sft",
                                                "reward_model", "final_rl", "distill", "student_rl"]
    # The shared overrides come first, so a command's own win.
    rl = shipped.stages[2].jobs[0].overrides
    assert rl[:2] == ["data.languages=[en,zh]", "reward.languages=[en,zh]"] and "checkpoint.load_hf=runs/r1_tiny/cold_start_sft/hf" in rl
    # seed=N reaches every command (after the shared overrides, before the command's own); other keys are refused.
    seeded = load_pipeline(ROOT / "conf/pipelines/r1_tiny.yaml", ["seed=1235", "run_dir=runs/r1_tiny_seed1235"])
    assert all("seed=1235" in job.overrides for stage in seeded.stages for job in stage.jobs)
    assert str(seeded.stages[2].jobs[0].overrides).count("runs/r1_tiny_seed1235/cold_start_sft/hf") == 1
    with pytest.raises(ConfigError, match="the seed must be an integer"):
        load_pipeline(ROOT / "conf/pipelines/r1_tiny.yaml", ["seed=abc"])
    with pytest.raises(ConfigError, match="only run_dir=, launcher=, name= and seed="):
        load_pipeline(ROOT / "conf/pipelines/r1_tiny.yaml", ["steps=3"])


def test_shipped_pipeline_commands_load_and_start_from_shipped_bases():
    """Every command of `make r1-pipeline` parses with its overrides (a typo would stop the pipeline
    minutes in), poses the headroom task, and starts from a shipped base or an earlier stage."""
    from megatron_r1.config import load_config

    shipped = load_pipeline(ROOT / "conf/pipelines/r1_tiny.yaml")
    for stage in shipped.stages:
        for job in stage.jobs:
            cfg = load_config(ROOT / job.config, job.overrides)
            assert cfg.data.task_options["max_digits"] == 2 and cfg.data.languages == ["en", "zh"]
            source = cfg.checkpoint.load_hf
            assert source.startswith(("assets/", "runs/r1_tiny/")), f"[{stage.name}] {job.command} starts from {source}"
            if source.startswith("assets/"):
                assert (ROOT / source / "SHA256SUMS").is_file()
    student = {s.name: s for s in shipped.stages}["student_rl"].jobs[0]
    assert load_config(ROOT / student.config, student.overrides).model.hidden_size == 64  # the distilled student's size
