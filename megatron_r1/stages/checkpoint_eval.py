"""`megatron-r1 eval-checkpoints STAGE.yaml logging.run_dir=RUN`: every checkpoint a run saved,
evaluated on the held-out set after training, as points of an RL-training-time curve.

The base model is step 0. For each saved step the weights are loaded into the trainer's model (any
TP/PP layout, weights only) and streamed into the colocated engines the way the RL loop refits
them, so one engine start serves all checkpoints. Each step gives greedy pass@1, the mean accuracy
of k samples (the paper's pass@1), maj@k, pass@k, the response length and, with `data.level_key`, the same per difficulty level; together with the RL
wall-clock seconds the checkpoint recorded. Rows go to `<run_dir>/checkpoint_eval.jsonl`, one per
step; steps already there are skipped, so an interrupted evaluation resumes and a longer run
only adds its new checkpoints. Collective, like the RL loop: launch it as the run was launched.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from megatron_r1 import distributed
from megatron_r1.config import ConfigError, StageConfig
from megatron_r1.data.prompts import PromptItem, load_prompts
from megatron_r1.data.tokenizer import load_tokenizer
from megatron_r1.models.build import build_model
from megatron_r1.models.hf.base import export_hf_tensors, load_hf
from megatron_r1.rewards.reward_fn import RewardFn
from megatron_r1.rollout.vllm_engine import VLLMEngine
from megatron_r1.rollout.weight_sync import WeightSync
from megatron_r1.train import checkpoint as ckpt
from megatron_r1.train.loop import model_config_from_hf
from megatron_r1.rollout.evaluation import EvalResult, evaluate
from megatron_r1.stages.base_model import prepare_base_model

log = logging.getLogger(__name__)

RESULT_FILE = "checkpoint_eval.jsonl"


def level_of(item: PromptItem, key: str) -> str | None:
    """The difficulty level of a held-out item: its reasoning-gym `metadata[key]` (or
    `metadata.difficulty[key]`), as text; None without a key."""
    if not key:
        return None
    metadata = (item.entry or {}).get("metadata", {})
    value = metadata.get(key, metadata.get("difficulty", {}).get(key))
    if value is None:
        raise ConfigError(f"data.level_key={key!r}: held-out item {item.index} has no metadata field {key!r}; "
                          f"fields: {', '.join(sorted(metadata)) or 'none'}")
    return str(value)


def summarize(result: EvalResult, levels: list[str | None]) -> dict:
    """The curve point of one evaluation: overall metrics and, when levels are known, per level."""
    row = {"accuracy": result.accuracy, "maj_accuracy": result.maj_accuracy, "sampled_accuracy": result.sampled_accuracy,
           "pass_at_k": result.pass_at_k, "format_rate": result.format_rate, "length_mean": result.length_mean}
    if levels and levels[0] is not None:
        by_level: dict[str, list[dict]] = defaultdict(list)
        for level, r in zip(levels, result.rows):
            by_level[level].append(r)
        row["levels"] = {
            level: {"n": len(rs), "accuracy": _mean(rs, "accuracy"), "maj_accuracy": _mean(rs, "maj"),
                    "sampled_accuracy": _mean(rs, "sampled"), "pass_at_k": _mean(rs, "pass_k"), "length_mean": _mean(rs, "length")}
            for level, rs in sorted(by_level.items(), key=lambda kv: _level_order(kv[0]))
        }
    return row


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def _level_order(level: str):
    try:
        return (0, float(level), level)
    except ValueError:
        return (1, 0.0, level)


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a checkpoint_eval.jsonl, by step (the last row of a step wins)."""
    path = Path(path)
    if not path.exists():
        return []
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interrupted write: that step is evaluated again
                continue
            rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def run(cfg: StageConfig) -> list[dict]:
    """Evaluate the base model and every checkpoint under `<logging.run_dir>/checkpoints` not yet in
    `checkpoint_eval.jsonl`; returns all rows (rank 0)."""
    distributed.init_distributed(cfg.parallel, cfg.seed)
    run_dir = Path(cfg.logging.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    steps = ckpt.saved_steps(ckpt_dir)
    if not steps:
        raise ConfigError(f"{ckpt_dir} holds no checkpoint: train first (megatron-r1 r1-zero ...) with the same logging.run_dir")
    out = run_dir / RESULT_FILE
    done = {r["step"] for r in read_rows(out)}
    todo = [s for s in [0, *steps] if s not in done]  # step 0 first: the engine starts with the base weights
    if not todo:
        log.info("%s: all %d checkpoints evaluated already", out, len(steps))
        return read_rows(out)

    hf_dir, _ = prepare_base_model(cfg)
    tokenizer = load_tokenizer(hf_dir)
    model_cfg = model_config_from_hf(cfg, hf_dir)  # the weights only: no optimizer
    model = build_model(model_cfg, cfg.parallel, cfg.memory)
    load_hf(model, model_cfg, hf_dir)
    prompts = load_prompts(cfg.data, "eval", tokenizer).items
    levels = [level_of(p, cfg.data.level_key) for p in prompts]
    reward_fn = RewardFn(cfg.reward)
    engine = VLLMEngine(cfg.rollout, str(hf_dir))  # starts with the base weights: step 0
    syncer = WeightSync(engine, cfg.rollout.sync_bucket_mb)
    main = distributed.is_main()
    if main:
        log.info("evaluating steps %s of %s on %d held-out prompts (maj@%d)", todo, run_dir, len(prompts), cfg.logging.eval_samples)
    try:
        for step in todo:
            wall = 0.0
            if step:
                extra = ckpt.load_checkpoint(ckpt_dir, step, model, None, None, load_rng=False)
                wall = float(extra.get("wall_seconds", 0.0))
                traffic = {"received": 0}
                syncer.sync(export_hf_tensors(model, model_cfg, traffic), traffic)
            result = evaluate(engine, tokenizer, prompts, reward_fn, cfg.rollout.max_response_tokens, cfg.logging.eval_samples,
                              cfg.rollout.temperature, seed=cfg.seed, stop=cfg.rollout.stop)
            row = {"step": step, "wall_seconds": round(wall, 2), "k": cfg.logging.eval_samples, **summarize(result, levels)}
            if main:
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                log.info("step %d: greedy pass@1 %.1f %%, sampled pass@1 %.1f %%, maj@%d %.1f %%, %.1f tokens", step,
                         100 * row["accuracy"], 100 * row["sampled_accuracy"], row["k"], 100 * row["maj_accuracy"], row["length_mean"])
    finally:
        engine.shutdown()
    return read_rows(out) if main else []
