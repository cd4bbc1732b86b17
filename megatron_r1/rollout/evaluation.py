"""Held-out evaluation with the rollout engines: greedy pass@1 and majority vote over k samples.

SPMD like the rollouts: every engine evaluates its share of the prompts, the ranks of an engine
split the scoring, and every rank returns the result over all prompts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_r1.data.tokenizer import decode_response, stop_conditions
from megatron_r1.rewards.accuracy import extract_answer
from megatron_r1.rewards.format import format_reward
from megatron_r1.rewards.reward_fn import score_split


@dataclass
class EvalResult:
    accuracy: float  # greedy pass@1
    maj_accuracy: float  # majority vote over k sampled answers (maj@k)
    format_rate: float  # share of greedy responses in the strict R1 format
    length_mean: float  # greedy response length (tokens)
    samples: list[dict]  # a few greedy examples for the log
    language_consistency: float = 0.0  # share of greedy CoT words in the question's language (rewards/language.py)
    rows: list[dict] = field(default_factory=list)  # per prompt, in order: accuracy, maj, sampled, pass_k, format, length, question, answer, response
    sampled_accuracy: float = 0.0  # mean accuracy of the k sampled answers (the paper's pass@1 at temperature > 0)
    pass_at_k: float = 0.0  # share of prompts with at least one right answer among the k samples
    general: dict[str, float] = field(default_factory=dict)  # eval/general/*: the held-out general prompts (`evaluate_general`)

    def metrics(self, k: int) -> dict[str, float]:
        return {
            "eval/accuracy": self.accuracy,
            "eval/maj_accuracy": self.maj_accuracy,
            "eval/sampled_accuracy": self.sampled_accuracy,
            "eval/pass_at_k": self.pass_at_k,
            "eval/format_rate": self.format_rate,
            "eval/length_mean": self.length_mean,
            "eval/language_consistency": self.language_consistency,
            "eval/k": float(k),
            **{f"eval/general/{key}": value for key, value in self.general.items()},
        }


@dataclass
class _Greedy:
    """This engine's share of the prompts, answered greedily and scored by the rule rewards."""

    mine: list  # the PromptItems
    prompt_ids: list[list[int]]
    responses: list  # the engine's Rollouts
    texts: list[str]  # decoded as the rewards read them
    scores: dict[str, torch.Tensor]  # reward components (accuracy, language, format, ...) per response
    stop_ids: list[int]
    stop_strings: list[str]


def _greedy_scored(engine, tokenizer, prompts, reward_fn, max_tokens: int, stop: Sequence[str]) -> _Greedy:
    """The greedy half every evaluation shares: shard, generate, decode, score (collective)."""
    mine = engine.layout.shard(prompts)
    prompt_ids = [p.prompt_ids if p.prompt_ids is not None else tokenizer.encode(p.prompt) for p in mine]
    stop_ids, stop_strings = stop_conditions(tokenizer, stop)
    responses = engine.generate(prompt_ids, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens,
                                stop_token_ids=stop_ids, stop=stop_strings)
    texts = [decode_response(tokenizer, r.response_ids) for r in responses]
    scores = score_split(reward_fn, [p.prompt for p in mine], texts, [p.as_reward_item() for p in mine], engine.groups.split_work).components
    return _Greedy(mine, prompt_ids, responses, texts, scores, stop_ids, stop_strings)


def evaluate(engine, tokenizer, prompts, reward_fn, max_tokens: int, k: int, temperature: float = 1.0, seed: int = 0,
             stop: Sequence[str] = ()) -> EvalResult:
    """Score `prompts` (PromptItems) with greedy decoding and with maj@k sampling (collective)."""
    layout, groups = engine.layout, engine.groups
    g = _greedy_scored(engine, tokenizer, prompts, reward_fn, max_tokens, stop)
    mine, prompt_ids, greedy, texts = g.mine, g.prompt_ids, g.responses, g.texts
    items = [p.as_reward_item() for p in mine]
    accuracy, language = g.scores["accuracy"], g.scores["language"]

    maj = sampled_mean = best = accuracy.tolist()
    if k > 1:
        torch.manual_seed(seed * 1_000_003 + layout.engine_index)  # every rank of an engine draws alike
        sampled = engine.generate(prompt_ids, n=k, temperature=temperature, top_p=1.0, max_tokens=max_tokens,
                                  stop_token_ids=g.stop_ids, stop=g.stop_strings)
        sampled_texts = [decode_response(tokenizer, r.response_ids) for r in sampled]
        scores = score_split(reward_fn, [p.prompt for p in mine for _ in range(k)], sampled_texts,
                             [item for item in items for _ in range(k)], groups.split_work).components["accuracy"].view(len(mine), k)
        sampled_mean, best = scores.mean(1).tolist(), scores.max(1).values.tolist()
        maj = [0.0] * len(mine)
        for i in range(len(mine)):
            answers = [extract_answer(t) for t in sampled_texts[i * k : (i + 1) * k]]
            votes = Counter(a for a in answers if a is not None)
            if votes:  # accuracy depends on the extracted answer only: any text giving the winner scores it
                maj[i] = float(scores[i, answers.index(votes.most_common(1)[0][0])])

    rows = [
        {"accuracy": float(a), "maj": m, "sampled": sm, "pass_k": b, "format": format_reward(t, "strict"), "length": len(r.response_ids),
         "language": float(lang), "question": p.question, "answer": p.answer, "response": t}
        for p, t, r, a, m, sm, b, lang in zip(mine, texts, greedy, accuracy.tolist(), maj, sampled_mean, best, language.tolist())
    ]
    rows = groups.gather(rows)  # every prompt, in order, on every rank
    n = max(len(rows), 1)
    return EvalResult(
        accuracy=sum(r["accuracy"] for r in rows) / n,
        maj_accuracy=sum(r["maj"] for r in rows) / n,
        sampled_accuracy=sum(r["sampled"] for r in rows) / n,
        pass_at_k=sum(r["pass_k"] for r in rows) / n,
        format_rate=sum(r["format"] for r in rows) / n,
        length_mean=sum(r["length"] for r in rows) / n,
        language_consistency=sum(r["language"] for r in rows) / n,
        samples=[{key: r[key] for key in ("question", "answer", "response")} for r in rows[:3]],
        rows=rows,
    )


def evaluate_general(engine, tokenizer, prompts, general, reward_fn, max_tokens: int, stop: Sequence[str] = ()) -> dict[str, float]:
    """Greedy responses to the held-out general prompts, scored the way final RL rewards them (the
    reward model or the judge, `rewards/general.py`): the stage's own target on prompts it never
    trains on, so a rise is learning, not the luck of a step's four prompts. Also the rule view of the
    same responses (accuracy where the prompts have references, language, format), never rewarded
    there either. Collective like `evaluate`."""
    g = _greedy_scored(engine, tokenizer, prompts, reward_fn, max_tokens, stop)
    mine, texts, rules = g.mine, g.texts, g.scores
    scores = general([p.question for p in mine], texts)[0].tolist() if not general.collective else [0.0] * len(mine)
    rows = engine.groups.gather([{"question": p.question, "response": t, "score": s, "has_answer": bool(p.answer) or p.entry is not None,
                                  "accuracy": float(a), "language": float(lang), "format": format_reward(t, "strict")}
                                 for p, t, s, a, lang in zip(mine, texts, scores, rules["accuracy"].tolist(), rules["language"].tolist())])
    if general.collective:  # the reward model: every rank scores all held-out responses together
        for row, s in zip(rows, general([r["question"] for r in rows], [r["response"] for r in rows])[0].tolist()):
            row["score"] = s
    n = max(len(rows), 1)
    metrics = {general.kind: sum(r["score"] for r in rows) / n,
               "language_consistency": sum(r["language"] for r in rows) / n,
               "format_rate": sum(r["format"] for r in rows) / n}
    if rows and all(r["has_answer"] for r in rows):  # the verifier's view, where there is a reference
        metrics["accuracy"] = sum(r["accuracy"] for r in rows) / n
    return metrics
