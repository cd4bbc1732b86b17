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
    ("reward_model", "reward model (general prompts)"),
    ("activations", "activations"),
    ("loss", "loss (fp32 softmax)"),
    ("runtime_reserve", "CUDA/NCCL reserve"),
)


def to_json(result: Plan) -> str:
    return json.dumps(as_dict(result), indent=2)


def _gib(n: float) -> str:
    return f"{n / GiB:8.1f}" if n >= 0.05 * GiB or n == 0 else f"{n / GiB:8.3f}"  # tiny models: not all 0.0


def count(n: float) -> str:
    """A parameter count people read: 671.03B, 7.62B, 25.4M, 620K."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            value = n / scale
            return f"{value:.2f}{unit}" if value < 100 or unit == "B" else f"{value:.1f}{unit}"
    return f"{int(n)}"


_KINDS = {"rl": "training + colocated engine", "train": "training only, no engine", "generate": "engine only, no trainer"}
_APART = "trainer and engines on separate GPUs"


def to_table(result: Plan) -> str:
    """Per-GPU memory of the worst rank, the peaks that apply to the stage, the engine, the verdict."""
    lay = result.layout
    lines = [
        f"{result.nodes} node{'s' * (result.nodes > 1)} x {result.gpus // result.nodes} {result.gpu} = {result.gpus} GPU{'s' * (result.gpus > 1)}"
        f" ({_APART if lay.get('placement') == 'disaggregated' else _KINDS[lay['stage_kind']]})",
        f"model: {count(result.total_params)} parameters ({count(result.active_params)} active per token)"
        + (f", MTP {count(result.mtp_params)} apart" if result.mtp_params else ""),
    ]
    if lay["stage_kind"] != "generate":
        lines.append(
            f"trainer: TP{lay['tp']} PP{lay['pp']} EP{lay['ep']} ETP{lay['etp']} CP{lay['cp']} DP{lay['dp']}"
            + (f", layers per stage {lay['layers_per_stage']}" if lay["layers_per_stage"] and lay["pp"] > 1 else "")
            + f", recompute {lay['recompute']}, optimizer offload {lay['optimizer_offload_fraction']:.0%}"
            + (f"; on {lay['trainer_gpus']} GPUs, the engines on the other {lay['rollout_gpus']}" if lay.get("placement") == "disaggregated" else "")
        )
    if result.per_gpu_bytes:
        worst = max(result.stages, key=lambda s: (max(s["train_peak"], s["rollout_peak"], s["refit_peak"]), s["train_peak"]))  # as memory.plan picks it
        where = f"pipeline stage {worst['stage']}, {worst['layers']} layers" if lay["stage_kind"] != "generate" else "engine only"
        lines += ["", f"{'per GPU, worst rank (' + where + ')':<48}   GiB"]
        for key, label in _ORDER:
            if key in result.per_gpu_bytes and result.per_gpu_bytes[key]:
                lines.append(f"  {label:<46}{_gib(result.per_gpu_bytes[key])}")
        if lay["stage_kind"] != "generate":
            lines.append(f"  {'training peak':<46}{_gib(result.train_peak_bytes)}")
        eng = result.engine
        if eng:
            lines += [
                f"  {'engine budget (gpu_memory_utilization)':<46}{_gib(eng['budget_bytes'])}"
                f"   weights {eng['weights_bytes'] / GiB:.1f}{' (FP8)' if eng['weight_bytes_per_param'] < 2 else ''}, KV cache {eng['kv_cache_bytes'] / GiB:.1f}",
                f"  {_rollout_label(lay):<46}{_gib(result.rollout_peak_bytes)}",
            ]
        lines.append(f"  {'GPU memory':<46}{_gib(result.capacity_bytes)}")
        if eng:
            lines.append(
                f"engine: TP{eng['tensor_parallel']} PP{eng['pipeline_parallel']} {eng['dtype']}{' (FP8 weights)' if eng['weight_bytes_per_param'] < 2 else ''}, {eng['kv_tokens']:,} KV tokens per engine "
                f"({eng['concurrent_sequences']} sequences of max_model_len at once)"
            )
        if result.host_bytes_per_node:
            what = "optimizer state" + (" and swapped trainer state" if result.swap_mode != "none" else "")
            lines.append(f"host: {result.host_bytes_per_node / GiB:.0f} GiB of {what} per node")
        if result.swap_modes:
            lines += ["", f"during generation (memory.swap_during_rollout={result.swap_mode}): trainer keeps "
                      f"{result.trainer_leftover_gib_per_gpu:.1f} GiB/GPU, engine KV cache {result.kv_cache_gib_per_gpu:.1f} GiB/GPU; refit peak "
                      f"{result.refit_peak_bytes / GiB:.1f} GiB",
                      f"  {'swap mode':<16}{'trainer keeps':>14}{'max utilization':>17}{'KV cache':>10}{'sequences/engine':>18}{'on cluster':>12}"]
            for mode, m in result.swap_modes.items():
                lines.append(f"  {mode + (' *' if mode == result.swap_mode else ''):<16}{m['trainer_leftover_gib']:>10.1f} GiB"
                             f"{m['max_gpu_memory_utilization']:>17.2f}{m['kv_cache_gib']:>6.1f} GiB{m['sequences_per_engine']:>18}{m['sequences_on_cluster']:>12}")
            lines.append("  (KV cache and sequences at the largest gpu_memory_utilization each mode leaves room for; sequences of max_model_len)")
        if result.time:
            lines += ["", *time_lines(result.time)]
        if result.placements:
            lines += ["", *placement_lines(result.placements)]
    lines.append("")
    lines.append("fits" if result.fits else f"does not fit: {result.breaks}")
    lines += [f"  - {p}" for p in result.problems]
    if result.searched_up_to:
        lines.append(f"smallest node count that fits: {result.smallest_fitting_nodes}" if result.smallest_fitting_nodes is not None
                     else f"no node count up to {result.searched_up_to} fits")
    return "\n".join(lines)


def _rollout_label(lay: dict) -> str:
    if lay["stage_kind"] != "rl":
        return "engine peak"
    return "engine GPU peak (engine + one refit bucket)" if lay.get("placement") == "disaggregated" else "rollout peak (trainer state + engine)"


def placement_lines(rows: list[dict]) -> list[str]:
    """The same job colocated and disaggregated (memory.compare_placements)."""
    lines = ["placements on these GPUs (* this config):", f"  {'placement':<44}{'step s':>10}{'tokens/s/GPU':>14}  idle trainer / rollout"]
    for r in rows:
        name = r["name"] + (" *" if r["current"] else "")
        if r["step_seconds"] is None:
            lines.append(f"  {name:<44}{'-':>10}{'-':>14}  does not fit: {r['breaks']}")
            continue
        idle = f"{100 * r['idle']['trainer']:.0f} % / {100 * r['idle']['rollout']:.0f} %" if r["idle"] else "(take turns)"
        lines.append(f"  {name:<44}{r['step_seconds']:>10.1f}{r['tokens_per_s_per_gpu']:>14.2f}  {idle}" + ("" if r["fits"] else f"  does not fit: {r['breaks']}"))
    return lines


def time_lines(t: dict) -> list[str]:
    """The time model's answer: step seconds, tokens/s/GPU, each phase and its share."""
    g, L = t["generation"], t["lengths"]
    return [
        f"predicted step: {t['step_seconds']:.1f} s, {t['tokens_per_s_per_gpu']:.2f} tokens/s/GPU (prompt + response tokens)"
        f" for {t['sequences']} sequences of {L['prompt_mean']:.0f} + {L['response_mean']:.0f} tokens (longest response {L['response_max']:.0f})",
        *(f"  {phase:<12}{seconds:>10.1f} s {100 * t['share'][phase]:>5.1f} %" for phase, seconds in t["seconds"].items()),
        f"  generation: {g['engines']} engines x {g['sequences_per_engine']} sequences, {g['concurrency']:.0f} at once, "
        f"{g['decode_steps']:,.0f} decode steps of {g['decode_step_ms']:.1f} ms; trainer: {t['logprob_passes']} logprob pass(es), "
        f"pipeline bubble {100 * t['pipeline_bubble']:.0f} %; refit {t['refit_gib_per_gpu']:.1f} GiB/GPU, swap {t['swap_gib_per_gpu']:.1f} GiB/GPU each way",
        *([f"  disaggregated: trainer side (logprob + train + refit) {t['trainer_side_seconds']:.1f} s on {t['trainer_gpus']} GPUs, rollout side "
             f"(generation + refit) {t['rollout_side_seconds']:.1f} s on {t['rollout_gpus']} GPUs; "
             + ("they overlap (max_staleness " + str(t["max_staleness"]) + "): the step is the longer" if t["max_staleness"] else "synchronous: the step is their sum less one refit")]
          if "trainer_side_seconds" in t else []),
        f"  assumptions: train MFU {t['assumptions']['train_mfu']:.4f} (fitted, see README), prefill MFU {t['assumptions']['prefill_mfu']}, "
        f"decode at {t['assumptions']['decode_bandwidth']:.0%} of HBM bandwidth; set the lengths under plan: in the config",
    ]
