"""The GPU recipes checked on a CPU machine, by our validation and by Megatron-Core's own.

Each test here failed on the code that first read the CUDA path against the pinned libraries
(issue: seven defects that would stop the first GPU run): the optimizer offload without the
precision-aware optimizer, the precision-aware optimizer without the distributed optimizer, float32
MLA engines on CUDA, FP8 weight caches left on the GPU while the engine generates, MXFP8's sequence
alignment, and Apex's LayerNorm-only norm in the non-TE spec. (The host tensor in `convert`'s
pipeline all-reduce is caught by the strict-device gloo runs, tests/distributed/test_uneven_pipeline.py.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_r1.config import ConfigError, RolloutConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
GPU_RECIPES = ["conf/stages/r1_zero_deepseek_v3.yaml", "conf/stages/r1_zero_qwen2.5_7b.yaml"]


@pytest.fixture
def te_node(monkeypatch):
    """Megatron's config checks ask Transformer Engine's version for FP8 MoE; answer as a GPU node
    with TE 2.8 would (nothing else of TE is used: the configs are only built, never run)."""
    from packaging.version import Version

    import megatron.core.utils as mutils

    monkeypatch.setattr(mutils, "get_te_version", lambda: Version("2.8.0"))


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_gpu_recipes_pass_megatrons_own_validation(te_node, recipe):
    """The TransformerConfig and OptimizerConfig a GPU rank builds, constructed here: their
    `__post_init__` checks are Megatron's validation of the recipe."""
    from megatron_r1.models.build import transformer_config
    from megatron_r1.train.optim import megatron_optimizer_config

    cfg = load_config(ROOT / recipe, [])
    tc = transformer_config(cfg.model, cfg.parallel, cfg.memory, gpu=True)
    assert tc.fp8 == ("hybrid" if cfg.model.fp8_recipe else None)
    oc = megatron_optimizer_config(cfg.optimizer, cfg.parallel, cfg.memory, tc.params_dtype)
    if cfg.memory.optimizer_offload_fraction > 0:
        # Megatron's hybrid optimizer path: no fp32 master shard kept by the distributed optimizer.
        assert oc.optimizer_cpu_offload and oc.use_precision_aware_optimizer_no_fp8_or_ds_fp8


# 1. Optimizer offload needs the precision-aware optimizer -------------------------------------


def test_offload_without_precision_aware_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="memory.precision_aware_optimizer=true"):
        load_config(ROOT / GPU_RECIPES[0], ["memory.precision_aware_optimizer=false"])


def test_planner_counts_the_optimizer_where_megatron_keeps_it():
    from megatron_r1.planner.memory import optimizer_bytes_per_param

    # bf16 weights, no offload: fp32 master + fp32 moments, or TE FusedAdam's bf16 moments
    assert optimizer_bytes_per_param("bfloat16", False, 0.0) == (12, 0.0)
    assert optimizer_bytes_per_param("bfloat16", True, 0.0) == (8, 0.0)
    # full offload: nothing on the GPU; fp32 copy + fp32 moments + pinned fp32 gradient on the host
    assert optimizer_bytes_per_param("bfloat16", True, 1.0) == (0.0, 16.0)
    # half: the GPU half keeps an fp32 copy and fp32 moments (the hybrid optimizer's GPU Adam)
    assert optimizer_bytes_per_param("bfloat16", True, 0.5) == (6.0, 8.0)


def test_671b_host_memory_counts_sixteen_bytes_per_offloaded_parameter(one_rank):
    from megatron_r1.planner import GPUS, plan_stage

    cfg = load_config(ROOT / GPU_RECIPES[0], [])
    result = plan_stage(cfg, 32, GPUS["h100"])
    assert result.fits
    stage = max(result.stages, key=lambda s: s["optimizer_on_host"])
    assert stage["optimizer"] == 0
    # 16 B per parameter of the rank's optimizer shard (dense over DP 8, experts over expert-DP 1),
    # plus what the swap pins during generation (the weights and the reference model, 2 B each)
    assert stage["pinned_host"] == stage["weights"] + stage["reference"]
    assert result.host_bytes_per_node == 8 * (stage["optimizer_on_host"] + stage["pinned_host"])
    assert 300 * 2**30 < 8 * stage["optimizer_on_host"] < 400 * 2**30
    assert result.host_bytes_per_node < 2048 * 2**30


# 6. The precision-aware optimizer needs the distributed optimizer ------------------------------


def test_precision_aware_without_distributed_optimizer_is_a_config_error():
    overrides = ["memory.optimizer_offload_fraction=0", "parallel.use_distributed_optimizer=false"]
    with pytest.raises(ConfigError, match="parallel.use_distributed_optimizer=true"):
        load_config(ROOT / GPU_RECIPES[0], overrides)
    # Megatron agrees, but only deep inside build_optimizer, after the model was built and loaded.
    from megatron_r1.config import MemoryConfig, OptimizerConfig, ParallelConfig
    from megatron_r1.train.optim import megatron_optimizer_config

    with pytest.raises(AssertionError, match="distributed optimizer"):
        megatron_optimizer_config(OptimizerConfig(), ParallelConfig(use_distributed_optimizer=False),
                                  MemoryConfig(precision_aware_optimizer=True), torch.bfloat16)


# 2. MLA engines on CUDA run bf16 -------------------------------------------------------------


def test_engine_dtype_auto_is_float32_on_cpu_and_bfloat16_on_gpu():
    auto = RolloutConfig()
    assert auto.dtype == "auto"
    assert auto.engine_dtype(on_gpu=False, mla=True) == "float32"
    assert auto.engine_dtype(on_gpu=True, mla=True) == "bfloat16"
    assert RolloutConfig(dtype="float32").engine_dtype(on_gpu=True, mla=False) == "float32"
    assert RolloutConfig(dtype="float32").engine_dtype(on_gpu=False, mla=True) == "float32"  # the CPU MLA path
    with pytest.raises(ConfigError, match="rollout.dtype=bfloat16"):
        RolloutConfig(dtype="float32").engine_dtype(on_gpu=True, mla=True)


def test_planner_reports_a_float32_mla_engine(one_rank):
    from megatron_r1.planner import GPUS, plan_stage

    result = plan_stage(load_config(ROOT / GPU_RECIPES[0], ["rollout.dtype=float32"]), 32, GPUS["h100"])
    assert not result.fits and any("rollout.dtype=float32" in p for p in result.problems)
    assert load_config(ROOT / GPU_RECIPES[0], ["rollout.dtype=auto"]).rollout.engine_dtype(True, True) == "bfloat16"


def test_probe_thresholds_follow_the_engines_dtype():
    from megatron_r1.rollout.weight_sync import PROBE_THRESHOLDS, probe_thresholds

    assert probe_thresholds(RolloutConfig(), "float32") == PROBE_THRESHOLDS["float32"]
    assert probe_thresholds(RolloutConfig(), "bfloat16") == PROBE_THRESHOLDS["bfloat16"]


# 3. FP8 weight caches leave the GPU before the engine wakes ----------------------------------


class _FP8Linear(torch.nn.Linear):
    """Carries a cache where Transformer Engine's modules keep theirs (`_fp8_workspaces`)."""

    def __init__(self):
        super().__init__(64, 32, bias=False)
        self._fp8_workspaces = {"weight": torch.zeros(32, 64, dtype=torch.uint8)}


def test_refit_releases_fp8_caches_of_policy_and_reference_before_the_engine_wakes():
    from megatron_r1.rollout import weight_sync

    policy, reference = torch.nn.Sequential(_FP8Linear()), torch.nn.Sequential(_FP8Linear(), _FP8Linear())
    seen = []

    class Engine:  # records what the trainer still caches each time the engine takes memory back
        def wake_up(self, tags):
            seen.append(sum(len(m._fp8_workspaces) for m in [*policy, *reference]))

    class Syncer:
        def sync(self, tensors, traffic):
            return type("S", (), dict(seconds=0.0, gb_per_s=0.0, buckets=0, bytes=0, received_bytes=0, peak_extra_bytes=0))()

    weight_sync.export_hf_tensors, saved = (lambda *a, **k: iter(())), weight_sync.export_hf_tensors
    try:
        weight_sync.refit(Engine(), policy, None, Syncer(), None, 1, 0, reference)
    finally:
        weight_sync.export_hf_tensors = saved
    assert seen == [0, 0]


def test_release_reports_the_bytes_it_dropped():
    from megatron_r1.train.memory import release_fp8_weight_caches

    model = torch.nn.Sequential(_FP8Linear(), torch.nn.ReLU(), _FP8Linear())
    assert release_fp8_weight_caches(model, None) == 2 * 32 * 64
    assert release_fp8_weight_caches(model) == 0


def test_planner_counts_fp8_caches_in_training_only(one_rank):
    from megatron_r1.planner import GPUS, plan_stage

    cfg = load_config(ROOT / GPU_RECIPES[0], [])
    result = plan_stage(cfg, 32, GPUS["h100"])
    stage = result.stages[1]
    # the policy's cast + transpose (2 B) and the forward-only reference's cast (1 B), per bf16 weight (2 B)
    assert stage["fp8_weight_copies"] == 3 * stage["weights"] // 2
    without = plan_stage(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fp8_recipe=None)), 32, GPUS["h100"])
    assert stage["rollout_peak"] == without.stages[1]["rollout_peak"]
    assert stage["train_peak"] == without.stages[1]["train_peak"] + stage["fp8_weight_copies"]


# 5. FP8 sequence alignment is Megatron's ------------------------------------------------------


@pytest.mark.parametrize("recipe,align", [("tensorwise", 16), ("blockwise", 16), ("mxfp8", 32)])
def test_fp8_sequence_padding_follows_megatron(te_node, recipe, align):
    from megatron_r1.models.build import transformer_config
    from megatron_r1.train.step import _sequence_multiple

    cfg = load_config(ROOT / GPU_RECIPES[0], [f"model.fp8_recipe={recipe}"])
    tc = transformer_config(cfg.model, cfg.parallel, cfg.memory, gpu=True)
    assert _sequence_multiple(tc) == align * cfg.parallel.tensor_model_parallel_size  # SP cuts the sequence over TP


# 7. Apex present, Transformer Engine absent ---------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe"])
def test_local_spec_builds_rmsnorm_models_when_apex_imports(one_rank, monkeypatch, preset):
    """Megatron picks Apex's FusedLayerNorm (LayerNorm only) for the local spec's norms whenever
    Apex imports; stand its class in as Megatron's choice and build our RMSNorm models."""
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.models import backends
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_r1.models.build import build_model

    monkeypatch.setattr(gpt_layer_specs, "LNImpl", FusedLayerNorm)
    monkeypatch.setattr(backends, "LNImpl", FusedLayerNorm)
    cfg = load_config(None, [f"model.preset={preset}", "model.mtp_num_layers=1"]).model
    from megatron_r1.config import ParallelConfig

    model = build_model(cfg, ParallelConfig())
    assert not any(isinstance(m, FusedLayerNorm) for m in model.modules())
    tokens = torch.randint(0, cfg.vocab_size, (1, 8))
    loss = model(tokens, torch.arange(8).unsqueeze(0), None, labels=tokens)  # MTP needs labels
    assert torch.isfinite(loss).all()


def test_gpu_check_skips_cleanly_without_cuda():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "tools/gpu_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "no CUDA device" in out.stdout, out.stderr[-2000:]
