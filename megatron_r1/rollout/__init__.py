"""Rollouts: the colocated vLLM engine and the weight sync that keeps it on the current policy."""

from megatron_r1.rollout.vllm_engine import Rollout, VLLMEngine, engine_group, engine_layout, engine_visible_devices, owns_engine
from megatron_r1.rollout.weight_sync import ParityProbe, SyncStats, WeightSync, WeightSyncError, bucketed

__all__ = [
    "ParityProbe",
    "Rollout",
    "SyncStats",
    "VLLMEngine",
    "WeightSync",
    "WeightSyncError",
    "bucketed",
    "engine_group",
    "engine_layout",
    "engine_visible_devices",
    "owns_engine",
]
