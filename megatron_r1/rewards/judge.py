"""Generative judge: a language model grades a response with a rubric prompt; the verdict is parsed.

DeepSeek-R1 judges general (non-verifiable) data with DeepSeek-V3 as a generative reward model. Here
the judge is a vLLM engine: by default the policy's own colocated engine (self-judging, as the final
RL stage's model grades its peers' answers), greedy, `reward.judge_max_tokens` tokens.

The verdict parser is deliberately forgiving about *where* the score is and strict about *what* it
is. It reads, last occurrence first: ``Score: 7`` / ``score = 7/10`` / ``Rating: 7.5``, ``[[7]]``,
``{"score": 7}``, a bare ``7/10``, or a verdict that is just a number ("8", answering the rubric's
final "Score:"). A number outside 0-10, no number, or an empty verdict is
*malformed*: the response gets the neutral score (0.5: no push either way) and is counted, so a
judge that does not follow the rubric shows up in the metrics instead of steering the policy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

RUBRIC = (
    "You are a strict grader. Read the question and the assistant's response, then rate the response "
    "from 0 (useless or wrong) to 10 (correct, clear and in the language of the question). "
    "Reply with one line of the form 'Score: N'.\n\n"
    "Question: {question}\n\nResponse: {response}\n\nScore:"
)
NEUTRAL = 0.5  # the score of a malformed verdict
MAX_SCORE = 10.0

_NUMBER = r"(-?\d+(?:\.\d+)?)"
_PATTERNS = (
    re.compile(r"(?:score|rating|grade)\s*(?:[:=]|is)?\s*\**\s*" + _NUMBER + r"(?:\s*/\s*(\d+))?", re.IGNORECASE),
    re.compile(r"\[\[\s*" + _NUMBER + r"\s*\]\]"),
    re.compile(_NUMBER + r"\s*/\s*(10|100)\b"),
)


def parse_verdict(text: str) -> float | None:
    """The verdict's score scaled to [0, 1], or None when the verdict is malformed (module docstring)."""
    if not isinstance(text, str) or not text.strip():
        return None
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            value = obj.get("score", obj.get("rating"))
            return _scaled(value, None) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    # A verdict that starts with the number answers the rubric's trailing "Score:" directly.
    # It must end the verdict or its line ("7", "7/10.", "8\nclear and correct"), not open a list of numbers.
    leading = re.match(_NUMBER + r"(?:\s*/\s*(\d+))?[ \t]*(?:$|\n|[.,;)])", stripped)
    candidates = []
    for pattern in _PATTERNS:
        candidates += [(m.start(), m.groups()) for m in pattern.finditer(stripped)]
    if candidates:
        _, groups = max(candidates, key=lambda c: c[0])  # the last statement wins ("7... no, Score: 5")
        return _scaled(groups[0], groups[1] if len(groups) > 1 else None)
    if leading:
        return _scaled(leading.group(1), leading.group(2))
    return None


def _scaled(value, denominator) -> float | None:
    try:
        score = float(value)
        scale = float(denominator) if denominator else MAX_SCORE
    except (TypeError, ValueError):
        return None
    if scale <= 0 or not 0.0 <= score <= scale:
        return None
    return score / scale


class Judge:
    """Scores responses with `generate(prompts) -> verdict texts` (a vLLM engine call) and `RUBRIC`."""

    def __init__(self, generate: Callable[[list[str]], list[str]], rubric: str = RUBRIC):
        if "{question}" not in rubric or "{response}" not in rubric:
            raise ValueError("a judge rubric needs {question} and {response} placeholders")
        self.generate = generate
        self.rubric = rubric

    def prompt(self, question: str, response: str) -> str:
        return self.rubric.replace("{question}", question).replace("{response}", response)

    def __call__(self, questions: Sequence[str], responses: Sequence[str]) -> tuple[list[float], int]:
        """(score in [0, 1] per response, number of malformed verdicts scored `NEUTRAL`)."""
        if not responses:
            return [], 0
        verdicts = self.generate([self.prompt(q, r) for q, r in zip(questions, responses)])
        scores, malformed = [], 0
        for verdict in verdicts:
            score = parse_verdict(verdict)
            malformed += score is None
            scores.append(NEUTRAL if score is None else score)
        return scores, malformed
