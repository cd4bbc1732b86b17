"""Preference pairs for the reward model: a prompt, a chosen and a rejected response.

From a jsonl file, one pair per line: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (``question``
is accepted for ``prompt``; an optional ``kind`` labels the pair for per-kind accuracy). Malformed
rows are skipped and counted by reason, never fatal.

Or synthetic, for the tiny chain_sum setting (`synthetic_pairs`): the chosen response is a correct,
well-formed worked solution in the question's language; the rejected one differs from it in one
property a good reward model must notice, so held-out accuracy per kind says what it learned:

* ``wrong_answer``: the same worked steps with one arithmetic slip carried to a wrong answer;
* ``guess``: no steps, a wrong direct answer;
* ``wrong_language``: correct steps in another language than the question's (with two or more languages);
* ``bad_format``: the correct solution without its ``</think>`` tag.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_r1.data.gym import gym_entry, make_gym_dataset
from megatron_r1.data.phrasebook import check_languages, localize_question, pick_language
from megatron_r1.data.tiny_corpus import _chain, direct_solution, render_steps, running_totals, worked_solution

PAIR_KINDS = ("wrong_answer", "guess", "wrong_language", "bad_format")


@dataclass
class PreferencePair:
    prompt: str  # the question (the template is applied when tokenizing)
    chosen: str
    rejected: str
    kind: str = "user"  # what distinguishes them (synthetic kinds above, "user" for file rows without one)


def load_preferences(path: str | Path) -> tuple[list[PreferencePair], Counter]:
    """Pairs from a jsonl file, and the skipped rows by reason."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"no preference file {str(path)!r}; give reward_model.train_path a jsonl of prompt/chosen/rejected rows")
    pairs: list[PreferencePair] = []
    skipped: Counter = Counter()
    with p.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped["bad_json"] += 1
                continue
            pair, reason = _pair(row)
            if pair is None:
                skipped[reason] += 1
            else:
                pairs.append(pair)
    return pairs, skipped


def _pair(row: Any) -> tuple[PreferencePair | None, str]:
    if not isinstance(row, dict):
        return None, "not_an_object"
    prompt = row.get("prompt", row.get("question"))
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not all(isinstance(x, str) and x.strip() for x in (prompt, chosen, rejected)):
        return None, "missing_prompt_chosen_or_rejected"
    if chosen.strip() == rejected.strip():
        return None, "chosen_equals_rejected"
    kind = row.get("kind") if isinstance(row.get("kind"), str) else "user"
    return PreferencePair(prompt, chosen, rejected, kind), ""


def _answer_block(thought: str, answer: Any) -> str:
    return f" <think> {thought} </think> <answer> {answer} </answer>"


def _slipped_steps(entry: dict[str, Any], language: str | None, rng: random.Random) -> tuple[str, int]:
    """Worked steps with one running total off by 1-3, carried on to the end: (thought, wrong answer)."""
    first, steps = _chain(entry)
    slip_at, slip = rng.randrange(len(steps)), rng.choice([-3, -2, -1, 1, 2, 3])
    totals = [t + slip if i >= slip_at else t for i, t in enumerate(running_totals(first, steps))]
    return render_steps(first, steps, totals, language), totals[-1]


def synthetic_pairs(
    n: int,
    seed: int,
    task_options: dict[str, Any],
    languages: list[str] | tuple[str, ...] = (),
    cot_in_words: bool = False,
) -> list[PreferencePair]:
    """`n` chain_sum preference pairs from stream `seed` (its own reasoning-gym items), kinds in turn.

    Questions are posed in `languages` (drawn per item as prompts are); worked steps are written in
    the question's language when `cot_in_words` (else in symbols, and no ``wrong_language`` pairs).
    """
    languages = check_languages(list(languages), "data.languages")
    kinds = [k for k in PAIR_KINDS if k != "wrong_language" or (cot_in_words and len(languages) > 1)]
    dataset = make_gym_dataset("chain_sum", task_options, seed, n)
    rng = random.Random(f"preferences:{seed}")
    pairs = []
    for i in range(n):
        entry = gym_entry(dataset, i)
        language = pick_language(languages, "prompt", seed, i) if languages else None
        question = localize_question(str(entry["question"]), language) if language else str(entry["question"])
        cot_language = language if cot_in_words else None
        answer = str(entry["answer"]).strip()
        chosen = _answer_block(worked_solution(entry, cot_language), answer)
        kind = kinds[i % len(kinds)]
        if kind == "wrong_answer":
            thought, wrong = _slipped_steps(entry, cot_language, rng)
            rejected = _answer_block(thought, wrong)
        elif kind == "guess":
            wrong = int(answer) + rng.choice([-1, 1]) * rng.randint(1, 9)
            rejected = _answer_block(direct_solution(entry, cot_language), wrong)
        elif kind == "wrong_language":
            other = next(lang for lang in languages if lang != language)
            rejected = _answer_block(worked_solution(entry, other), answer)
        else:  # bad_format
            rejected = chosen.replace(" </think>", "", 1)
        pairs.append(PreferencePair(question, chosen, rejected, kind))
    return pairs
