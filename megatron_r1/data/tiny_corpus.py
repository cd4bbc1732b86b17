"""Pretraining text for the tiny base model of the CPU R1-Zero run.

R1-Zero only works if the base model can already, now and then, reason its way to an answer: RL
selects and strengthens behaviour the base has, it does not invent it. So the tiny base is
pretrained on R1-template text for reasoning-gym ``chain_sum`` where some completions show the
running sum inside ``<think>`` ("5 + 3 = 8, - 7 = 1, ...") and the rest answer directly
("<think> this is easy </think> <answer> 23 </answer>"). Directly answering a chain of 5-8 terms is
mostly guessing; the worked steps are nearly always right. Showing only worked steps for the first
half of pretraining, then annealing their share to 5 %, first teaches step-by-step addition, then
mostly direct answers: the base guesses (4-10 % right held out, greedy) and keeps the worked
behaviour as a rare mode (about 5 % of samples, most of them right), which GRPO then raises to the
accuracy of that mode (see README).

Languages (`data.languages`, `pretrain.cot_languages`, see `phrasebook.py`): each example's
question is posed in one of the prompt languages and its thought written in one of the CoT
languages, drawn independently, in words ("5 plus 3 makes 8", "5 加 3 得 8"): the language mixing
of R1-Zero that the language-consistency reward then corrects. Without CoT languages the worked
steps are symbols, in no language.

Seeds: a stream seed owns its own block of reasoning-gym item seeds (see `gym.py`), so the
pretraining stream (seed 10_000 by default) never generates the items of the RL prompts
(`DataConfig.train_seed` 1000) or the held-out prompts (`DataConfig.eval_seed` 2000). Different
items can still pose the same question by chance; pass `exclude_questions` (the eval questions) to
rule that out too.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator
from typing import Any

from megatron_r1.config import DataConfig
from megatron_r1.data.gym import gym_entry, make_gym_dataset
from megatron_r1.data.phrasebook import check_languages, direct_thought, localize_question, pick_language, worked_in_words
from megatron_r1.data.templates import render_prompt

PRETRAIN_SEED = 10_000  # default stream seed of the pretraining corpus (RL uses 1000 / 2000)
DIRECT_THOUGHT = "this is easy"
WORKED_TASKS = ("chain_sum",)  # tasks whose questions `worked_solution` can parse

_TOKEN = re.compile(r"\d+|\S")


def parse_chain(expression: str) -> tuple[int, list[tuple[str, int]]]:
    """Split a +/- chain into its first term and (operator, operand) steps.

    "5 + 3 - -2" -> (5, [("+", 3), ("-", -2)]). Any spacing and unary signs are accepted
    ("5-3", "5 - -3", "-5 + 3"); anything else is a ValueError.
    """
    tokens = _TOKEN.findall(expression)
    pos = 0

    def operand() -> int:
        nonlocal pos
        sign = 1
        while pos < len(tokens) and tokens[pos] in ("+", "-"):  # unary signs
            sign = -sign if tokens[pos] == "-" else sign
            pos += 1
        if pos == len(tokens) or not tokens[pos].isdigit():
            raise ValueError(f"expected a number in {expression!r}")
        pos += 1
        return sign * int(tokens[pos - 1])

    first = operand()
    steps = []
    while pos < len(tokens):
        op = tokens[pos]
        if op not in ("+", "-"):
            raise ValueError(f"expected + or - at {op!r} in {expression!r}")
        pos += 1
        steps.append((op, operand()))
    return first, steps


def _chain(entry: dict[str, Any]) -> tuple[int, list[tuple[str, int]]]:
    # The question reads "...arithmetic problem: 5 + 3 - 7 =": the chain sits between the last
    # colon and the final "=". The metadata copy is the fallback when the question does not parse.
    body = str(entry["question"]).strip().rsplit(":", 1)[-1].strip().removesuffix("=")
    try:
        return parse_chain(body)
    except ValueError:
        expression = (entry.get("metadata") or {}).get("expression")
        if not expression:
            raise
        return parse_chain(str(expression))


def running_totals(first: int, steps: list[tuple[str, int]]) -> list[int]:
    """The running sum after each step of a chain."""
    totals, total = [], first
    for op, operand in steps:
        total = total + operand if op == "+" else total - operand
        totals.append(total)
    return totals


def render_steps(first: int, steps: list[tuple[str, int]], totals: list[int], language: str | None = None) -> str:
    """Steps with the given running totals: "5 + 3 = 8, - 7 = 1" (symbols) or in `language`'s words."""
    if language is not None:
        return worked_in_words(first, steps, totals, language)
    lines = [f"{first} {op} {operand} = {total}" if i == 0 else f"{op} {operand} = {total}"  # operators kept as written
             for i, ((op, operand), total) in enumerate(zip(steps, totals))]
    return ", ".join(lines) if lines else str(first)


def worked_solution(entry: dict[str, Any], language: str | None = None) -> str:
    """The running sum of a chain_sum entry, one step per operator: "5 + 3 = 8, - 7 = 1, + 4 = 5".

    Each later step starts with its operator, not with a copy of the running total: the token after
    ", " then only has to find the next operator in the question, which the 2-layer tiny model learns
    reliably (greedy held-out accuracy 98.5 % after 2,500 steps of worked-only text). Written as
    "8 - 7 = 1, 1 + 4 = 5" it must predict the operator right after a digit it has just copied, and
    with everything else equal it copied the operators badly (14 %).

    With a `language` the steps are written in its words instead ("5 plus 3 makes 8, minus 7 makes 1").

    The final value is checked against the entry's answer, so a parsing slip can never teach wrong
    arithmetic.
    """
    first, steps = _chain(entry)
    totals = running_totals(first, steps)
    _check_answer(entry, totals[-1] if totals else first)
    return render_steps(first, steps, totals, language)


def _check_answer(entry: dict[str, Any], total: int) -> None:
    if total != int(str(entry["answer"]).strip()):
        raise ValueError(f"worked solution gives {total}, entry answer is {entry['answer']!r}: {entry['question']!r}")


def direct_solution(entry: dict[str, Any], language: str | None = None) -> str:
    """The thought of a direct answer: no steps, just a confident guess (in `language`, English by default)."""
    return DIRECT_THOUGHT if language is None else direct_thought(language)


def completion(entry: dict[str, Any], worked: bool, language: str | None = None) -> str:
    """The assistant's text after "Assistant:" in R1 format, without end-of-sequence.

    " <think> 5 + 3 = 8, - 7 = 1 </think> <answer> 1 </answer>". The trainer appends the eos token id.
    With a `language`, the thought is written in its words (see `worked_solution`).
    """
    thought = worked_solution(entry, language) if worked else direct_solution(entry, language)
    return f" <think> {thought} </think> <answer> {str(entry['answer']).strip()} </answer>"


class CorpusStream:
    """`total_examples` (prompt_text, completion_text) pairs with an annealed share of worked solutions.

    Example i shows worked steps with probability `worked_share(i)`: `worked_share_start` for the
    first `worked_share_hold` fraction of the stream, then falling linearly to `worked_share_end`
    at the last example. Its question is posed in one of `languages` (empty: as the task writes
    it) and its thought written in one of `cot_languages` (empty: symbols), drawn independently.
    Every example is a pure function of (seed, i), so `examples(start=k)`
    resumes a stream exactly at example k.
    """

    def __init__(
        self,
        task: str = "chain_sum",
        task_options: dict[str, Any] | None = None,
        seed: int = PRETRAIN_SEED,
        worked_share_start: float = 1.0,
        worked_share_end: float = 0.05,
        total_examples: int = 100_000,
        worked_share_hold: float = 0.0,
        template: str = "r1_zero",
        exclude_questions: Iterable[str] = (),
        languages: Iterable[str] = (),
        cot_languages: Iterable[str] = (),
    ):
        for name, share in (("worked_share_start", worked_share_start), ("worked_share_end", worked_share_end)):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {share}")
        if not 0.0 <= worked_share_hold < 1.0:
            raise ValueError(f"worked_share_hold must be in [0, 1), got {worked_share_hold}")
        if (worked_share_start or worked_share_end) and task not in WORKED_TASKS:
            raise ValueError(f"worked solutions exist for {', '.join(WORKED_TASKS)} only; set the worked shares to 0")
        if total_examples < 1:
            raise ValueError(f"total_examples must be >= 1, got {total_examples}")
        self.task = task
        self.task_options = dict(DataConfig().task_options if task_options is None else task_options)
        self.seed = seed
        self.worked_share_start = worked_share_start
        self.worked_share_end = worked_share_end
        self.worked_share_hold = worked_share_hold
        self.total_examples = total_examples
        self.template = template
        self.exclude_questions = frozenset(exclude_questions)
        self.languages = check_languages(list(languages), "data.languages")
        self.cot_languages = check_languages(list(cot_languages), "pretrain.cot_languages")
        if (self.languages or self.cot_languages) and task not in WORKED_TASKS:
            raise ValueError(f"a corpus in several languages exists for {', '.join(WORKED_TASKS)} only")
        self.excluded = 0  # examples skipped because their question is in `exclude_questions`
        self._dataset = make_gym_dataset(task, self.task_options, seed, total_examples)

    def __len__(self) -> int:
        return self.total_examples

    def worked_share(self, i: int) -> float:
        """Probability that example i shows worked steps (held at start, then linear to end)."""
        frac = i / (self.total_examples - 1) if self.total_examples > 1 else 0.0
        frac = max(0.0, frac - self.worked_share_hold) / (1.0 - self.worked_share_hold)
        return self.worked_share_start + (self.worked_share_end - self.worked_share_start) * frac

    def is_worked(self, i: int) -> bool:
        # A string seed is hashed with SHA-512: stable across processes, unlike hash().
        return random.Random(f"corpus:{self.seed}:{i}").random() < self.worked_share(i)

    def entry(self, i: int) -> dict[str, Any]:
        return gym_entry(self._dataset, i)

    def question(self, i: int, entry: dict[str, Any]) -> str:
        """Example i's question, in its drawn language."""
        if not self.languages:
            return str(entry["question"])
        return localize_question(str(entry["question"]), pick_language(self.languages, "prompt", self.seed, i))

    def cot_language(self, i: int) -> str | None:
        """The language example i thinks in (None: symbols)."""
        return pick_language(self.cot_languages, "cot", self.seed, i) if self.cot_languages else None

    def example(self, i: int) -> tuple[str, str]:
        """(prompt_text, completion_text) of example i."""
        entry = self.entry(i)
        return render_prompt(self.template, self.question(i, entry)), completion(entry, self.is_worked(i), self.cot_language(i))

    def examples(self, start: int = 0) -> Iterator[tuple[str, str]]:
        """Examples start, start+1, ... to the end, minus excluded questions."""
        for i in range(start, self.total_examples):
            entry = self.entry(i)
            question = self.question(i, entry)
            if entry["question"] in self.exclude_questions or question in self.exclude_questions:
                self.excluded += 1
                continue
            yield render_prompt(self.template, question), completion(entry, self.is_worked(i), self.cot_language(i))

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return self.examples()


def tokenizer_training_texts(
    n: int,
    seed: int = PRETRAIN_SEED,
    task_options: dict[str, Any] | None = None,
    languages: Iterable[str] = (),
    cot_languages: Iterable[str] = (),
) -> list[str]:
    """`n` full texts (prompt + completion), half of them worked, to train the tokenizer's merges on."""
    stream = CorpusStream("chain_sum", task_options, seed, 0.5, 0.5, n, languages=languages, cot_languages=cot_languages)
    return [prompt + comp for prompt, comp in stream]
