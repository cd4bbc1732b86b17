"""`megatron-r1 evaluate`: the RL loop's held-out evaluation (`rollout/evaluation.py`) for any Hugging Face model."""

from __future__ import annotations

from megatron_r1.rollout.evaluation import evaluate

RESULT_FILE = "eval.json"


def run(cfg) -> dict:
    """`megatron-r1 evaluate STAGE.yaml checkpoint.load_hf=MODEL`: the held-out evaluation of the RL
    loop (greedy pass@1, maj@k, format, language consistency, length) for any Hugging Face model,
    written to `<run_dir>/eval.json`. Collective: every rank hosts an engine and takes a share."""
    import json
    from pathlib import Path

    from megatron_r1 import distributed
    from megatron_r1.config import to_dict
    from megatron_r1.data.prompts import load_prompts
    from megatron_r1.data.tokenizer import load_tokenizer
    from megatron_r1.rewards.reward_fn import RewardFn
    from megatron_r1.rollout.vllm_engine import VLLMEngine
    from megatron_r1.stages.base_model import prepare_base_model

    distributed.init_distributed(cfg.parallel, cfg.seed)
    hf_dir, _ = prepare_base_model(cfg)
    tokenizer = load_tokenizer(hf_dir)
    prompts = load_prompts(cfg.data, "eval", tokenizer).items
    engine = VLLMEngine(cfg.rollout, str(hf_dir))
    try:
        k = cfg.logging.eval_samples
        result = evaluate(engine, tokenizer, prompts, RewardFn(cfg.reward), cfg.rollout.max_response_tokens, k,
                          cfg.rollout.temperature, seed=cfg.seed, stop=cfg.rollout.stop)
    finally:
        engine.shutdown()
    if not distributed.is_main():
        return {}
    out = {
        "model": str(hf_dir),
        "accuracy": result.accuracy,
        "maj_accuracy": result.maj_accuracy,
        "sampled_accuracy": result.sampled_accuracy,
        "pass_at_k": result.pass_at_k,
        "k": k,
        "format_rate": result.format_rate,
        "language_consistency": result.language_consistency,
        "response_length": result.length_mean,
        "eval_size": len(prompts),
        "examples": result.samples,
        "config": to_dict(cfg),
    }
    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESULT_FILE).write_text(json.dumps(out, indent=2))
    print(f"\nheld-out evaluation of {hf_dir} ({len(prompts)} prompts): accuracy {100 * result.accuracy:.1f} % "
          f"(maj@{k} {100 * result.maj_accuracy:.1f} %, sampled pass@1 {100 * result.sampled_accuracy:.1f} %, pass@{k} {100 * result.pass_at_k:.1f} %), format {100 * result.format_rate:.1f} %, "
          f"language consistency {100 * result.language_consistency:.1f} %, {result.length_mean:.1f} tokens\n  -> {run_dir / RESULT_FILE}\n", flush=True)
    return out
