"""How long a GRPO step takes on a layout (colocated or disaggregated), and where the time goes, before the allocation.

A roofline per phase, from the layout the memory plan already holds, the GPU table (`planner/gpus.py`)
and the step's length distribution (`plan:` in the config, `PlanConfig`):

* generation, per engine (``rollout.engine_tensor_parallel_size x engine_pipeline_parallel_size``
  GPUs, each engine its share of the step's sequences): prefill is compute-bound (2 x active
  parameters FLOPs per prompt token at `prefill_mfu`); decode is bandwidth-bound: every decode step
  reads the engine's weights (dense parts whole, each MoE layer's experts as far as the step's tokens
  touch them: ``1 - (1 - topk / experts) ** tokens``) and the running sequences' KV cache, at
  `decode_bandwidth` of HBM, plus two tensor-parallel all-reduces per layer (latency-bound: NVLink
  inside a domain, the network across) and a fixed per-step cost (scheduler, sampler, launches). With
  continuous batching the engine runs ``max(tokens / concurrency, longest response)`` decode steps:
  the KV cache bounds the concurrency (whole sequences of mean length), the longest response bounds
  the steps (the tail waits for it). Engine pipeline parallelism splits the batch into PP parts that
  each read every stage's weights: it costs weight traffic in decode.
* logprob passes and the update: model FLOPs (2 x active parameters per token forward, plus causal
  attention; backward twice the forward; full recomputation one forward more) over the whole job at
  `train_mfu` of the peak, stretched by the 1F1B pipeline bubble ``(PP - 1) / (m + PP - 1)`` for `m`
  micro-batches per data-parallel rank and mini-batch.
* refit: what each GPU receives (`plan.refit_transfer`: this trainer streams every full tensor to
  every rank; a resharding refit sends each engine GPU its shard) over the slowest link the trainer's
  layout spans (the network once the trainer's model-parallel group leaves an NVLink domain).
* swap: `memory.swap_during_rollout`'s bytes out and back over the host link (gradients are released,
  not copied).
* disaggregated (`placement: disaggregated`): generation on the `parallel.rollout_ranks` engine GPUs,
  the passes on the rest, the refit one trainer GPU's broadcast of every full tensor (over the network
  unless the job fits one node), no swap; with `async.max_staleness >= 1` the two sides overlap and
  the step is the longer side (each with the refit, which holds both).

The efficiency constants are stated assumptions, except `train_mfu`, fitted once on NeMo-RL's
published 256-H100 DeepSeek-V3 run (`conf/reference/nemo_rl_deepseek_v3_256.yaml`; the README's
calibration table compares the other published points without refitting).

What it does not model: reward computation (rule rewards are negligible; sandboxed code and reward
models are not), evaluation and checkpoint steps, stragglers and failures, the engine's own memory
for activations and CUDA graphs (its KV cache is the budget minus its weights), load imbalance between
experts, overlap of communication with compute beyond what the efficiencies absorb, and FP8 beyond
the doubled peak.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from megatron_r1.config import StageConfig
from megatron_r1.planner.activations import BYTES
from megatron_r1.planner.gpus import Gpu
from megatron_r1.planner.params import ParamCounts


@dataclass(frozen=True)
class Efficiency:
    """The time model's assumptions: shares of a peak a phase achieves."""

    train_mfu: float = 0.01165  # training and logprob passes: FITTED on NeMo-RL's 256-H100 DeepSeek-V3 step (134 s); see calibration.py
    prefill_mfu: float = 0.35  # engine prefill (compute-bound)
    decode_bandwidth: float = 0.6  # share of HBM bandwidth a decode step achieves reading weights and KV cache
    decode_step_seconds: float = 0.003  # fixed cost per decode step: scheduling, sampling, kernel launches
    allreduce_latency_nvlink_s: float = 10e-6  # one small all-reduce inside an NVLink domain
    allreduce_latency_network_s: float = 40e-6  # one small all-reduce across nodes
    network: float = 0.6  # share of the link rate a bulk transfer (refit) achieves
    host_link: float = 0.8  # share of the host-link rate pinned copies achieve
    max_num_seqs: int = 256  # vLLM's default cap on sequences an engine runs at once


EFFICIENCY = Efficiency()


@dataclass(frozen=True)
class Lengths:
    """The step's token counts the model needs (from `plan:` with the config's limits as defaults)."""

    prompt_mean: float
    response_mean: float
    response_max: float

    @classmethod
    def of(cls, cfg: StageConfig) -> Lengths:
        p, r = cfg.plan, cfg.rollout
        prompt = p.prompt_tokens_mean or cfg.data.max_prompt_tokens / 2
        response_max = p.response_tokens_max or r.max_response_tokens
        response = p.response_tokens_mean or r.max_response_tokens / 2
        return cls(float(prompt), float(min(response, response_max)), float(response_max))


def forward_flops_per_token(cfg: StageConfig, active: int, context: float) -> float:
    """Forward FLOPs of one token with `context` tokens before it on average: the matmuls of the
    active parameters plus causal attention (scores and weighted values)."""
    m = cfg.model
    if m.multi_latent_attention:
        head = m.qk_head_dim + m.qk_pos_emb_head_dim + m.v_head_dim
    else:
        head = 2 * m.kv_channels
    return 2.0 * active + 2.0 * m.num_layers * m.num_attention_heads * head * context


def expert_share_touched(cfg: StageConfig, tokens: float) -> float:
    """Expected share of a MoE layer's experts that `tokens` tokens route to (uniform routing)."""
    m = cfg.model
    if not m.num_experts:
        return 1.0
    return 1.0 - (1.0 - m.moe_router_topk / m.num_experts) ** max(tokens, 0.0)


def _bubble(pp: int, micro_batches: float) -> float:
    return (pp - 1) / (micro_batches + pp - 1) if pp > 1 else 0.0


def step_time(cfg: StageConfig, counts: ParamCounts, active: int, gpu: Gpu, world: int, layout: dict, engine: dict,
              swap_bytes_per_gpu: int, eff: Efficiency = EFFICIENCY, rollout_gpus: int = 0, max_staleness: int = 0) -> dict:
    """Seconds per phase of one GRPO step on `world` GPUs, tokens/s/GPU and the shares.

    `rollout_gpus` > 0: disaggregated, the engines on that many GPUs and the trainer on the rest;
    with `max_staleness` >= 1 the two sides overlap and a step takes the longer of the two."""
    r, g, m = cfg.rollout, cfg.grpo, cfg.model
    lengths = Lengths.of(cfg)
    sequences = g.prompts_per_step * r.n_samples_per_prompt
    tokens_per_sequence = lengths.prompt_mean + lengths.response_mean
    peak = gpu.peak_tflops(bool(m.fp8_recipe)) * 1e12

    # Generation, per engine.
    etp, epp = engine["tensor_parallel"], engine["pipeline_parallel"]
    engine_gpus = etp * epp
    engines = max(1, (rollout_gpus or world) // engine_gpus)
    per_engine = math.ceil(sequences / engines)
    prefill = 2.0 * active * per_engine * lengths.prompt_mean / (engine_gpus * peak * eff.prefill_mfu)
    resident = lengths.prompt_mean + lengths.response_mean
    by_kv = engine["kv_tokens"] / resident if engine["kv_tokens"] else 0.0
    concurrency = max(1.0, min(per_engine, by_kv, eff.max_num_seqs))
    generated = per_engine * lengths.response_mean
    decode_steps = max(generated / concurrency, lengths.response_max)
    batch = generated / decode_steps  # sequences running in an average decode step
    expert_bytes = sum(b.expert_tp_sharded + b.expert_replicated for b in counts.layers)
    per_param = engine["weight_bytes_per_param"]  # FP8 engines read half the bytes per decode step
    weight_bytes = counts.total * per_param
    dense_bytes = weight_bytes - expert_bytes * per_param
    micro = batch / epp  # each engine pipeline stage works on its part of the batch
    touched = dense_bytes + expert_bytes * per_param * expert_share_touched(cfg, micro)
    context = lengths.prompt_mean + lengths.response_mean / 2
    kv_read = batch * context * engine["kv_bytes_per_token"] * engine_gpus / etp  # whole engine, per decode step
    bandwidth = engine_gpus * gpu.hbm_tb_s * 1e12 * eff.decode_bandwidth
    weights_read = epp * touched  # every pipeline part reads every stage's weights
    # Two all-reduces of the step's hidden states per layer (after attention, after the MLP/MoE): a
    # latency, and a ring's 2 (n - 1) / n of the message over the slowest link the engine spans.
    inside = etp <= gpu.nvlink_domain
    latency = eff.allreduce_latency_nvlink_s if inside else eff.allreduce_latency_network_s
    link = (gpu.nvlink_gb_s if inside else gpu.network_gb_s) * 1e9 * eff.network
    message = micro * m.hidden_size * BYTES[engine["dtype"]]
    allreduce = (latency + 2 * (etp - 1) / etp * message / link) if etp > 1 else 0.0
    per_step = (weights_read + kv_read) / bandwidth + epp * 2 * (m.num_layers / epp) * allreduce + eff.decode_step_seconds
    decode = decode_steps * per_step
    generation = prefill + decode

    # Trainer passes over the whole job.
    dp = layout["dp"]
    pp = layout["pp"]
    seq_context = tokens_per_sequence / 2
    flops_fwd = sequences * tokens_per_sequence * forward_flops_per_token(cfg, active, seq_context)
    job_peak = max(world - rollout_gpus, 1) * peak * eff.train_mfu
    passes = cfg.plan.logprob_passes
    if passes is None:
        passes = int(g.kl_beta > 0) + int(g.updates_per_rollout > 1)
    micro_per_rank = sequences / max(dp, 1) / max(g.micro_batch_size, 1)
    logprob = passes * flops_fwd / job_peak / (1 - _bubble(pp, micro_per_rank))
    mini = max(g.updates_per_rollout, 1)
    backward_factor = 3 + (1 if cfg.memory.recompute == "full" else 0)
    train = backward_factor * flops_fwd / job_peak / (1 - _bubble(pp, micro_per_rank / mini))

    # Refit: over the slowest link the trainer's model-parallel group spans.
    model_parallel = layout["tp"] * pp * max(layout["ep"] if m.num_experts else 1, 1)
    link = gpu.nvlink_gb_s if model_parallel <= gpu.nvlink_domain else gpu.network_gb_s
    # The trainer sends bf16 (an FP8 engine re-quantizes what it receives): every full tensor, or each
    # engine GPU its shard.
    refit_bytes = counts.total * BYTES[engine["dtype"]] if cfg.plan.refit_transfer == "full_tensors" else engine["refit_bytes"]
    if rollout_gpus:  # the bridge: one trainer GPU broadcasts every full tensor to the engine GPUs (other nodes unless all fit on one)
        refit_bytes = counts.total * BYTES[engine["dtype"]]
        link = gpu.nvlink_gb_s if world <= gpu.per_node else gpu.network_gb_s
    refit = refit_bytes / (link * 1e9 * eff.network)

    swap = 2 * swap_bytes_per_gpu / (gpu.host_link_gb_s * 1e9 * eff.host_link)

    phases = {"generation": generation, "logprob": logprob, "train": train, "refit": refit, "swap": swap}
    step = sum(phases.values())
    overlap = {}
    if rollout_gpus:
        trainer_side, rollout_side = logprob + train + refit, generation + refit  # the refit holds both sides
        if max_staleness >= 1:
            step = max(trainer_side, rollout_side)
        overlap = {"placement": "disaggregated", "max_staleness": max_staleness, "trainer_gpus": world - rollout_gpus, "rollout_gpus": rollout_gpus,
                   "trainer_side_seconds": trainer_side, "rollout_side_seconds": rollout_side,
                   "trainer_idle_share": 1 - trainer_side / step, "rollout_idle_share": 1 - rollout_side / step}
    return {
        "step_seconds": step,
        **overlap,
        "tokens_per_s_per_gpu": sequences * tokens_per_sequence / step / world,  # prompt + response tokens, as NeMo-RL counts
        "seconds": phases,
        "share": {k: v / step for k, v in phases.items()},
        "generation": {
            "engines": engines, "sequences_per_engine": per_engine, "concurrency": concurrency, "decode_steps": decode_steps,
            "decode_step_ms": 1000 * per_step, "prefill_seconds": prefill, "decode_seconds": decode,
        },
        "lengths": asdict(lengths),
        "sequences": sequences,
        "logprob_passes": passes,
        "pipeline_bubble": _bubble(pp, micro_per_rank / mini),
        "refit_gib_per_gpu": refit_bytes / 2**30,
        "swap_gib_per_gpu": swap_bytes_per_gpu / 2**30,
        "assumptions": asdict(eff),
    }
