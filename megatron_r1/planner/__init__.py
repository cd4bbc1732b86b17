"""`megatron-r1 plan`: will this layout fit, per GPU, before a cluster allocation is spent on it.

`params` counts parameters from the model-building code (meta device), `activations` estimates what
a micro-batch keeps for backward (checked against `measure` on CPU), `memory` adds weights, gradients,
optimizer, reference model and the colocated engine per GPU and gives the verdict, `report` prints it.
"""

from __future__ import annotations

from megatron_r1.config import StageConfig
from megatron_r1.planner.gpus import GPUS, Gpu
from megatron_r1.planner.memory import Plan, compare_placements, plan, search_nodes
from megatron_r1.planner.params import ParamCounts, active_parameters, count_parameters

SEARCH_MAX_NODES = 1024  # --search tries 1 .. this many nodes

__all__ = ["GPUS", "Gpu", "Plan", "ParamCounts", "plan_stage", "count_parameters"]


def plan_stage(cfg: StageConfig, nodes: int, gpu: Gpu, search: bool = False) -> Plan:
    """Count the model's parameters (one meta-device probe) and plan `cfg` on `nodes` nodes."""
    from megatron_r1 import distributed
    from megatron_r1.config import ParallelConfig

    distributed.init_distributed(ParallelConfig(backend="gloo"), seed=cfg.seed)
    counts = count_parameters(cfg.model)
    active = active_parameters(counts, cfg.model)
    result = plan(cfg, counts, active, nodes, gpu)
    result.placements = compare_placements(cfg, counts, active, nodes, gpu)
    if search:
        result.smallest_fitting_nodes = search_nodes(cfg, counts, active, gpu, max_nodes=SEARCH_MAX_NODES)
        result.searched_up_to = SEARCH_MAX_NODES
    return result
