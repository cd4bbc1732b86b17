"""The GRPO loop (DeepSeek-R1-Zero): rollout -> reward -> advantages -> logprobs -> update -> sync.

Read `run` top to bottom: it is the algorithm. Megatron-Core holds the policy (any TP/PP/EP/DP);
every rank also hosts one vLLM worker (SPMD colocation, `rollout.vllm_engine`). Each engine samples
and scores its share of a step's prompts; the scored groups are put back in order on every rank;
each trainer data-parallel rank trains on its part of the batch; then every rank loads the new
policy into its own worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_r1 import distributed, platform
from megatron_r1.algorithms import group_advantages
from megatron_r1.config import ConfigError, StageConfig, to_dict
from megatron_r1.data.prompts import MixedSampler, load_general_prompts, load_prompts
from megatron_r1.data.templates import TEMPLATES
from megatron_r1.data.tokenizer import load_tokenizer
from megatron_r1.models.build import build_model, moe_layers, num_parameters
from megatron_r1.models.hf.base import load_hf, read_hf_config
from megatron_r1.rewards.general import SCORERS as GENERAL_SCORERS
from megatron_r1.rewards.general import GeneralReward
from megatron_r1.rewards.reward_fn import RewardFn
from megatron_r1.rollout.collect import RolloutBatch, Sample, collect_rollouts
from megatron_r1.rollout.evaluation import evaluate
from megatron_r1.rollout.layout import EngineLayout
from megatron_r1.rollout.vllm_engine import VLLMEngine, check_engine_options
from megatron_r1.rollout.weight_sync import ParityProbe, WeightSync, probe_thresholds, refit
from megatron_r1.stages.base_model import prepare_base_model
from megatron_r1.train import checkpoint as ckpt
from megatron_r1.train import moe_routing
from megatron_r1.train.grpo_update import make_batch, update_phase
from megatron_r1.train.loop import StepResult, Trainee, TrainingLoop, build_from_hf
from megatron_r1.train.memory import TrainerSwap, release_fp8_weight_caches
from megatron_r1.train.metrics import plot_run, read_metrics
from megatron_r1.train.step import compute_logprobs, data_parallel_share

log = logging.getLogger(__name__)


def run(cfg: StageConfig) -> dict:
    """Run R1-Zero GRPO as configured (every rank of the job calls it); returns the summary
    (also written to summary.json) on rank 0."""
    distributed.init_distributed(cfg.parallel, cfg.seed)
    main = distributed.is_main()
    check_engine_options(cfg.rollout, cfg.grpo.routing_replay)  # GPU-only engine options: one line, before anything loads
    hf_dir, base_seconds = prepare_base_model(cfg)
    tokenizer = load_tokenizer(hf_dir)
    _check_routing_replay(cfg, hf_dir)
    policy = build_from_hf(cfg, hf_dir, cfg.steps)
    routing_layers = _routing_layers(cfg, policy)
    reference = _build_reference(cfg, policy)
    train_set = load_prompts(cfg.data, "train", tokenizer)
    eval_set = load_prompts(cfg.data, "eval", tokenizer)
    general_set = load_general_prompts(cfg.data, tokenizer) if cfg.data.general_share > 0 else None
    sampler = MixedSampler(train_set, general_set, cfg.grpo.prompts_per_step, cfg.data.general_share, seed=cfg.seed)
    reward_fn = RewardFn(cfg.reward)

    with TrainingLoop(cfg, policy, cfg.steps, "GRPO") as loop:  # pretraining the base is its own stage: the RL clock starts here
        saved = loop.resume()
        if saved is not None:
            sampler.load_state_dict(saved["sampler"])
        base_accuracy = saved.get("base_accuracy") if saved else None
        from_megatron = saved is None and _load_megatron_weights(cfg, policy, reference)
        _check_batch_fits(cfg, EngineLayout.from_config(cfg.rollout, dist.get_world_size(), dist.get_rank()), len(eval_set.items))
        swap = TrainerSwap(cfg.memory.swap_during_rollout, policy.ddp, policy.optimizer, reference)
        swap.offload_state()  # the engine claims its share of the device when it starts
        swap.offload_weights()
        engine = VLLMEngine(cfg.rollout, str(hf_dir), return_routing=cfg.grpo.routing_replay == "r3")  # one worker on every rank
        syncer = WeightSync(engine, cfg.rollout.sync_bucket_mb)
        general = GeneralReward(cfg, engine, tokenizer) if general_set is not None else None
        if general is not None and main:
            log.info("general prompts: %d, %d per step, rewarded by the %s (weight %g)", len(general_set),
                     sampler.general.batch_size, general.kind.replace("_", " "), general.weight)
        if main:
            log.info("policy: %s parameters on %s; %s", f"{num_parameters(policy.model):,}", platform.describe(), engine.layout.describe())
        probe = _make_probe(cfg, engine, tokenizer, eval_set, policy.model)

        def sync(step: int, probe_every: int = cfg.rollout.probe_every) -> dict:
            return refit(engine, policy.model, policy.model_cfg, syncer, probe, step, probe_every, reference, swap, loop.timer)

        @contextlib.contextmanager
        def trainer_resident():
            """A checkpoint between rollouts: the engine sleeps while the trainer's state is back,
            then is refit (sleep level 2 drops its weights)."""
            if not swap.swapped:
                yield
                return
            engine.sleep()
            with loop.timer("swap"):
                swap.restore()
            yield
            sync(0, probe_every=0)

        if saved is not None or from_megatron:  # the engines loaded the HF weights; bring them to the policy
            engine.sleep()
            sync(0)
        last = {"eval": None}

        def evaluate_now(step: int):
            last["eval"] = evaluate(engine, tokenizer, eval_set.items, reward_fn, cfg.rollout.max_response_tokens,
                                    cfg.logging.eval_samples, cfg.rollout.temperature, seed=cfg.seed + step, stop=cfg.rollout.stop)
            return last["eval"].metrics(cfg.logging.eval_samples)

        if base_accuracy is None:
            loop.metrics.log(0, evaluate_now(0))
            base, last["eval"] = last["eval"], None
            base_accuracy = base.accuracy
            if main:
                log.info("base model: held-out accuracy %.1f %%, format %.1f %%, %.1f tokens; e.g. %r",
                         100 * base.accuracy, 100 * base.format_rate, base.length_mean, base.samples[0]["response"][:120])

        def step(i: int) -> StepResult:
            # 1-2. rollout and reward: each engine its share of the prompts; whole groups on every rank
            rollout = collect_rollouts(cfg, engine, tokenizer, sampler, reward_fn, i, general)
            for phase, seconds in rollout.seconds.items():
                loop.timer.seconds[phase] += seconds
            if not rollout.samples:  # dynamic sampling found no group with signal: nothing to learn
                return StepResult(dict(rollout.stats))
            samples, rewards = rollout.samples, rollout.rewards
            # 3. advantages, over whole groups; then this data-parallel rank's part of the batch
            advantages = group_advantages(rewards, cfg.rollout.n_samples_per_prompt, scale_by_std=cfg.grpo.scale_advantages_by_std)
            share = data_parallel_share(len(samples), "raise grpo.prompts_per_step or rollout.n_samples_per_prompt")
            batch = make_batch(samples[share], advantages[share], tokenizer.pad_token_id, routing_layers)
            if main and cfg.logging.save_rollouts:
                _save_rollouts(loop.run_dir, i + 1, samples, rewards, advantages)
            # 4-5. logprobs and policy update, with the engine's device memory handed to the trainer
            engine.sleep()
            with loop.timer("swap"):
                swap.restore()
            train = update_phase(cfg, policy.ddp, policy.optimizer, policy.scheduler, reference, batch, loop.timer)
            # 6. every rank refits its own worker (the trainer's state leaves the device), then the parity probe
            synced = sync(i + 1)
            row = _step_row(rollout, share, train, synced)
            return StepResult(row, nonfinite=train.get("nonfinite", 0.0), reward_failures=rollout.stats["reward/failures"], sequences=len(samples),
                              postfix={"reward": f"{row['reward/mean']:.2f}", "acc": f"{row.get('reward/accuracy', 0):.2f}",
                                       "len": f"{row['response/length_mean']:.0f}"})

        # 7. metrics, evaluation, checkpoint: the shared loop
        loop.run(step, evaluate=evaluate_now, eval_every=cfg.logging.eval_every,
                 state=lambda: {"sampler": sampler.state_dict(), "base_accuracy": base_accuracy}, resident=trainer_resident)
        final = last["eval"]
        if final is None:  # resumed at the end: evaluate what we have
            evaluate_now(cfg.steps)
            final = last["eval"]
        engine.shutdown()
        swap.restore()  # the export reads the weights
        loop.export_hf()
        summary = _summary(cfg, loop, base_accuracy, final, base_seconds, engine.layout, len(eval_set.items)) if main else {}
    if main:
        _print_table(summary, loop.run_dir)
    return summary


def _check_routing_replay(cfg: StageConfig, hf_dir: Path) -> None:
    """Routing replay needs an MoE model (one line, before the model is built)."""
    replay = cfg.grpo.routing_replay
    if replay != "none" and not read_hf_config(hf_dir).num_experts:
        raise ConfigError(f"grpo.routing_replay={replay} replays MoE routing, and {hf_dir} is a dense model; set grpo.routing_replay=none")
    if replay == "r2" and cfg.grpo.updates_per_rollout == 1 and distributed.is_main():
        log.info("grpo.routing_replay=r2 with one update per rollout: the update's own forward is the old-logprob pass, nothing to replay")


def _routing_layers(cfg: StageConfig, policy: Trainee) -> list[int] | None:
    """Which of the model's MoE layers this pipeline stage replays (None: no routing replay)."""
    if cfg.grpo.routing_replay == "none":
        return None
    moe = [i for i, is_moe in enumerate(moe_layers(policy.model_cfg)) if is_moe]
    return moe_routing.stage_moe_indices(moe, [n for n, _ in moe_routing.moe_routers(policy.model)])


def _build_reference(cfg: StageConfig, policy: Trainee) -> torch.nn.Module | None:
    """The frozen reference model for the KL term (None when grpo.kl_beta = 0: no memory, no forward)."""
    if cfg.grpo.kl_beta <= 0:
        return None
    reference = build_model(policy.model_cfg, cfg.parallel, cfg.memory)
    load_hf(reference, policy.model_cfg, policy.hf_dir)
    return reference.eval().requires_grad_(False)


def _load_megatron_weights(cfg: StageConfig, policy: Trainee, reference: torch.nn.Module | None) -> bool:
    """Start the policy (and the reference) from `checkpoint.load_megatron`'s latest checkpoint."""
    root = cfg.checkpoint.load_megatron
    if not root:
        return False
    step = ckpt.resume_step(root, cfg.checkpoint.verify)
    if step is None:
        raise ConfigError(f"checkpoint.load_megatron={root} holds no complete checkpoint (no 'latest' file)")
    ckpt.load_checkpoint(root, step, policy.ddp, None, None, load_rng=False)  # weights only: any layout
    policy.optimizer.reload_model_params()  # fp32 master copies (bf16 training) follow the loaded weights
    if reference is not None:
        ckpt.load_checkpoint(root, step, reference, None, None, load_rng=False)
    if distributed.is_main():
        log.info("policy weights from %s step %d", root, step)
    return True


def _check_batch_fits(cfg: StageConfig, layout: EngineLayout, eval_prompts: int) -> None:
    """Every engine needs at least one prompt per step and per evaluation, every trainer
    data-parallel rank at least one sequence."""
    from megatron.core import parallel_state

    engines, dp = layout.num_engines, parallel_state.get_data_parallel_world_size()
    sequences = cfg.grpo.prompts_per_step * cfg.rollout.n_samples_per_prompt
    if sequences < dp * cfg.grpo.updates_per_rollout:
        # Every data-parallel rank must take the same number of optimizer steps.
        raise ConfigError(
            f"{sequences} sequences per step cannot give each of {dp} data-parallel ranks "
            f"grpo.updates_per_rollout={cfg.grpo.updates_per_rollout} mini-batches; raise grpo.prompts_per_step"
        )
    if cfg.grpo.prompts_per_step < engines:
        raise ConfigError(f"grpo.prompts_per_step={cfg.grpo.prompts_per_step} leaves some of the {engines} rollout engines without a prompt; raise it to at least {engines}")
    if eval_prompts < engines:
        raise ConfigError(f"{eval_prompts} held-out prompts leave some of the {engines} rollout engines without one; raise data.eval_size")


def _make_probe(cfg, engine, tokenizer, eval_set, model):
    """The logprob parity probe: a fixed batch scored by every engine and by the trainer after each sync."""
    if not cfg.rollout.probe_every:
        return None
    prompts = [p.prompt_ids for p in eval_set.items[: cfg.rollout.probe_prompts]]

    def trainer_logprobs(sequences):
        width = max(len(s) for s in sequences)
        tokens = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
        for i, s in enumerate(sequences):
            tokens[i, : len(s)] = torch.tensor(s)
        lp = compute_logprobs(model, tokens, cfg.grpo.micro_batch_size)
        release_fp8_weight_caches(model)  # the engine is awake: this forward's FP8 caches must not stay
        return [lp[i, : len(s) - 1] for i, s in enumerate(sequences)]

    mean_threshold, max_threshold = probe_thresholds(cfg.rollout, engine.dtype)
    probe = ParityProbe(engine, trainer_logprobs, prompts, mean_threshold, max_threshold)
    probe.sequences()  # generated now, while the engine is awake: later checks find its KV cache asleep
    return probe


def _step_row(rollout: RolloutBatch, share: slice, train: dict, sync: dict) -> dict:
    """The metrics row of one step (the same on every rank)."""
    rewards, lengths, components, samples = rollout.rewards, rollout.lengths, rollout.components, rollout.samples
    by_source = {}
    if "general" in components:  # final RL: every reward also per prompt source
        is_general = components["general"] > 0
        for source, mask in (("reasoning", ~is_general), ("general", is_general)):
            if mask.any():
                by_source[f"reward/{source}/mean"] = float(rewards[mask].mean())
                by_source.update({f"reward/{source}/{k}": float(v[mask].mean()) for k, v in components.items()
                                  if k != "general" and (source == "general" or k not in GENERAL_SCORERS)})
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        **{f"reward/{k}": float(v.mean()) for k, v in components.items()},
        **by_source,
        **rollout.stats,
        "rollout/sequences": float(len(samples)),
        "rollout/sequences_per_rank": float(share.stop - share.start),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/clipped_ratio": sum(s.finish_reason == "length" for s in samples) / len(samples),
        # Rollout tokens of all engines per second of (parallel) rollout time.
        "perf/tokens_per_s": float(lengths.sum()) / max(rollout.seconds["rollout"], 1e-9),
        **{f"train/{k}": v for k, v in train.items()},
        **sync,
    }


def _save_rollouts(run_dir: Path, step: int, samples: list[Sample], rewards, advantages) -> None:
    """`rollouts/step_NNNNNN.jsonl`: every sampled sequence of a step, with where it came from."""
    out = run_dir / "rollouts"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"step_{step:06d}.jsonl", "w") as f:
        for s, r, a in zip(samples, rewards.tolist(), advantages.tolist()):
            row = {"prompt": s.prompt, "engine": s.engine, "prompt_ids": s.prompt_ids, "response_ids": s.response_ids,
                   "finish_reason": s.finish_reason, "reward": r, "advantage": a}
            f.write(json.dumps(row) + "\n")


def _summary(cfg: StageConfig, loop: TrainingLoop, base_accuracy: float, final, base_seconds: float, layout: EngineLayout, eval_size: int) -> dict:
    """summary.json and plot.png (main rank)."""
    from megatron.core import parallel_state

    rows = [r for r in read_metrics(loop.run_dir / "metrics.jsonl") if "time/step" in r]
    phases = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("time/") and k not in ("time/step", "time/wall"):
                phases[k[5:]] = phases.get(k[5:], 0.0) + v
    task = {"name": cfg.data.task, "options": cfg.data.task_options} if cfg.data.source == "reasoning_gym" else {"name": "jsonl", "path": cfg.data.train_path}
    summary = {
        "stage": cfg.name,
        "base_accuracy": base_accuracy,
        "final_accuracy": final.accuracy,
        "final_maj_accuracy": final.maj_accuracy,
        "final_format_rate": final.format_rate,
        "final_language_consistency": final.language_consistency,
        "final_response_length": final.length_mean,
        "steps": cfg.steps,
        "wall_seconds": round(loop.wall(), 1),  # RL only: checkpoints keep it across restarts
        "base_pretrain_seconds": round(base_seconds, 1),  # 0 unless this run pretrained the base
        "seconds_by_phase": {k: round(v, 1) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
        "task": task,
        "layout": {**layout.as_dict(), "data_parallel_size": parallel_state.get_data_parallel_world_size()},
        "eval_size": eval_size,  # the held-out prompts used (jsonl files and dropped rows make it differ from data.eval_size)
        "prompt_template": TEMPLATES[cfg.data.template],
        "base_model": str(loop.trainee.hf_dir),
        "examples": final.samples,
        "config": to_dict(cfg),
    }
    title = f"R1-Zero GRPO on {task['name']} ({cfg.steps} steps)"
    loop.write_summary(summary, plot=lambda run_dir: plot_run(run_dir / "metrics.jsonl", run_dir / "plot.png", title=title))
    return summary


def _print_table(s: dict, run_dir: Path) -> None:
    lines = [
        "",
        f"GRPO ({s['stage']}) finished: {run_dir}",
        f"  held-out accuracy   base {100 * s['base_accuracy']:5.1f} %  ->  final {100 * s['final_accuracy']:5.1f} %  (maj@k {100 * s['final_maj_accuracy']:.1f} %)",
        f"  format rate         {100 * s['final_format_rate']:.1f} %",
        f"  response length     {s['final_response_length']:.1f} tokens",
        f"  steps               {s['steps']}",
        "  layout              {world_size} rank(s): {rollout_engines} rollout engine(s) of TP {engine_tensor_parallel_size}, trainer DP {data_parallel_size}".format(**s["layout"]),
        f"  wall time           {s['wall_seconds']:.0f} s"
        + (f" (after {s['base_pretrain_seconds']:.0f} s pretraining the base model)" if s["base_pretrain_seconds"] else ""),
        "  time by phase       " + ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds_by_phase"].items()),
        f"  plot                {run_dir / 'plot.png'}",
        "",
    ]
    print("\n".join(lines), flush=True)
