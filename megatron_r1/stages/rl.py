"""The GRPO loop (DeepSeek-R1-Zero): rollout -> reward -> advantages -> logprobs -> update -> sync.

Read `_train` top to bottom: it is the algorithm. Megatron-Core holds the policy (any TP/PP/EP/DP);
the engines sample and score a step's prompts, the scored groups are put back in order on every
trainer rank, each trainer data-parallel rank trains on its part of the batch, and the new policy
goes to the engines. Where the engines are is the placement (`placement.py`):

* colocated (`rollout/colocated.py`): every rank also hosts one vLLM worker (SPMD), generation and
  the update take turns on the same devices;
* disaggregated (`rollout/remote.py` here, `rollout/serve.py` on the rollout ranks): the engines
  run on ranks of their own and, with `async.max_staleness: k`, sample the next k batches while the
  trainer updates.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from megatron_r1 import distributed, heartbeat, placement, platform
from megatron_r1.algorithms import group_advantages
from megatron_r1.config import ConfigError, StageConfig, to_dict
from megatron_r1.data.prompts import hold_out_general, load_general_prompts, load_prompts
from megatron_r1.data.templates import TEMPLATES
from megatron_r1.data.tokenizer import load_tokenizer
from megatron_r1.models.build import build_model, moe_layers, num_parameters
from megatron_r1.models.hf.base import load_hf, read_hf_config
from megatron_r1.rewards.general import SCORERS as GENERAL_SCORERS
from megatron_r1.rewards.reward_fn import RewardFn
from megatron_r1.rollout.bridge import Bridge, RemoteFailure
from megatron_r1.rollout.colocated import ColocatedRollouts
from megatron_r1.rollout.collect import RolloutBatch, Sample
from megatron_r1.rollout.remote import RemoteRollouts
from megatron_r1.rollout.serve import serve
from megatron_r1.rollout.vllm_engine import check_engine_options
from megatron_r1.stages.base_model import prepare_base_model
from megatron_r1.train import checkpoint as ckpt
from megatron_r1.train import moe_routing
from megatron_r1.train.grpo_update import make_batch, update_phase
from megatron_r1.train.loop import StepResult, Trainee, TrainingLoop, build_from_hf
from megatron_r1.train.metrics import plot_run, read_metrics
from megatron_r1.train.preemption import REQUEUE_EXIT_CODE, Preempted
from megatron_r1.train.step import data_parallel_share

log = logging.getLogger(__name__)


def run(cfg: StageConfig) -> dict:
    """Run R1-Zero GRPO as configured (every rank of the job calls it); returns the summary
    (also written to summary.json) on rank 0."""
    check_engine_options(cfg.rollout, cfg.grpo.routing_replay)  # GPU-only engine options: one line, before anything loads
    _check_placement(cfg)
    bridge = None
    if cfg.placement == "disaggregated":  # two sides, each a world of its own (placement.py)
        job = placement.init(distributed.read_env(), cfg.parallel.rollout_ranks, cfg.parallel.backend, cfg.parallel.timeout_minutes)
        if job.role.side == placement.ROLLOUT:
            summary = serve(cfg, job)
            heartbeat.stop()  # finished, not dead: the trainer may still be saving
            placement.leave()
            return summary
        bridge = Bridge(job, cfg.parallel.timeout_minutes * 60)
    distributed.init_distributed(cfg.parallel, cfg.seed)
    try:
        summary = _train(cfg, bridge)
    except BaseException as e:
        if bridge is not None:  # the rollout side leaves too: saved and requeued, or failed
            if isinstance(e, Preempted):
                bridge.finish(REQUEUE_EXIT_CODE, str(e))
            elif not isinstance(e, RemoteFailure):
                bridge.fail(f"trainer rank {bridge.role.job_rank} failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
        raise
    if bridge is not None:
        placement.leave()
    return summary


def _train(cfg: StageConfig, bridge: Bridge | None) -> dict:
    """The trainer ranks' GRPO loop, over colocated engines or over the bridge to the rollout ranks."""
    main = distributed.is_main()
    hf_dir, base_seconds = prepare_base_model(cfg)
    if bridge is not None and main:
        bridge.put("hf_dir", str(hf_dir))  # the rollout side starts its engines from it
    tokenizer = load_tokenizer(hf_dir)
    _check_routing_replay(cfg, hf_dir)
    policy = build_from_hf(cfg, hf_dir, cfg.steps)
    routing_layers = _routing_layers(cfg, policy)
    reference = _build_reference(cfg, policy)
    eval_set = load_prompts(cfg.data, "eval", tokenizer)

    with TrainingLoop(cfg, policy, cfg.steps, "GRPO") as loop:  # pretraining the base is its own stage: the RL clock starts here
        saved = loop.resume()
        base_accuracy = saved.get("base_accuracy") if saved else None
        from_megatron = saved is None and _load_megatron_weights(cfg, policy, reference)
        if bridge is None:
            train_set = load_prompts(cfg.data, "train", tokenizer)
            general_set, general_eval = None, None
            if cfg.data.general_share > 0:
                general_set, general_eval = hold_out_general(load_general_prompts(cfg.data, tokenizer), cfg.data.general_eval_size)
            rollouts = ColocatedRollouts(cfg, policy, reference, tokenizer, train_set, eval_set, general_set, RewardFn(cfg.reward), loop,
                                         general_eval_set=general_eval)
        else:
            rollouts = RemoteRollouts(cfg, bridge, policy, tokenizer, loop)
        _check_batch_fits(cfg, rollouts.num_engines, len(eval_set.items))
        if main:
            log.info("policy: %s parameters on %s; %s", f"{num_parameters(policy.model):,}", platform.describe(), rollouts.describe())
        rollouts.start(saved, weights_changed=saved is not None or from_megatron, evaluate_base=base_accuracy is None, step=loop.start_step)
        last = {"eval": None}

        def evaluate_now(step: int):
            last["eval"] = rollouts.evaluate(step)
            return last["eval"].metrics(cfg.logging.eval_samples)

        if base_accuracy is None:
            loop.metrics.log(0, evaluate_now(0))
            base, last["eval"] = last["eval"], None
            base_accuracy = base.accuracy
            if main:
                log.info("base model: held-out accuracy %.1f %%, format %.1f %%, %.1f tokens; e.g. %r",
                         100 * base.accuracy, 100 * base.format_rate, base.length_mean, base.samples[0]["response"][:120])

        def step(i: int) -> StepResult:
            # 1-2. rollout and reward: sampled and scored by the engines (here, or on the rollout ranks)
            rollout, overlap = rollouts.batch(i)
            if not rollout.samples:  # dynamic sampling found no group with signal: nothing to learn
                return StepResult({**rollout.stats, **overlap})
            samples, rewards = rollout.samples, rollout.rewards
            # 3. advantages, over whole groups; then this data-parallel rank's part of the batch
            advantages = group_advantages(rewards, cfg.rollout.n_samples_per_prompt, scale_by_std=cfg.grpo.scale_advantages_by_std)
            share = data_parallel_share(len(samples), "raise grpo.prompts_per_step or rollout.n_samples_per_prompt")
            batch = make_batch(samples[share], advantages[share], tokenizer.pad_token_id, routing_layers)
            if main and cfg.logging.save_rollouts:
                _save_rollouts(loop.run_dir, i + 1, samples, rewards, advantages)
            # 4-5. logprobs and policy update (colocated: with the engine's device memory handed to the trainer)
            rollouts.before_update()
            train = update_phase(cfg, policy.ddp, policy.optimizer, policy.scheduler, reference, batch, loop.timer)
            rollouts.check_sampled(train, i + 1)  # the engine sampled with the trainer's weights? (free, every step)
            # 6. the new weights to the engines, then the parity probe
            synced = rollouts.publish(i + 1)
            row = {**_step_row(rollout, share, train, synced), **overlap}
            postfix = {"reward": f"{row['reward/mean']:.2f}", "acc": f"{row.get('reward/accuracy', 0):.2f}", "len": f"{row['response/length_mean']:.0f}"}
            if "async/staleness_max" in overlap:
                postfix["lag"] = f"{overlap['async/staleness_max']:.0f}"
            return StepResult(row, nonfinite=train.get("nonfinite", 0.0), reward_failures=rollout.stats["reward/failures"],
                              sequences=len(samples), postfix=postfix)

        # 7. metrics, evaluation, checkpoint: the shared loop
        loop.run(step, evaluate=evaluate_now, eval_every=cfg.logging.eval_every,
                 state=lambda: {**rollouts.state(), "base_accuracy": base_accuracy}, resident=rollouts.resident)
        final = last["eval"]
        if final is None:  # resumed at the end: evaluate what we have
            evaluate_now(cfg.steps)
            final = last["eval"]
        rollouts.close()
        loop.export_hf()
        summary = _summary(cfg, loop, base_accuracy, final, base_seconds, rollouts.layout(), len(eval_set.items)) if main else {}
    if main:
        _print_table(summary, loop.run_dir)
    return summary


def _check_placement(cfg: StageConfig) -> None:
    """What the disaggregated placement does not do (yet), in one line before anything loads."""
    if cfg.placement != "disaggregated":
        return
    if cfg.data.general_share > 0:
        raise ConfigError("placement=disaggregated samples reasoning prompts only (general prompts are rewarded by a judge or "
                          "reward model on the engine's side); set data.general_share=0 or placement=colocated")
    if cfg.checkpoint.load_megatron:
        raise ConfigError("placement=disaggregated starts from checkpoint.load_hf (the rollout ranks load it); convert the "
                          "Megatron checkpoint with `megatron-r1 convert` or use placement=colocated")


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


def _check_batch_fits(cfg: StageConfig, engines: int, eval_prompts: int) -> None:
    """Every engine needs at least one prompt per step and per evaluation, every trainer
    data-parallel rank at least one sequence."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
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


def _step_row(rollout: RolloutBatch, share: slice, train: dict, sync: dict) -> dict:
    """The metrics row of one step (the same on every rank)."""
    rewards, lengths, components, samples = rollout.rewards, rollout.lengths, rollout.components, rollout.samples
    train = dict(train)
    update_tokens_per_s = train.pop("tokens_per_s", None)  # a timing, with the other perf/ rows
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
        **({"perf/train_tokens_per_s": update_tokens_per_s} if update_tokens_per_s is not None else {}),
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


def _summary(cfg: StageConfig, loop: TrainingLoop, base_accuracy: float, final, base_seconds: float, layout: dict, eval_size: int) -> dict:
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
        **({"final_general": final.general} if final.general else {}),  # held-out general prompts (data.general_eval_size)
        "steps": cfg.steps,
        "wall_seconds": round(loop.wall(), 1),  # RL only: checkpoints keep it across restarts
        "base_pretrain_seconds": round(base_seconds, 1),  # 0 unless this run pretrained the base
        "seconds_by_phase": {k: round(v, 1) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
        "task": task,
        "layout": {**layout, "data_parallel_size": parallel_state.get_data_parallel_world_size()},
        "eval_size": eval_size,  # the held-out prompts used (jsonl files and dropped rows make it differ from data.eval_size)
        "prompt_template": TEMPLATES[cfg.data.template],
        "base_model": str(loop.trainee.hf_dir),
        "examples": final.samples,
        "config": to_dict(cfg),
    }
    title = f"R1-Zero GRPO on {task['name']} ({cfg.steps} steps)"
    loop.write_summary(summary, plot=lambda run_dir: plot_run(run_dir / "metrics.jsonl", run_dir / "plot.png", title=title))
    return summary


def _describe_layout(layout: dict) -> str:
    engines = "{rollout_engines} rollout engine(s) of TP {engine_tensor_parallel_size}".format(**layout)
    if layout.get("placement") == "disaggregated":
        return (f"{layout['world_size']} rank(s), disaggregated: {engines} on {layout['rollout_ranks']} rollout rank(s), "
                f"trainer DP {layout['data_parallel_size']} on {layout['trainer_ranks']}, at most {layout['max_staleness']} step(s) stale")
    return f"{layout['world_size']} rank(s): {engines}, trainer DP {layout['data_parallel_size']}"


def _print_table(s: dict, run_dir: Path) -> None:
    lines = [
        "",
        f"GRPO ({s['stage']}) finished: {run_dir}",
        f"  held-out accuracy   base {100 * s['base_accuracy']:5.1f} %  ->  final {100 * s['final_accuracy']:5.1f} %  (maj@k {100 * s['final_maj_accuracy']:.1f} %)",
        f"  format rate         {100 * s['final_format_rate']:.1f} %",
        f"  response length     {s['final_response_length']:.1f} tokens",
        f"  steps               {s['steps']}",
        "  layout              " + _describe_layout(s["layout"]),
        f"  wall time           {s['wall_seconds']:.0f} s"
        + (f" (after {s['base_pretrain_seconds']:.0f} s pretraining the base model)" if s["base_pretrain_seconds"] else ""),
        "  time by phase       " + ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds_by_phase"].items()),
        f"  plot                {run_dir / 'plot.png'}",
        "",
    ]
    print("\n".join(lines), flush=True)
