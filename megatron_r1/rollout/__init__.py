"""Rollouts: the colocated vLLM engines (one worker per trainer rank), their layout, and weight sync."""

from megatron_r1.rollout.layout import EngineGroups, EngineLayout
from megatron_r1.rollout.vllm_engine import Rollout, VLLMEngine
from megatron_r1.rollout.weight_sync import ParityProbe, SyncStats, WeightSync, WeightSyncError, bucketed

__all__ = [
    "EngineGroups",
    "EngineLayout",
    "ParityProbe",
    "Rollout",
    "SyncStats",
    "VLLMEngine",
    "WeightSync",
    "WeightSyncError",
    "bucketed",
]
