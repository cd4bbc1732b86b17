"""`megatron-r1 pipeline` files: checked when they load, and the shipped one's commands start where they
should. The whole shipped pipeline, killed mid-stage, resumed and rerun, is tests/e2e/test_pipeline_effects.py
(`make test-slow`)."""

import pytest

from megatron_r1.config import ConfigError
from megatron_r1.pipeline import load_pipeline
from tests.e2e.conftest import ROOT


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
