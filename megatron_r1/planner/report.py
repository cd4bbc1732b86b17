"""The planner's answer as a table for people or JSON for scripts."""

from __future__ import annotations

import json

from megatron_r1.planner.memory import GiB, Plan, as_dict

_ORDER = (
    ("weights", "weights"),
    ("fp8_weight_copies", "FP8 weight copies (training only)"),
    ("gradients", "gradients (fp32)"),
    ("optimizer", "optimizer (GPU share)"),
    ("reference", "reference model"),
    ("activations", "activations"),
    ("loss", "loss (fp32 softmax)"),
    ("runtime_reserve", "CUDA/NCCL reserve"),
)


def to_json(result: Plan) -> str:
    return json.dumps(as_dict(result), indent=2)


def _gib(n: float) -> str:
    return f"{n / GiB:8.1f}"


def to_table(result: Plan) -> str:
    """Per-GPU memory of the worst rank, both peaks, the engine, the verdict."""
    lay = result.layout
    lines = [
        f"{result.nodes} nodes x {result.gpus // result.nodes} {result.gpu} = {result.gpus} GPUs",
        f"model: {result.total_params / 1e9:.2f}B parameters ({result.active_params / 1e9:.2f}B active per token)"
        + (f", MTP {result.mtp_params / 1e9:.2f}B apart" if result.mtp_params else ""),
        f"trainer: TP{lay['tp']} PP{lay['pp']} EP{lay['ep']} ETP{lay['etp']} CP{lay['cp']} DP{lay['dp']}"
        + (f", layers per stage {lay['layers_per_stage']}" if lay["layers_per_stage"] and lay["pp"] > 1 else "")
        + f", recompute {lay['recompute']}, optimizer offload {lay['optimizer_offload_fraction']:.0%}",
    ]
    if result.per_gpu_bytes:
        worst = max(result.stages, key=lambda s: max(s["train_peak"], s["rollout_peak"]))
        lines += ["", f"per GPU, worst rank (pipeline stage {worst['stage']}, {worst['layers']} layers)      GiB"]
        for key, label in _ORDER:
            if key in result.per_gpu_bytes and result.per_gpu_bytes[key]:
                lines.append(f"  {label:<46}{_gib(result.per_gpu_bytes[key])}")
        eng = result.engine
        lines += [
            f"  {'training peak':<46}{_gib(result.train_peak_bytes)}",
            f"  {'engine budget (gpu_memory_utilization)':<46}{_gib(eng['budget_bytes'])}"
            f"   weights {eng['weights_bytes'] / GiB:.1f}, KV cache {eng['kv_cache_bytes'] / GiB:.1f}",
            f"  {'rollout peak (trainer state + engine)':<46}{_gib(result.rollout_peak_bytes)}",
            f"  {'GPU memory':<46}{_gib(result.capacity_bytes)}",
            f"engine: TP{eng['tensor_parallel']} PP{eng['pipeline_parallel']} {eng['dtype']}, {eng['kv_tokens']:,} KV tokens per engine "
            f"({eng['concurrent_sequences']} sequences of max_model_len at once)",
        ]
        if result.host_bytes_per_node:
            lines.append(f"host: {result.host_bytes_per_node / GiB:.0f} GiB of optimizer state per node")
    lines.append("")
    lines.append("fits" if result.fits else f"does not fit: {result.breaks}")
    lines += [f"  - {p}" for p in result.problems]
    if result.smallest_fitting_nodes is not None:
        lines.append(f"smallest node count that fits: {result.smallest_fitting_nodes}")
    return "\n".join(lines)
