#!/usr/bin/env python
"""The DeepSeek-V3 671B recipe beside the published RL layouts, as `megatron-r1 plan` judges them.

    python tools/plan_layouts.py            # a markdown table (the one in the README)

Each published layout is expressed as overrides of conf/stages/r1_zero_deepseek_v3.yaml (its batch and
lengths) and judged for THIS trainer: with each one's own engine share and the trainer moved off the GPU
while the engines generate (`memory.swap_during_rollout=all`, as all three do), and without context
parallelism (slime's CP4, which the training step does not support). The step time is the planner's
prediction at the recipe's lengths (planner/timing.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPE = "conf/stages/r1_zero_deepseek_v3.yaml"
_EVEN = ["parallel.num_layers_in_first_pipeline_stage=null", "parallel.num_layers_in_last_pipeline_stage=null"]
LAYOUTS = {
    "megatron-r1 recipe: TP2 PP16 (3/2) EP16, full recompute, Adam on host, swap; engines TP8xPP4 at 0.85": (32, []),
    "the same without the swap, engines at 0.6": (32, ["memory.swap_during_rollout=none", "rollout.gpu_memory_utilization=0.6"]),
    "previous recipe: TP8 PP8 EP32, MTP on; engine TP8 (one node)": (32, ["memory.swap_during_rollout=none",
        "parallel.tensor_model_parallel_size=8", "parallel.pipeline_model_parallel_size=8", *_EVEN,
        "parallel.expert_model_parallel_size=32", "memory.recompute=none", "memory.optimizer_offload_fraction=0",
        "rollout.engine_tensor_parallel_size=8", "rollout.engine_pipeline_parallel_size=1",
        "rollout.gpu_memory_utilization=0.5", "model.mtp_num_layers=1", "memory.precision_aware_optimizer=false",
    ]),
    "NeMo-RL: TP1 PP16 (3/2) EP16, recompute, precision-aware Adam; engine TP32 at 0.6": (32, [
        "parallel.tensor_model_parallel_size=1", "memory.optimizer_offload_fraction=0", "rollout.gpu_memory_utilization=0.6",
        "memory.precision_aware_optimizer=true", "rollout.engine_tensor_parallel_size=32",
        "rollout.engine_pipeline_parallel_size=1",
    ]),
    "verl: TP1 PP16 (4/1) EP16, recompute, offload; engine TP32, utilization 0.8": (32, [
        "parallel.tensor_model_parallel_size=1", "parallel.num_layers_in_first_pipeline_stage=4",
        "parallel.num_layers_in_last_pipeline_stage=1", "rollout.engine_tensor_parallel_size=32",
        "rollout.engine_pipeline_parallel_size=1", "rollout.gpu_memory_utilization=0.8",
    ]),
    "slime: TP8 PP4 (last 13) CP4 EP32, CPU Adam; 64-GPU engine (TP8xPP8)": (16, [
        "parallel.tensor_model_parallel_size=8", "parallel.pipeline_model_parallel_size=4",
        "parallel.num_layers_in_first_pipeline_stage=null", "parallel.num_layers_in_last_pipeline_stage=13",
        "parallel.context_parallel_size=4", "parallel.expert_model_parallel_size=32",
        "rollout.engine_tensor_parallel_size=8", "rollout.engine_pipeline_parallel_size=8",
    ]),
}


def main() -> int:
    from megatron_r1.config import load_config
    from megatron_r1.planner import GPUS, plan_stage
    from megatron_r1.planner.memory import GiB

    print("| layout (H100 80 GB) | GPUs | training peak GiB | rollout peak GiB | KV tokens / engine | step s | tokens/s/GPU | verdict |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, (nodes, overrides) in LAYOUTS.items():
        result = plan_stage(load_config(RECIPE, overrides), nodes, GPUS["h100"])
        verdict = "fits" if result.fits else f"no: {result.breaks}" + (f" ({result.problems[0]})" if result.breaks == "layout" else "")
        peaks = (f"{result.train_peak_bytes / GiB:.1f}", f"{result.rollout_peak_bytes / GiB:.1f}") if result.stages else ("-", "-")
        time = (f"{result.step_seconds:,.0f}", f"{result.tokens_per_s_per_gpu:.1f}") if result.fits and result.step_seconds else ("-", "-")
        print(f"| {name} | {result.gpus} | {peaks[0]} | {peaks[1]} | {result.engine['kv_tokens']:,} | {time[0]} | {time[1]} | {verdict} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
