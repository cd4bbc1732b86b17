"""Rejection sampling (DeepSeek-R1 stage 3): k responses per training prompt from a model, only the
verified ones kept, written as an SFT set.

A sample is kept when, in this order (the first failing check names its drop reason):

1. it ended on its own (`truncated` otherwise: a response cut at `rollout.max_response_tokens`
   would teach the model to stop mid-thought),
2. the verifier accepts its answer (`incorrect`; `rejection.require_correct`),
3. it has the strict R1 format (`bad_format`; `rejection.require_format`),
4. its chain of thought is in the prompt's language (`mixed_language`; at least
   `rejection.min_language_consistency` of its words, a CoT without words passes: "3 + 4 = 7"),
5. it is not a duplicate of a response already kept for the prompt (`duplicate`, whitespace-normalised),
6. the prompt has fewer than `rejection.keep_per_prompt` kept responses (`over_cap`).

With `rejection.rewrite=readable` (the cold-start stage) a kept response is rewritten into the
readable pattern of R1's cold-start data, reasoning then a summary, in our tags::

    <think> {the thought, whitespace-normalised}, the final answer: {answer} </think> <answer> {answer} </answer>

(the summary line in the prompt's language, `data/phrasebook.py`; a language without one is kept
as sampled and counted as `not_rewritten`).

General prompts (`rejection.general_ratio` > 0, prompts from `data.general_path` / `data.general_task`)
have no verifier: each gets k samples too, the reward model at `reward.model_path` scores them (on the
trainer ranks, like the final RL stage), and a prompt keeps its best `rejection.keep_per_prompt`
distinct finished responses scoring at least `rejection.min_general_score`. General prompts are
sampled until there are `general_ratio` x (kept reasoning rows) general rows (the paper mixes 600k
reasoning with 200k general samples: 0.33) or they run out; rows say `"source": "general"`.

SPMD like the rollouts: every engine samples its share of the prompts, the ranks of an engine split
the scoring, rank 0 writes `<run_dir>/data.jsonl` (one `{"prompt", "response", "answer", "source",
"provenance"}` row per kept response, in prompt order; `megatron-r1 sft` reads it as it is) and
`<run_dir>/stats.json` (counts by reason, pass rates). A finished run is not redone.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_r1 import distributed
from megatron_r1.config import ConfigError, RejectionConfig, StageConfig, choices, to_dict
from megatron_r1.data.prompts import PromptItem, load_prompts
from megatron_r1.data.tokenizer import decode_response, load_tokenizer, stop_conditions
from megatron_r1.data.phrasebook import with_summary
from megatron_r1.rewards.accuracy import extract_answer
from megatron_r1.rewards.format import extract_think
from megatron_r1.rewards.reward_fn import RewardFn, score_split
from megatron_r1.rollout.layout import EngineLayout
from megatron_r1.rollout.vllm_engine import VLLMEngine
from megatron_r1.stages.base_model import prepare_base_model

log = logging.getLogger(__name__)

DATA_FILE, STATS_FILE = "data.jsonl", "stats.json"
DROP_REASONS = ("truncated", "incorrect", "bad_format", "mixed_language", "duplicate", "over_cap")


def drop_reason(text: str, finish_reason: str, scores: dict[str, float], cot_languages: list[str | None], target: str,
                cfg: StageConfig) -> str | None:
    """Why a sample is rejected (checks 1-4 of the module docstring), or None to keep it."""
    r = cfg.rejection
    if finish_reason != "stop":
        return "truncated"
    if r.require_correct and scores["accuracy"] < 1.0:
        return "incorrect"
    if r.require_format and scores["format"] < 1.0:
        return "bad_format"
    words = [w for w in cot_languages if w is not None]  # identified words; digits and symbols are not words
    if words and sum(w == target for w in words) / len(words) < r.min_language_consistency:
        return "mixed_language"
    return None


def _normalised(text: str) -> str:
    return " ".join(text.split())


REWRITES = choices(RejectionConfig, "rewrite")


def readable(text: str, language: str) -> str | None:
    """`text` in the readable pattern (module docstring), or None when it cannot be rewritten."""
    thought, answer = extract_think(text), extract_answer(text)
    if thought is None or answer is None:
        return None
    summary = with_summary(_normalised(thought), _normalised(answer), language)
    return None if summary is None else f"<think> {summary} </think> <answer> {_normalised(answer)} </answer>"


def _sample_share(cfg, engine, tokenizer, reward_fn, prompts: list[PromptItem], call: int, model: str) -> tuple[list[dict], Counter]:
    """This engine's kept rows and drop counts for its share of `prompts`."""
    layout, groups = engine.layout, engine.groups
    k = cfg.rejection.samples_per_prompt
    mine = layout.shard(prompts)
    if not mine:
        return [], Counter()
    torch.manual_seed((cfg.seed * 1_000_003 + call) * 1_009 + layout.engine_index)  # every rank of an engine draws alike
    stop_ids, stop_strings = stop_conditions(tokenizer, cfg.rollout.stop)
    out = engine.generate([p.prompt_ids for p in mine], n=k, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                          max_tokens=cfg.rollout.max_response_tokens, stop_token_ids=stop_ids, stop=stop_strings)
    texts = [decode_response(tokenizer, r.response_ids) for r in out]
    items = [mine[r.prompt_index].as_reward_item() for r in out]
    scored = score_split(reward_fn, [mine[r.prompt_index].prompt for r in out], texts, items, groups.split_work)
    ident = reward_fn.languages
    counts: Counter = Counter()
    rows: list[dict] = []
    kept_texts: dict[int, set[str]] = {}
    for j, (r, text) in enumerate(zip(out, texts)):
        prompt = mine[r.prompt_index]
        scores = {name: float(v[j]) for name, v in scored.components.items()}
        target = reward_fn.target_language(prompt.prompt, items[j])
        reason = drop_reason(text, r.finish_reason, scores, ident.word_languages(extract_think(text) or ""), target, cfg)
        seen = kept_texts.setdefault(r.prompt_index, set())
        if reason is None and _normalised(text) in seen:
            reason = "duplicate"
        if reason is None and cfg.rejection.keep_per_prompt and len(seen) >= cfg.rejection.keep_per_prompt:
            reason = "over_cap"
        if reason is not None:
            counts[reason] += 1
            continue
        seen.add(_normalised(text))
        counts["kept"] += 1
        response = text.strip()
        if cfg.rejection.rewrite == "readable":
            rewritten = readable(text, target)
            counts["not_rewritten" if rewritten is None else "rewritten"] += 1
            response = rewritten or response
        rows.append({
            "prompt": prompt.question,
            "response": response,
            "answer": prompt.answer,
            "source": "reasoning",
            "provenance": {"model": model, "task": cfg.data.task if cfg.data.source == "reasoning_gym" else cfg.data.train_path,
                           "index": prompt.index, "sample": j % k, "reward": float(scored.total[j]),
                           "language": target, "response_tokens": len(r.response_ids)},
        })
    return rows, counts


def _general_candidates(cfg, engine, tokenizer, prompts: list[PromptItem], call: int) -> list[dict]:
    """k finished-or-not samples per prompt of this engine's share, as plain rows (for the gather)."""
    layout = engine.layout
    k = cfg.rejection.samples_per_prompt
    mine = layout.shard(prompts)
    if not mine:
        return []
    torch.manual_seed((cfg.seed * 1_000_003 + 500_009 + call) * 1_009 + layout.engine_index)
    stop_ids, stop_strings = stop_conditions(tokenizer, cfg.rollout.stop)
    out = engine.generate([p.prompt_ids for p in mine], n=k, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                          max_tokens=cfg.rollout.max_response_tokens, stop_token_ids=stop_ids, stop=stop_strings)
    return [{"prompt": mine[r.prompt_index], "sample": j % k, "finish_reason": r.finish_reason, "tokens": len(r.response_ids),
             "text": decode_response(tokenizer, r.response_ids).strip()}
            for j, r in enumerate(out)]


def select_general(candidates: list[dict], scores: list[float], keep_per_prompt: int, min_score: float | None,
                   model: str) -> tuple[list[dict], Counter]:
    """The reward model's pick per general prompt: finished, distinct, best first, at least `min_score`."""
    counts: Counter = Counter()
    by_prompt: dict[int, list[tuple[float, dict]]] = {}
    for cand, score in zip(candidates, scores):
        by_prompt.setdefault(cand["prompt"].index, []).append((score, cand))
    rows = []
    for group in by_prompt.values():
        seen: set[str] = set()
        for score, cand in sorted(group, key=lambda sc: -sc[0]):  # stable: equal scores keep sample order
            if cand["finish_reason"] != "stop":
                reason = "truncated"
            elif min_score is not None and score < min_score:
                reason = "low_score"
            elif _normalised(cand["text"]) in seen:
                reason = "duplicate"
            elif keep_per_prompt and len(seen) >= keep_per_prompt:
                reason = "over_cap"
            else:
                reason = None
            if reason is not None:
                counts[reason] += 1
                continue
            seen.add(_normalised(cand["text"]))
            counts["kept"] += 1
            prompt = cand["prompt"]
            rows.append({"prompt": prompt.question, "response": cand["text"], "answer": prompt.answer, "source": "general",
                         "provenance": {"model": model, "index": prompt.index, "sample": cand["sample"],
                                        "reward_model_score": score, "response_tokens": cand["tokens"]}})
    return rows, counts


def _general_rows(cfg, engine, tokenizer, target: int, model: str) -> tuple[list[dict], dict]:
    """Up to `target` reward-model-approved general rows (collective: every rank calls it)."""
    from megatron_r1.data.prompts import load_general_prompts
    from megatron_r1.rewards.reward_model import RewardModelScorer

    r = cfg.rejection
    if cfg.reward.general_scorer != "reward_model":
        raise ConfigError("rejection.general_ratio > 0 approves general responses with the scalar reward model; set reward.general_scorer=reward_model and reward.model_path")
    if not cfg.reward.model_path:
        raise ConfigError("rejection.general_ratio > 0 needs reward.model_path (a `megatron-r1 reward-model` run's hf/ directory)")
    prompts = load_general_prompts(cfg.data, tokenizer).items
    scorer = RewardModelScorer(cfg.reward.model_path, cfg.parallel)
    rows: list[dict] = []
    counts: Counter = Counter()
    sampled = 0
    per_call = r.prompts_per_call * engine.layout.num_engines
    for call, first in enumerate(range(0, len(prompts), per_call)):
        if len(rows) >= target:
            break
        chunk = prompts[first : first + per_call]
        candidates = [c for part in engine.groups.gather([_general_candidates(cfg, engine, tokenizer, chunk, call)]) for c in part]
        scores = scorer([c["prompt"].question for c in candidates], [c["text"] for c in candidates]).tolist()
        got, got_counts = select_general(candidates, scores, r.keep_per_prompt, r.min_general_score, model)
        rows += got
        counts += got_counts
        sampled += len(chunk)
    counts["over_ratio"] = max(0, len(rows) - target)
    rows = rows[:target]
    stats = {"target": target, "kept": len(rows), "prompts_sampled": sampled, "reward_model": cfg.reward.model_path,
             "dropped": {k: counts[k] for k in ("truncated", "low_score", "duplicate", "over_cap", "over_ratio")}}
    return rows, stats


def run(cfg: StageConfig) -> dict:
    """Sample, verify, filter and write the SFT set (every rank calls it); returns the stats on rank 0."""
    distributed.init_distributed(cfg.parallel, cfg.seed)
    main = distributed.is_main()
    run_dir = Path(cfg.logging.run_dir)
    if (run_dir / STATS_FILE).is_file() and (run_dir / DATA_FILE).is_file():
        stats = json.loads((run_dir / STATS_FILE).read_text())
        if main:
            log.info("rejection sampling already done: %s (%d rows); delete it to sample again", run_dir / DATA_FILE, stats["kept"])
        return stats if main else {}
    hf_dir, _ = prepare_base_model(cfg)
    tokenizer = load_tokenizer(hf_dir)
    prompt_set = load_prompts(cfg.data, "train", tokenizer)
    prompts = prompt_set.items[: cfg.rejection.max_prompts or None]
    if not prompts:
        raise ConfigError("no training prompts to sample from; check data.*")
    reward_fn = RewardFn(cfg.reward)
    engine = VLLMEngine(cfg.rollout, str(hf_dir))
    layout: EngineLayout = engine.layout
    if main:
        log.info("rejection sampling: %d prompts x %d samples from %s; %s", len(prompts), cfg.rejection.samples_per_prompt, hf_dir, layout.describe())

    per_call = cfg.rejection.prompts_per_call * layout.num_engines
    rows: list[dict] = []
    counts: Counter = Counter()
    start = time.perf_counter()
    bar = tqdm(total=len(prompts), desc="rejection sampling", unit="prompt", disable=not (main and cfg.logging.progress_bar), dynamic_ncols=True)
    for call, first in enumerate(range(0, len(prompts), per_call)):
        chunk = prompts[first : first + per_call]
        share_rows, share_counts = _sample_share(cfg, engine, tokenizer, reward_fn, chunk, call, str(hf_dir))
        for part_rows, part_counts in engine.groups.gather([(share_rows, share_counts)]):  # engine order = prompt order
            rows += part_rows
            counts += part_counts
        bar.update(len(chunk))
        bar.set_postfix(kept=counts["kept"])
    bar.close()
    general = None
    if cfg.rejection.general_ratio > 0:
        general_rows, general = _general_rows(cfg, engine, tokenizer, round(cfg.rejection.general_ratio * counts["kept"]), str(hf_dir))
        rows += general_rows
        if main:
            log.info("general prompts: kept %d of the %d the ratio asks for, from %d prompts", general["kept"], general["target"], general["prompts_sampled"])
    engine.shutdown()

    samples = len(prompts) * cfg.rejection.samples_per_prompt
    stats = {
        "prompts": len(prompts),
        "samples": samples,
        "kept": counts["kept"],
        "dropped": {reason: counts[reason] for reason in DROP_REASONS},
        **({"rewritten": counts["rewritten"], "not_rewritten": counts["not_rewritten"]} if cfg.rejection.rewrite != "none" else {}),
        **({"general": general} if general is not None else {}),
        "prompts_with_a_kept_response": len({r["provenance"]["index"] for r in rows if r["source"] == "reasoning"}),
        "pass_rate": counts["kept"] / samples,
        "seconds": round(time.perf_counter() - start, 1),
        "model": str(hf_dir),
        "prompts_skipped": dict(prompt_set.skip_reasons),
        "config": to_dict(cfg),
    }
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / (DATA_FILE + ".tmp")
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(run_dir / DATA_FILE)
        (run_dir / STATS_FILE).write_text(json.dumps(stats, indent=2))  # written last: marks the stage done
        dropped = ", ".join(f"{k} {v}" for k, v in stats["dropped"].items() if v) or "none"
        print(f"\nrejection sampling finished: {run_dir / DATA_FILE}\n  kept {stats['kept']} of {samples} samples "
              f"({100 * stats['pass_rate']:.1f} %), {stats['prompts_with_a_kept_response']} of {len(prompts)} prompts\n"
              f"  dropped: {dropped}\n", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # nobody reads data.jsonl before rank 0 has written it
    return stats if main else {}
