"""Per-GPU memory of a stage config on a cluster: the table, the verdict, the smallest node count.

A colocated step has two peaks, and both must fit on every GPU:

* training: the trainer's resident state (weights, fp32 gradient buffers, the optimizer's GPU share,
  the reference model when ``kl_beta > 0``) plus activations (1F1B: stage i holds
  ``min(PP - i, micro-batches)`` micro-batches in flight; the last stage adds the loss's softmax)
  while the engine sleeps (its weights and KV cache released);
* rollout: the same resident state plus the engine's ``gpu_memory_utilization`` share of the GPU,
  which holds its weight shard and the KV cache (vLLM refuses to start unless at least one
  ``max_model_len`` sequence fits).

Bytes per parameter follow what `train/optim.py` builds (read in Megatron-Core 0.16's
``optimizer/__init__.py``, ``distrib_optimizer.py`` and ``cpu_offloading/hybrid_optimizer.py``):
weights in ``params_dtype``; Megatron DDP gradient buffers in fp32 (``grad_reduce_in_fp32``); the
optimizer state, split over data-parallel ranks with the distributed optimizer (experts over
expert-data-parallel ranks), see `optimizer_bytes_per_param`. FP8 keeps the bf16 weights and adds
FP8 copies that Transformer Engine caches across micro-batches as module attributes: 2 bytes per
weight of the trained policy (the cast and its transpose, which backward uses), 1 per weight of the
reference model (forward only); the loop releases them before the engine wakes
(`train/memory.py`), so they count in the training peak only. Every GPU also loses a fixed reserve
to the CUDA context, NCCL buffers and allocator fragmentation (``Gpu.reserve_gib``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from megatron_r1.config import ConfigError, StageConfig
from megatron_r1.planner.gpus import Gpu
from megatron_r1.planner.activations import BYTES, Shape, layer_bytes, loss_bytes, recompute_kept_bytes
from megatron_r1.planner.params import ParamCounts, rank_parameters
from megatron_r1.planner.timing import step_time

GiB = 1024**3


@dataclass
class Plan:
    """The planner's answer for one layout on one cluster."""

    nodes: int
    gpus: int
    gpu: str
    layout: dict
    total_params: int
    mtp_params: int
    active_params: int
    per_gpu_bytes: dict[str, int]  # worst rank, by component (training and rollout parts)
    train_peak_bytes: int
    rollout_peak_bytes: int
    capacity_bytes: int
    host_bytes_per_node: int
    engine: dict | None  # None: the stage starts no engine (SFT, reward model, pretraining)
    stages: list[dict]
    fits: bool
    breaks: str | None  # the component that breaks it (None when it fits)
    problems: list[str] = field(default_factory=list)
    smallest_fitting_nodes: int | None = None
    searched_up_to: int = 0  # --search: the largest node count tried (0: no search)
    # RL: the trainer during generation, for the recipe's memory.swap_during_rollout (worst rank)
    swap_mode: str = "none"
    trainer_leftover_gib_per_gpu: float | None = None  # trainer state left on the GPU while the engine generates
    kv_cache_gib_per_gpu: float | None = None  # the engine's KV cache at the recipe's gpu_memory_utilization
    refit_peak_bytes: int = 0  # trainer weights + engine weights + one sync bucket, during the refit
    swap_modes: dict = field(default_factory=dict)  # per mode: leftover, the largest utilization that fits, its KV cache and sequences
    # The time model (planner/timing.py): None for stages it does not cover
    step_seconds: float | None = None
    tokens_per_s_per_gpu: float | None = None
    time: dict | None = None
    placements: list = field(default_factory=list)  # RL: the same job colocated and disaggregated (compare_placements)


RL_STAGES = ("r1_zero", "reasoning_rl", "final_rl")
TRAIN_STAGES = ("pretrain", "sft", "cold_start_sft", "distill", "reward_model")
GENERATE_STAGES = ("rejection_sampling",)


@dataclass(frozen=True)
class Workload:
    """What one step of a stage puts on each GPU, read from the config the way the stage reads it."""

    kind: str  # rl: trainer + colocated engine | train: trainer only | generate: engine only
    seq_len: int  # tokens per trained sequence
    micro_batch: int  # sequences per forward/backward
    sequences: int  # sequences per optimizer step, whole job
    reference: bool  # a frozen reference model beside the policy (GRPO with kl_beta > 0)
    reward_model: bool = False  # final RL: the scalar reward model resident on the trainer ranks (the policy's architecture)

    @property
    def trains(self) -> bool:
        return self.kind != "generate"

    @property
    def engine(self) -> bool:
        return self.kind != "train"


def workload(cfg: StageConfig) -> Workload:
    """The stage's step shape (`cfg.name` says which stage: see `StageConfig.name`). Under a token budget
    (`memory.max_tokens_per_microbatch`) a micro-batch holds at most that many positions, or one
    sequence: activations are sized for its worst case, every row at the full length."""
    shape = _workload(cfg)
    budget = cfg.memory.max_tokens_per_microbatch
    if budget and shape.trains:
        unit = 2 if cfg.name == "reward_model" else 1  # a pair stays in one micro-batch
        shape = dataclasses.replace(shape, micro_batch=max(unit, budget // shape.seq_len // unit * unit))
    return shape


def _workload(cfg: StageConfig) -> Workload:
    if cfg.name in TRAIN_STAGES:
        if cfg.name == "pretrain":
            p = cfg.pretrain
            return Workload("train", p.seq_len, p.batch_size, p.batch_size, False)  # one micro-batch per step
        if cfg.name == "reward_model":
            r = cfg.reward_model  # a pair is two sequences
            return Workload("train", r.max_seq_len, 2 * r.micro_batch_size, 2 * r.batch_size, False)
        return Workload("train", cfg.sft.max_seq_len, cfg.sft.micro_batch_size, cfg.sft.batch_size, False)
    seq = min(cfg.rollout.max_model_len, cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens)
    if cfg.name in GENERATE_STAGES:
        return Workload("generate", seq, 1, 1, False)
    sequences = cfg.grpo.prompts_per_step * cfg.rollout.n_samples_per_prompt // max(cfg.grpo.updates_per_rollout, 1)
    scorer = cfg.data.general_share > 0 and cfg.reward.general_scorer == "reward_model"
    return Workload("rl", seq, cfg.grpo.micro_batch_size, sequences, cfg.grpo.kl_beta > 0, reward_model=scorer)


# What each memory.swap_during_rollout mode moves off the device during generation (train/memory.py).
SWAPPED = {
    "none": (),
    "except_weights": ("gradients", "optimizer", "reference"),
    "all": ("gradients", "optimizer", "reference", "weights"),
}
RESIDENT = ("weights", "gradients", "optimizer", "reference", "reward_model")  # the trainer's state between steps


def leftover_bytes(parts: dict, mode: str) -> int:
    """The trainer's bytes on a GPU while the engine generates: its state minus what `mode` moves
    out (the FP8 weight copies are always released; activations are gone after the update)."""
    return sum(parts.get(k, 0) for k in RESIDENT if k not in SWAPPED[mode])


def pinned_host_bytes(parts: dict, mode: str) -> int:
    """Host memory one GPU's swap pins: what `mode` moves out, except the gradients (released, not copied)."""
    return sum(parts.get(k, 0) for k in SWAPPED[mode] if k != "gradients")


def _divides(a: int, b: int) -> bool:
    return b % a == 0


def layout_problems(cfg: StageConfig, world: int) -> list[str]:
    """Why Megatron, vLLM or this trainer would refuse the layout on `world` GPUs (empty: none).
    A disaggregated RL layout: the trainer on the first `world - parallel.rollout_ranks` GPUs, the
    engines on the rest."""
    p, m, r = cfg.parallel, cfg.model, cfg.rollout
    tp, pp, cp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size, p.expert_model_parallel_size
    etp = p.expert_tensor_parallel_size or tp
    wl = workload(cfg)
    out = []
    engine_world = world
    if rollout_gpus(cfg):
        engine_world = rollout_gpus(cfg)
        world = world - engine_world
        if world < 1:
            return [f"parallel.rollout_ranks={engine_world} leaves no GPU for the trainer on {world + engine_world} GPUs: lower it or add nodes"]
    if not _divides(tp * pp * cp, world):
        out.append(f"TP x PP x CP = {tp * pp * cp} does not divide {world} GPUs")
    if m.num_experts and not _divides(ep * etp * pp, world):
        out.append(f"EP x expert-TP x PP = {ep * etp * pp} does not divide {world} GPUs")
    if cp != 1:
        out.append("context parallelism is not supported by the training step (parallel.context_parallel_size must be 1)")
    if wl.engine and not _divides(r.engine_tensor_parallel_size * r.engine_pipeline_parallel_size, engine_world):
        out.append(f"an engine of {r.engine_tensor_parallel_size * r.engine_pipeline_parallel_size} GPUs does not divide {engine_world} "
                   f"{'rollout ' if engine_world != world else ''}GPUs")
    try:
        p.layers_per_stage(m.num_layers)
    except ConfigError as err:
        nearest = _nearest_split(p, m.num_layers)
        out.append(f"{err}" + (f" (the memory below assumes {nearest.layers_per_stage(m.num_layers)})" if nearest else ""))
    try:
        if wl.engine:
            r.engine_dtype(on_gpu=True, mla=m.multi_latent_attention)
    except ConfigError as err:
        out.append(f"engine: {err}")
    dp = world // (tp * pp * cp) if _divides(tp * pp * cp, world) else 0
    if wl.trains and dp and wl.sequences < dp:  # the trainer's rule (train/step.py data_parallel_share)
        out.append(f"a batch of {wl.sequences} sequences per update cannot feed {dp} data-parallel ranks")
    return out


def rollout_gpus(cfg: StageConfig) -> int:
    """GPUs that only generate (`placement: disaggregated` in an RL stage); 0: colocated."""
    return cfg.parallel.rollout_ranks if cfg.placement == "disaggregated" and workload(cfg).kind == "rl" else 0


def _nearest_split(parallel, num_layers: int):
    """A split Megatron accepts, for estimating a layout whose own split it refuses: full stages of
    ceil(L / PP) layers and the remainder on the last stage, else floor(L / PP) per stage and the
    remainder on the first. None when there are fewer layers than stages."""
    pp = parallel.pipeline_model_parallel_size
    if pp == 1 or num_layers < pp:
        return None
    last = num_layers - (pp - 1) * math.ceil(num_layers / pp)
    if last >= 1:
        return dataclasses.replace(parallel, num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=last)
    first = num_layers - (pp - 1) * (num_layers // pp)
    return dataclasses.replace(parallel, num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=None)


def optimizer_bytes_per_param(params_dtype: str, precision_aware: bool, offload_fraction: float) -> tuple[float, float]:
    """(GPU, host) bytes of optimizer state per parameter of the rank's shard, as Megatron builds it.

    * No offload: an fp32 master copy for 16-bit weights (4 B; none for fp32 weights) and Adam's two
      moments, fp32 (8 B) or, with the precision-aware optimizer, bf16 in TE's FusedAdam (4 B). TE >= 2.1
      may keep only the master's low 16 bits (``store_param_remainders``): 2 B fewer than counted here.
    * Offload (fraction f, precision-aware required by validation): the hybrid optimizer keeps an fp32
      copy of each parameter (4 B) and runs a plain fp32 Adam on it (8 B): on the host for the offloaded
      share, with a pinned fp32 gradient copy (4 B), and on the GPU for the rest (the precision-aware
      bf16 moments do not apply on this path). 16-bit GPU weights need the fp32 copy on the GPU side too.
    """
    master = 4 if params_dtype != "float32" else 0
    if offload_fraction <= 0:
        return master + (4 if precision_aware else 8), 0.0
    gpu_side = (master + 8) * (1 - offload_fraction)
    host_side = (4 + 8 + 4) * offload_fraction
    return gpu_side, host_side


def _stage_memory(cfg: StageConfig, counts: ParamCounts, world: int, stage: int, flash: bool) -> dict[str, int]:
    """Bytes by component on one rank of pipeline stage `stage`."""
    p, m, mem = cfg.parallel, cfg.model, cfg.memory
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    dp = world // (tp * pp * cp)
    expert_dp = world // (ep * etp * pp)
    params = rank_parameters(counts, p, stage, mtp=m.mtp_num_layers > 0)
    w = BYTES[m.params_dtype]
    wl = workload(cfg)
    if not wl.trains:  # the engine alone: no Megatron model is built
        return {"weights": 0, "gradients": 0, "optimizer": 0, "optimizer_on_host": 0, "reference": 0, "reward_model": 0, "activations": 0, "loss": 0}

    reference = wl.reference
    out = {"weights": params.total * w}
    if m.fp8_recipe:  # TE's cached FP8 weights: the trained policy's with their transposes (backward
        # needs the columnwise copy on Hopper), the reference model's forward-only ones without
        out["fp8_weight_copies"] = params.total * (2 + (1 if reference else 0))
    out["gradients"] = params.total * 4
    on_gpu, on_host = optimizer_bytes_per_param(m.params_dtype, mem.precision_aware_optimizer, mem.optimizer_offload_fraction)
    shard_dense, shard_expert = (dp, expert_dp) if p.use_distributed_optimizer else (1, 1)
    shard = params.dense / shard_dense + params.expert / shard_expert
    out["optimizer"] = int(on_gpu * shard)
    out["optimizer_on_host"] = int(on_host * shard)
    out["reference"] = params.total * w if reference else 0
    # RewardModelScorer builds the reward model in the trainer's layout and keeps it for the run.
    out["reward_model"] = params.total * w if wl.reward_model else 0

    shape = Shape(wl.seq_len // cp, wl.micro_batch, tp, p.sequence_parallel and tp > 1, flash)
    micro_batches = max(1, math.ceil(wl.sequences / max(dp, 1) / wl.micro_batch))
    in_flight = min(pp - stage, micro_batches)
    first_layer = sum(p.layers_per_stage(m.num_layers)[:stage])
    kinds = counts.moe_layers[first_layer : first_layer + params.layers]
    per_layer = [layer_bytes(m, shape, moe) for moe in kinds]
    if mem.recompute == "full":
        chunks = math.ceil(len(kinds) / mem.recompute_num_layers)
        kept = in_flight * recompute_kept_bytes(m, shape, chunks)
        rebuilt = max((sum(per_layer[i : i + mem.recompute_num_layers]) for i in range(0, len(kinds), mem.recompute_num_layers)), default=0)
        out["activations"] = kept + rebuilt
    else:
        out["activations"] = in_flight * sum(per_layer)
    out["loss"] = loss_bytes(m, shape) if stage == pp - 1 else 0
    return out


# An FP8 engine (`rollout.quantization: fp8`): one byte per weight plus a float32 scale per 128 x 128
# block (vLLM's blockwise online quantization, DeepSeek-V3's own format). The KV cache stays in the
# engine dtype.
FP8_BLOCK_BYTES_PER_PARAM = 1 + 4 / (128 * 128)


def _engine_dtype(cfg: StageConfig) -> str:
    """The engine's dtype on a GPU; an explicit float32 that no CUDA backend runs (MLA) is planned
    as bfloat16 and reported by `layout_problems`."""
    try:
        return cfg.rollout.engine_dtype(on_gpu=True, mla=cfg.model.multi_latent_attention)
    except ConfigError:
        return "bfloat16"


def _engine(cfg: StageConfig, counts: ParamCounts, gpu: Gpu) -> dict:
    """The colocated engine on one GPU: weight shard, KV cache, concurrent sequences."""
    r, m = cfg.rollout, cfg.model
    dtype = _engine_dtype(cfg)
    shards = r.engine_tensor_parallel_size * r.engine_pipeline_parallel_size
    per_param = FP8_BLOCK_BYTES_PER_PARAM if r.quantization == "fp8" else BYTES[dtype]
    weights = int(counts.total * per_param) // shards  # MTP is not served (no speculative decoding)
    if m.multi_latent_attention:  # one latent per token and layer, replicated over the engine's TP ranks
        per_token = m.num_layers * (m.kv_lora_rank + m.qk_pos_emb_head_dim) * BYTES[dtype] // r.engine_pipeline_parallel_size
    else:
        heads = max(1, m.num_query_groups // r.engine_tensor_parallel_size)
        per_token = 2 * m.num_layers * heads * m.kv_channels * BYTES[dtype] // r.engine_pipeline_parallel_size
    budget = int(r.gpu_memory_utilization * gpu.memory_gib * GiB)
    kv = max(0, budget - weights)
    return {
        "dtype": dtype,
        "tensor_parallel": r.engine_tensor_parallel_size,
        "pipeline_parallel": r.engine_pipeline_parallel_size,
        "budget_bytes": budget,
        "weight_bytes_per_param": per_param,
        "weights_bytes": weights,
        # What a refit delivers to each engine GPU: the trainer's bf16 weights (an FP8 engine
        # quantizes them itself, rollout/vllm_engine.py), its shard of them.
        "refit_bytes": counts.total * BYTES[dtype] // shards,
        "kv_cache_bytes": kv,
        "kv_bytes_per_token": per_token,
        "kv_tokens": kv // per_token,
        "concurrent_sequences": kv // per_token // r.max_model_len,
    }


def plan(cfg: StageConfig, counts: ParamCounts, active: int, nodes: int, gpu: Gpu, flash_attention: bool = True) -> Plan:
    """The memory table and verdict for `cfg` on `nodes` nodes of `gpu`."""
    world = nodes * gpu.per_node
    problems = layout_problems(cfg, world)
    apart = rollout_gpus(cfg)  # disaggregated: the trainer's GPUs hold no engine, the engines' no trainer
    train_world = max(world - apart, 0)
    try:
        cfg.parallel.layers_per_stage(cfg.model.num_layers)
    except ConfigError:
        nearest = _nearest_split(cfg.parallel, cfg.model.num_layers)
        if nearest is not None:
            cfg = dataclasses.replace(cfg, parallel=nearest)
    p = cfg.parallel
    wl = workload(cfg)
    capacity = int(gpu.memory_gib * GiB)
    reserve = int(gpu.reserve_gib * GiB)
    layout = {
        "stage_kind": wl.kind,
        "tp": p.tensor_model_parallel_size,
        "pp": p.pipeline_model_parallel_size,
        "layers_per_stage": _split_or_none(p, cfg.model.num_layers),
        "ep": p.expert_model_parallel_size,
        "etp": p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
        "cp": p.context_parallel_size,
        "dp": train_world // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size),
        "sequence_parallel": p.sequence_parallel,
        "distributed_optimizer": p.use_distributed_optimizer,
        "recompute": cfg.memory.recompute,
        "optimizer_offload_fraction": cfg.memory.optimizer_offload_fraction,
        "precision_aware_optimizer": cfg.memory.precision_aware_optimizer,
        "reference_model": wl.reference,
        "fp8": cfg.model.fp8_recipe,
        "placement": "disaggregated" if apart else "colocated",
        "trainer_gpus": train_world,
        "rollout_gpus": apart or world if wl.engine else 0,
    }
    engine = _engine(cfg, counts, gpu) if wl.engine else None  # SFT-like stages start no engine
    swap = cfg.memory.swap_during_rollout if wl.kind == "rl" and not apart else "none"  # disaggregated: nothing to make room for
    bucket = cfg.rollout.sync_bucket_mb * 2**20
    stages = []
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    ranks_split = train_world > 0 and _divides(tp * pp * cp, train_world) and (
        not cfg.model.num_experts or _divides(p.expert_model_parallel_size * layout["etp"] * pp, train_world)
    )
    if layout["layers_per_stage"] is not None and ranks_split:  # else no rank of this layout exists
        for stage in range(p.pipeline_model_parallel_size):
            parts = _stage_memory(cfg, counts, train_world, stage, flash_attention)
            resident = sum(v for k, v in parts.items() if k not in ("activations", "loss", "optimizer_on_host"))
            train = resident + parts["activations"] + parts["loss"] + reserve if wl.trains else 0
            if apart:  # an engine GPU holds the engine and one bucket of the stream; a trainer GPU its state and one bucket
                rollout = engine["budget_bytes"] + bucket + reserve
                refit = resident + bucket + reserve
            else:
                rollout = leftover_bytes(parts, swap) + engine["budget_bytes"] + reserve if engine else 0
                # The refit streams the policy's weights (resident then, whatever the mode) into the woken engine weights.
                refit = (leftover_bytes(parts, swap) + (parts["weights"] if swap == "all" else 0) + engine["weights_bytes"]
                         + bucket + reserve) if engine and wl.trains else 0
            stages.append({"stage": stage, "layers": layout["layers_per_stage"][stage], **parts, "train_peak": train, "rollout_peak": rollout,
                           "refit_peak": refit, "leftover": {m: leftover_bytes(parts, m) for m in SWAPPED},
                           "pinned_host": pinned_host_bytes(parts, swap)})
    if not stages:
        return Plan(nodes, world, gpu.name, layout, counts.total, counts.mtp.total, active, {}, 0, 0, capacity, 0, engine, [],
                    False, "layout", problems)

    worst = max(stages, key=lambda s: (max(s["train_peak"], s["rollout_peak"], s["refit_peak"]), s["train_peak"]))
    leftover = {m: max(s["leftover"][m] for s in stages) for m in SWAPPED}  # the stage that keeps the most
    pinned = max(s["pinned_host"] for s in stages)
    per_gpu = {k: v for k, v in worst.items() if k not in ("stage", "layers", "train_peak", "rollout_peak", "refit_peak", "optimizer_on_host",
                                                         "leftover", "pinned_host")}
    per_gpu.update(runtime_reserve=reserve)
    if engine:
        per_gpu.update(engine_weights=engine["weights_bytes"], engine_kv_cache=engine["kv_cache_bytes"])
    host = max(s["optimizer_on_host"] + s["pinned_host"] for s in stages) * gpu.per_node
    breaks = None
    if engine is None:
        pass
    elif engine["weights_bytes"] >= engine["budget_bytes"]:
        problems.append(
            f"engine: its weight shard ({engine['weights_bytes'] / GiB:.1f} GiB at engine TP x PP = "
            f"{engine['tensor_parallel'] * engine['pipeline_parallel']}) exceeds its {engine['budget_bytes'] / GiB:.1f} GiB budget"
        )
        breaks = "engine_weights"
    elif engine["concurrent_sequences"] < 1:
        problems.append(f"engine: {engine['kv_tokens']} KV tokens do not hold one {cfg.rollout.max_model_len}-token sequence")
        breaks = "engine_kv_cache"
    resident = tuple(k for k in RESIDENT if k not in SWAPPED[swap])
    phases = {}
    if wl.trains:
        phases["train"] = (worst["train_peak"], RESIDENT + ("fp8_weight_copies", "activations", "loss"))
    if engine:  # FP8 copies released before the engine wakes; the swap's share moved out (disaggregated: the engine GPUs hold nothing else)
        phases["rollout"] = (worst["rollout_peak"], (() if apart else resident) + ("engine_budget",))
    if engine and wl.trains:  # disaggregated: the trainer GPUs send, the engine's weights are elsewhere
        phases["refit"] = (worst["refit_peak"], tuple(dict.fromkeys(resident + ("weights",))) + (() if apart else ("engine_weights",)))
    for phase, (peak, names) in phases.items():
        if peak > capacity:
            parts = {k: worst.get(k, 0) for k in names}
            parts["engine_budget"] = engine["budget_bytes"] if phase == "rollout" and engine else 0
            parts["engine_weights"] = engine["weights_bytes"] if phase == "refit" and not apart else 0
            largest = max(parts, key=parts.get)
            problems.append(
                f"{phase}: {peak / GiB:.1f} GiB on pipeline stage {worst['stage']} exceeds {capacity / GiB:.1f} GiB; "
                f"largest part: {largest} {parts[largest] / GiB:.1f} GiB"
            )
            breaks = breaks or largest
    if host > gpu.host_memory_gib * GiB:
        what = "offloaded optimizer state" + (f" and state swapped out during generation ({swap})" if swap != "none" else "")
        fix = "lower memory.optimizer_offload_fraction" + (" or use memory.swap_during_rollout=except_weights / none" if swap != "none" else "")
        problems.append(f"host: {host / GiB:.0f} GiB of {what} per node exceeds {gpu.host_memory_gib:.0f} GiB (--host-gib); {fix}, or add nodes")
        breaks = breaks or "host_memory"
    if problems and breaks is None:
        breaks = "layout"
    result = Plan(
        nodes, world, gpu.name, layout, counts.total, counts.mtp.total, active, per_gpu,
        worst["train_peak"], worst["rollout_peak"], capacity, host, engine, stages, not problems, breaks, problems,
    )
    if engine and wl.kind == "rl":
        result.swap_mode = swap
        result.refit_peak_bytes = max(s["refit_peak"] for s in stages)
        result.trainer_leftover_gib_per_gpu = round(leftover[swap] / GiB, 2) if not apart else None
        result.kv_cache_gib_per_gpu = round(engine["kv_cache_bytes"] / GiB, 2)
        if not apart:
            result.swap_modes = {m: _with_swap(cfg, engine, leftover[m], gpu, world) for m in SWAPPED}
        result.time = step_time(cfg, counts, active, gpu, world, layout, engine, pinned, rollout_gpus=apart,
                                max_staleness=cfg.async_.max_staleness)
        result.step_seconds = round(result.time["step_seconds"], 1)
        result.tokens_per_s_per_gpu = round(result.time["tokens_per_s_per_gpu"], 2)
    return result


def compare_placements(cfg: StageConfig, counts: ParamCounts, active: int, nodes: int, gpu: Gpu, flash_attention: bool = True) -> list[dict]:
    """The same RL job on the same GPUs colocated, and disaggregated synchronous and one step stale:
    each one's predicted step, tokens/s/GPU and verdict. The rollout GPUs are the config's
    `parallel.rollout_ranks` when it is disaggregated, else one node (half of a single node)."""
    from megatron_r1.config import AsyncConfig

    if workload(cfg).kind != "rl":
        return []
    apart = cfg.parallel.rollout_ranks if cfg.placement == "disaggregated" else gpu.per_node if nodes > 1 else max(gpu.per_node // 2, 1)
    variants = [("colocated", "colocated", 0, 0), (f"disaggregated, {apart} rollout GPUs, k=0", "disaggregated", apart, 0),
                (f"disaggregated, {apart} rollout GPUs, k=1", "disaggregated", apart, 1)]
    out = []
    for name, placement, rollout_ranks, k in variants:
        variant = dataclasses.replace(cfg, placement=placement, async_=AsyncConfig(max_staleness=k),
                                      parallel=dataclasses.replace(cfg.parallel, rollout_ranks=max(rollout_ranks, 1)))
        result = plan(variant, counts, active, nodes, gpu, flash_attention)
        current = placement == cfg.placement and (k == cfg.async_.max_staleness or placement == "colocated")
        out.append({"name": name, "current": current, "fits": result.fits, "breaks": result.breaks, "step_seconds": result.step_seconds,
                    "tokens_per_s_per_gpu": result.tokens_per_s_per_gpu,
                    "idle": {side: result.time[f"{side}_idle_share"] for side in ("trainer", "rollout")} if result.time and "trainer_idle_share" in result.time else None})
    return out


def _with_swap(cfg: StageConfig, engine: dict, leftover: int, gpu: Gpu, world: int) -> dict:
    """What the engine could have beside `leftover` trainer bytes: the largest gpu_memory_utilization
    that fits (capacity minus leftover and reserve, in steps of 0.01), its KV cache and sequences."""
    capacity = gpu.memory_gib * GiB
    utilization = math.floor((capacity - leftover - gpu.reserve_gib * GiB) / capacity * 100) / 100
    kv = max(0, int(utilization * capacity) - engine["weights_bytes"])
    per_engine = kv // engine["kv_bytes_per_token"] // cfg.rollout.max_model_len
    engines = world // (engine["tensor_parallel"] * engine["pipeline_parallel"])
    return {
        "trainer_leftover_gib": round(leftover / GiB, 2),
        "max_gpu_memory_utilization": utilization,
        "kv_cache_gib": round(kv / GiB, 2),
        "sequences_per_engine": int(per_engine),
        "sequences_on_cluster": int(per_engine * engines),
    }


def _split_or_none(parallel, num_layers: int) -> list[int] | None:
    try:
        return parallel.layers_per_stage(num_layers)
    except ConfigError:
        return None


def search_nodes(cfg: StageConfig, counts: ParamCounts, active: int, gpu: Gpu, max_nodes: int = 1024,
                 flash_attention: bool = True) -> int | None:
    """The smallest node count on which the layout fits (more nodes: more data parallelism, a
    thinner optimizer shard), or None up to `max_nodes`."""
    for nodes in range(1, max_nodes + 1):
        if plan(cfg, counts, active, nodes, gpu, flash_attention).fits:
            return nodes
    return None


def as_dict(result: Plan) -> dict:
    return dataclasses.asdict(result)
