"""Custom rewards for `reward.custom`: plain functions `fn(prompt, response, item) -> float`.

`prompt` is the rendered prompt, `response` the generated text (special tokens such as <think>
included), `item` the prompt's row: {"question", "answer", "entry" (the reasoning-gym entry or None),
"language"}. The trainer calls each function once per sample, under `reward.timeout_s`; a call
that raises, times out or returns a non-finite number scores 0 and is counted in
`reward/failures`, so a bug here does not stop a run. Each function's score is logged unweighted as
`reward/<module>:<function>` and added to the reward with the weight given in `reward.custom`.
"""

from __future__ import annotations

from megatron_r1.rewards.accuracy import extract_answer


def _as_int(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def closeness(prompt: str, response: str, item: dict) -> float:
    """Partial credit for numeric answers near the reference: 1 / (1 + |answer - reference|).

    Accuracy gives 0 to a near miss and to a wild guess alike; this tells them apart, a denser
    signal in the groups where no sample is right. 0 when either side is not an integer.
    """
    answer, reference = _as_int(extract_answer(response)), _as_int(str(item.get("answer", "")))
    if answer is None or reference is None:
        return 0.0
    return 1.0 / (1.0 + abs(answer - reference))


def brevity(prompt: str, response: str, item: dict, budget_words: int = 40) -> float:
    """1 for responses up to `budget_words` words, falling linearly to 0 at twice that.

    A length penalty pulls against what R1-Zero learns here (longer, worked answers), so give it a
    small weight, if any.
    """
    words = len(response.split())
    return max(0.0, min(1.0, 2.0 - words / budget_words))
