"""The tiny setting in more than one language: chain_sum questions and worked steps in English or Chinese.

DeepSeek-R1-Zero's chains of thought mix languages, which is why R1's reasoning RL adds a language-
consistency reward. The tiny setting reproduces that: with `data.languages` set, each prompt is
posed in one of them, and with `pretrain.cot_languages` set, the base model's corpus writes each
worked solution in a language drawn independently of the question's, in words rather than symbols:

    en  "5 plus 3 makes 8, minus 7 makes 1"
    zh  "5 加 3 得 8，减 7 得 1"

So the base (and R1-Zero after it) answers a Chinese question in English half of the time; only a
reward for writing in the question's language makes the choice follow the question (README).

Which language a prompt or example gets is a pure function of (purpose, seed, index): stable across
processes and runs, and independent between prompts and chains of thought.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

# Per language: the instruction before the expression, the operator words, the "equals" word,
# the separator between steps, and the thought of a direct answer.
PHRASES: dict[str, dict[str, str]] = {
    "en": {
        "question": "State the final answer to the following arithmetic problem: {expression} =",
        "+": "plus",
        "-": "minus",
        "=": "makes",
        "sep": ", ",
        "direct": "this is easy",
        "summary": "{thought}, the final answer: {answer}",
    },
    "zh": {
        "question": "请给出下面算式的最终结果：{expression} =",
        "+": "加",
        "-": "减",
        "=": "得",
        "sep": "，",
        "direct": "这很简单",
        "summary": "{thought}，最终结果：{answer}",
    },
}
LANGUAGES = tuple(PHRASES)
LOCALIZABLE_TASKS = ("chain_sum",)  # tasks whose questions `localize_question` can pose in another language


def check_languages(languages: Sequence[str], field: str) -> tuple[str, ...]:
    """`languages` as a tuple, or ValueError naming the ones the phrasebook lacks."""
    unknown = [lang for lang in languages if lang not in PHRASES]
    if unknown:
        raise ValueError(f"{field}: no phrases for {', '.join(unknown)}; available: {', '.join(LANGUAGES)}")
    return tuple(languages)


def pick_language(languages: Sequence[str], purpose: str, seed: int, index: int) -> str:
    """One of `languages` for item `index` of stream `seed`, drawn for `purpose` ("prompt", "cot")."""
    if len(languages) == 1:
        return languages[0]
    # A string seed is hashed with SHA-512 by `random`: stable across processes, unlike hash().
    return languages[random.Random(f"{purpose}:{seed}:{index}").randrange(len(languages))]


def chain_expression(question: str) -> str:
    """The arithmetic of a chain_sum question: "... problem: 5 + 3 - 7 =" -> "5 + 3 - 7"."""
    return question.strip().rsplit(":", 1)[-1].rsplit("：", 1)[-1].strip().removesuffix("=").strip()


def localize_question(question: str, language: str) -> str:
    """The chain_sum `question` posed in `language` (English questions are returned as they are)."""
    if language == "en":
        return question
    return PHRASES[language]["question"].replace("{expression}", chain_expression(question))


def worked_in_words(first: int, steps: Sequence[tuple[str, int]], totals: Sequence[int], language: str) -> str:
    """The running sum in words: "5 plus 3 makes 8, minus 7 makes 1" (en), "5 加 3 得 8，减 7 得 1" (zh).
    `totals[i]` is written after step i (the caller computes them, and may get them wrong on purpose)."""
    p = PHRASES[language]
    parts = [f"{first} {p[op]} {operand} {p['=']} {total}" if i == 0 else f"{p[op]} {operand} {p['=']} {total}"
             for i, ((op, operand), total) in enumerate(zip(steps, totals))]
    return p["sep"].join(parts) if parts else str(first)


def direct_thought(language: str) -> str:
    return PHRASES[language]["direct"]


def with_summary(thought: str, answer: str, language: str) -> str | None:
    """The thought followed by a summary in `language` ("..., the final answer: 1"): the readable
    pattern of R1's cold-start data. The words are the questions' own ("final answer", "最终结果"),
    which the tiny tokenizer already has. None when the phrasebook has no summary for `language`."""
    phrases = PHRASES.get(language)
    if phrases is None:
        return None
    return phrases["summary"].replace("{thought}", thought.rstrip(" .。,，")).replace("{answer}", answer)
