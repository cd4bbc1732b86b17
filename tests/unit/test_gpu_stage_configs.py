"""The GPU recipes for every R1 stage, and the GPU pipeline files, checked the way a cluster user would
before an allocation: every training/generation job of a pipeline, with the pipeline's own overrides,
loads and fits on the pipeline's nodes by `megatron-r1 plan`, and every file a job reads that no
earlier stage writes is one the README says how to make."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_r1.cli import load_config
from megatron_r1.pipeline import load_pipeline
from megatron_r1.planner import GPUS, plan_stage

ROOT = Path(__file__).resolve().parents[2]

# pipeline file -> nodes of 8 H100 each job runs on
PIPELINES = {"conf/pipelines/r1_qwen2.5_7b.yaml": 1, "conf/pipelines/r1_deepseek_v3.yaml": 32}
# stand-alone stage recipes -> nodes
STAGES = {
    "conf/stages/r1_zero_qwen2.5_7b.yaml": 1, "conf/stages/sft_qwen2.5_7b.yaml": 1, "conf/stages/rejection_sampling_qwen2.5_7b.yaml": 1,
    "conf/stages/reward_model_qwen2.5_7b.yaml": 1, "conf/stages/final_rl_qwen2.5_7b.yaml": 1, "conf/stages/sft_qwen2.5_1.5b.yaml": 1,
    "conf/stages/r1_zero_deepseek_v3.yaml": 32, "conf/stages/sft_deepseek_v3.yaml": 32,
    "conf/stages/rejection_sampling_deepseek_v3.yaml": 32, "conf/stages/final_rl_deepseek_v3.yaml": 32,
}
PLANNED = ("r1-zero", "grpo", "sft", "reward-model", "rejection-sample")  # evaluate: the engine of a planned stage


def _jobs():
    for path, nodes in PIPELINES.items():
        pipeline = load_pipeline(ROOT / path)
        for stage in pipeline.stages:
            for i, job in enumerate(stage.jobs):
                yield pytest.param(job, nodes, id=f"{Path(path).stem}:{stage.name}:{i}:{job.command}")


@pytest.mark.parametrize("recipe, nodes", list(STAGES.items()), ids=[Path(p).stem for p in STAGES])
def test_every_gpu_stage_recipe_fits_its_nodes(one_rank, recipe, nodes):
    result = plan_stage(load_config(ROOT / recipe, []), nodes, GPUS["h100"])
    assert result.fits, (recipe, result.problems)


@pytest.mark.parametrize("job, nodes", list(_jobs()))
def test_every_job_of_the_gpu_pipelines_loads_and_fits(one_rank, job, nodes):
    cfg = load_config(ROOT / job.config, job.overrides)
    if job.command in PLANNED:
        result = plan_stage(cfg, nodes, GPUS["h100"])
        assert result.fits, (job.argv(), result.problems)


def test_the_gpu_pipelines_cover_every_stage():
    for path in PIPELINES:
        names = [s.name for s in load_pipeline(ROOT / path).stages]
        assert names[0] == "r1_zero" and names[-1] == "distill" and {"cold_start_sft", "reasoning_rl", "rejection_sampling", "sft", "final_rl"} <= set(names)


def test_every_input_a_gpu_recipe_reads_is_made_by_a_command_the_readme_shows():
    """Weights and data that no earlier stage writes must appear in the README's "What a recipe reads"."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**What a recipe reads, and how to make it.**"):]
    section = section[: section.index("**Site settings**")]
    needed = set()
    for recipe in STAGES:
        cfg = load_config(ROOT / recipe, [])
        for value in (cfg.checkpoint.load_hf, cfg.data.train_path, cfg.data.eval_path, cfg.data.general_path,
                      cfg.reward_model.train_path, cfg.reward_model.eval_path):
            if value and not value.startswith("runs/"):  # runs/...: written by an earlier stage
                needed.add(value)
    missing = sorted(v for v in needed if v not in section)
    assert not missing, f"the README's cluster section does not say how to make: {missing}"
    assert re.search(r"prepare-data .*--format preferences", section)
