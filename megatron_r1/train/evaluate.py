"""Held-out evaluation with the rollout engine: greedy pass@1 and majority vote over k samples."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from megatron_r1.rewards.accuracy import extract_answer
from megatron_r1.rewards.format import format_reward


@dataclass
class EvalResult:
    accuracy: float  # greedy pass@1
    maj_accuracy: float  # majority vote over k sampled answers (maj@k)
    format_rate: float  # share of greedy responses in the strict R1 format
    length_mean: float  # greedy response length (tokens)
    samples: list[dict]  # a few greedy examples for the log

    def metrics(self, k: int) -> dict[str, float]:
        return {
            "eval/accuracy": self.accuracy,
            "eval/maj_accuracy": self.maj_accuracy,
            "eval/format_rate": self.format_rate,
            "eval/length_mean": self.length_mean,
            "eval/k": float(k),
        }


def evaluate(engine, tokenizer, prompts, reward_fn, max_tokens: int, k: int, temperature: float = 1.0) -> EvalResult:
    """Score `prompts` (PromptItems) with greedy decoding and with maj@k sampling."""
    prompt_ids = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in prompts]
    stop = [tokenizer.eos_token_id]
    greedy = engine.generate(prompt_ids, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens, stop_token_ids=stop)
    texts = [tokenizer.decode(r.response_ids, skip_special_tokens=False) for r in greedy]
    texts = [t.replace(tokenizer.eos_token, "") for t in texts]
    items = [p.as_reward_item() for p in prompts]
    scored = reward_fn([p.prompt for p in prompts], texts, items)
    accuracy = scored.components["accuracy"]

    maj = 0.0
    if k > 1:
        sampled = engine.generate(prompt_ids, n=k, temperature=temperature, top_p=1.0, max_tokens=max_tokens, stop_token_ids=stop)
        for i, prompt in enumerate(prompts):
            group = sampled[i * k : (i + 1) * k]
            group_texts = [tokenizer.decode(r.response_ids, skip_special_tokens=False) for r in group]
            answers = [extract_answer(t) for t in group_texts]
            votes = Counter(a for a in answers if a is not None)
            if not votes:
                continue
            winner = votes.most_common(1)[0][0]
            text = group_texts[answers.index(winner)]  # accuracy depends on the extracted answer only
            maj += float(reward_fn([prompt.prompt], [text], [items[i]]).components["accuracy"][0])
        maj /= len(prompts)

    lengths = [len(r.response_ids) for r in greedy]
    return EvalResult(
        accuracy=float(accuracy.mean()),
        maj_accuracy=maj if k > 1 else float(accuracy.mean()),
        format_rate=sum(format_reward(t, "strict") for t in texts) / len(texts),
        length_mean=sum(lengths) / len(lengths),
        samples=[{"question": p.question, "answer": p.answer, "response": t} for p, t in list(zip(prompts, texts))[:3]],
    )
