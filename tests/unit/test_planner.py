"""`megatron-r1 plan`: parameter counts from the model-building code, activation estimates against
what a forward really keeps (measured on CPU), and the verdicts on the 671B recipe and the old layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_r1.config import ConfigError, MemoryConfig, ParallelConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 0.05  # the activation estimate vs the bytes a CPU forward keeps for backward (README)
OLD_LAYOUT = [  # what conf/stages/r1_zero_deepseek_v3.yaml shipped before the planner existed
    "parallel.tensor_model_parallel_size=8", "parallel.pipeline_model_parallel_size=8",
    "parallel.num_layers_in_first_pipeline_stage=null", "parallel.num_layers_in_last_pipeline_stage=null",
    "parallel.expert_model_parallel_size=32", "memory.recompute=none", "memory.optimizer_offload_fraction=0",
    "rollout.engine_tensor_parallel_size=8", "rollout.engine_pipeline_parallel_size=1",
    "rollout.gpu_memory_utilization=0.5", "model.mtp_num_layers=1", "memory.swap_during_rollout=none",
]


def _model(preset: str):
    return load_config(None, [f"model.preset={preset}"]).model


@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe", "tiny_student"])
def test_counts_equal_the_built_model(one_rank, preset):
    from megatron_r1.models.build import build_model, num_parameters
    from megatron_r1.planner.params import count_parameters, rank_parameters

    cfg = _model(preset)
    counts = count_parameters(cfg)
    built = num_parameters(build_model(cfg, ParallelConfig()))
    assert counts.total == built
    assert rank_parameters(counts, ParallelConfig(), 0).total == built


def test_deepseek_v3_is_671b_with_37b_active(one_rank):
    from megatron_r1.planner.params import active_parameters, count_parameters

    cfg = _model("deepseek_v3_671b")
    counts = count_parameters(cfg)
    assert counts.total == pytest.approx(671e9, rel=0.01)
    assert 11e9 < counts.mtp.total < 12e9  # one MoE layer + projection; embedding and head shared
    assert active_parameters(counts, cfg) == pytest.approx(37e9, rel=0.03)
    assert counts.moe_layers == [False] * 3 + [True] * 58


def test_layers_per_stage_follows_megatron():
    split = ParallelConfig(pipeline_model_parallel_size=16, num_layers_in_first_pipeline_stage=3, num_layers_in_last_pipeline_stage=2)
    assert split.layers_per_stage(61) == [3] + [4] * 14 + [2]
    assert ParallelConfig(pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=3).layers_per_stage(5) == [3, 2]
    assert ParallelConfig(pipeline_model_parallel_size=4).layers_per_stage(8) == [2, 2, 2, 2]
    with pytest.raises(ConfigError, match="61 layers cannot be split over 8"):
        ParallelConfig(pipeline_model_parallel_size=8).layers_per_stage(61)


@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe"])
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_activation_estimate_matches_what_a_forward_keeps(one_rank, preset, recompute):
    from megatron_r1.models.build import build_model, moe_layers
    from megatron_r1.planner.activations import Shape, layer_bytes, loss_bytes, recompute_kept_bytes
    from megatron_r1.planner.measure import saved_activation_bytes
    from megatron_r1.train.step import _forward, token_logprobs

    cfg = _model(preset)
    model = build_model(cfg, ParallelConfig(), MemoryConfig(recompute=recompute)).train()
    moe = moe_layers(cfg)
    for b, s in ((1, 96), (4, 256)):
        tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(s))
        measured, _ = saved_activation_bytes(model, lambda: token_logprobs(_forward(model, tokens)[:, :-1], tokens[:, 1:]).sum())
        # CPU attention: flash for equal q/v head sizes, the math path (scores kept) for MLA's.
        shape = Shape(s, b, flash_attention=not cfg.multi_latent_attention)
        if recompute == "full":
            estimate = recompute_kept_bytes(cfg, shape, cfg.num_layers) + loss_bytes(cfg, shape)
        else:
            estimate = sum(layer_bytes(cfg, shape, m) for m in moe) + loss_bytes(cfg, shape)
        assert estimate == pytest.approx(measured, rel=TOLERANCE), (b, s)


def _plan(*args: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "megatron_r1.cli", "plan", *args, "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    return proc.returncode, json.loads(proc.stdout)


def test_the_671b_recipe_fits_32_nodes_and_the_old_layout_does_not():
    code, new = _plan("conf/stages/r1_zero_deepseek_v3.yaml", "--nodes", "32")
    assert code == 0 and new["fits"] is True and new["breaks"] is None
    assert new["gpus"] == 256 and new["total_params"] == pytest.approx(671e9, rel=0.01)
    parts = new["per_gpu_bytes"]
    for name in ("weights", "gradients", "optimizer", "reference", "activations", "engine_weights", "engine_kv_cache"):
        assert name in parts
    assert parts["optimizer"] == 0  # held on the host
    assert max(new["train_peak_bytes"], new["rollout_peak_bytes"]) <= new["capacity_bytes"]
    assert new["engine"]["concurrent_sequences"] >= 1
    assert new["layout"]["layers_per_stage"] == [3] + [4] * 14 + [2]

    code, old = _plan("conf/stages/r1_zero_deepseek_v3.yaml", *OLD_LAYOUT, "--nodes", "32")
    assert code == 1 and old["fits"] is False
    assert old["breaks"] == "engine_weights"  # 671B in bf16 over 8 GPUs cannot sit in 40 GiB each
    assert old["mtp_params"] > 11e9
    problems = "\n".join(old["problems"])
    assert "61 layers cannot be split over 8" in problems and "train:" in problems and "rollout:" in problems


def test_search_finds_the_smallest_node_count():
    code, out = _plan("conf/stages/r1_zero_qwen2.5_7b.yaml", "--search", "--nodes", "1")
    assert code == 0 and out["smallest_fitting_nodes"] == 1
    # EP16 x PP16 needs 256 GPUs: nothing smaller exists, and 32 nodes fit.
    _, out = _plan("conf/stages/r1_zero_deepseek_v3.yaml", "--search", "--nodes", "32")
    assert out["smallest_fitting_nodes"] == 32
    # Adam's state on the GPUs and no swap: only a shard thinned over 80 data-parallel ranks fits.
    no_swap = ["memory.swap_during_rollout=none", "rollout.gpu_memory_utilization=0.6"]
    code, out = _plan("conf/stages/r1_zero_deepseek_v3.yaml", "memory.optimizer_offload_fraction=0", *no_swap, "--search", "--nodes", "32")
    assert code == 1 and out["smallest_fitting_nodes"] == 320 and out["breaks"] in ("activations", "optimizer", "engine_budget")
    assert any(p.startswith("train:") for p in out["problems"]) and any(p.startswith("rollout:") for p in out["problems"])


def test_table_names_the_verdict():
    proc = subprocess.run([sys.executable, "-m", "megatron_r1.cli", "plan", "conf/stages/r1_zero_deepseek_v3.yaml", "--nodes", "32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fits" in proc.stdout.splitlines()[-1] and "rollout peak" in proc.stdout


STAGES = sorted(p.name for p in (ROOT / "conf/stages").glob("*_tiny*.yaml"))


@pytest.mark.parametrize("stage", STAGES)
def test_planner_accepts_what_the_trainer_runs(one_rank, stage):
    """Every shipped tiny stage runs in `make test` on 1 and 2 ranks: the planner must accept those
    layouts too, with the parts that stage really has (no engine for SFT-like stages, no trainer
    for rejection sampling)."""
    import dataclasses

    from megatron_r1.planner import GPUS, plan_stage

    cfg = load_config(ROOT / "conf/stages" / stage, [])
    for gpus in (1, 2):
        out = plan_stage(cfg, 1, dataclasses.replace(GPUS["h100"], per_node=gpus))
        assert out.fits and out.problems == [], (stage, gpus, out.problems)
    kind = out.layout["stage_kind"]
    assert (out.engine is None) == (kind == "train")
    assert (out.train_peak_bytes == 0) == (kind == "generate")


def test_planner_refuses_what_the_trainer_refuses(one_rank):
    """The trainer splits a batch near-evenly over data-parallel ranks and refuses fewer rows than
    ranks (train/step.py data_parallel_share); so does the planner."""
    from megatron_r1.planner import GPUS, plan_stage

    few = load_config(ROOT / "conf/stages/r1_zero_tiny.yaml", ["grpo.prompts_per_step=1", "rollout.n_samples_per_prompt=4"])
    out = plan_stage(few, 1, GPUS["h100"])
    assert not out.fits and any("a batch of 4 sequences per update cannot feed 8 data-parallel ranks" in p for p in out.problems)
    uneven = load_config(ROOT / "conf/stages/r1_zero_tiny.yaml", ["grpo.prompts_per_step=3"])  # 24 rows over 16 ranks
    assert plan_stage(uneven, 2, GPUS["h100"]).problems == []


def test_plan_arguments_are_checked_and_explained(one_rank):
    import dataclasses

    from megatron_r1.planner import GPUS, plan_stage
    from megatron_r1.planner.report import to_table

    out = subprocess.run([sys.executable, "-m", "megatron_r1.cli", "plan", "conf/stages/r1_zero_tiny.yaml", "--nodes", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip() == "megatron-r1 plan: --nodes must be >= 1, got 0"
    one = dataclasses.replace(GPUS["h100"], per_node=1)
    table = to_table(plan_stage(load_config(ROOT / "conf/stages/r1_zero_tiny.yaml", []), 1, one))
    assert "591.2K parameters" in table and "0.00B" not in table and "1 node x 1 H100 80GB = 1 GPU " in table
    table = to_table(plan_stage(load_config(ROOT / "conf/stages/sft_tiny.yaml", []), 1, GPUS["h100"]))
    assert "training only, no engine" in table and "engine budget" not in table
    on_gpus = ["memory.optimizer_offload_fraction=0", "memory.precision_aware_optimizer=false"]
    no_swap = load_config(ROOT / "conf/stages/r1_zero_deepseek_v3.yaml", [*on_gpus, "memory.swap_during_rollout=none"])
    assert "no node count up to 1024 fits" in to_table(plan_stage(no_swap, 32, GPUS["h100"], search=True))
    # Adam's state moved out during generation: the engine gets its room, training needs 64 nodes.
    swapped = load_config(ROOT / "conf/stages/r1_zero_deepseek_v3.yaml", on_gpus)
    assert "smallest node count that fits: 64" in to_table(plan_stage(swapped, 32, GPUS["h100"], search=True))
    split = load_config(ROOT / "conf/stages/r1_zero_deepseek_v3.yaml", ["parallel.num_layers_in_first_pipeline_stage=5"])
    table = to_table(plan_stage(split, 32, GPUS["h100"]))
    assert "with 5 on the first stage, 2 on the last stage" in table and "None" not in table
