"""Format reward for the R1 response layout ``<think> reasoning </think> <answer> final </answer>``.

The prompt ends with "Assistant:" and the model writes ``<think>`` itself, so the response is
checked from its first character. (A template that pre-fills ``<think>`` in the prompt should
prepend it to the response before scoring.)

Four properties, each worth 0.25 in ``soft`` mode:

1. ``think``:  exactly one ``<think>`` and one ``</think>``, in that order.
2. ``answer``: exactly one ``<answer>`` and one ``</answer>``, in that order, non-empty between.
3. ``order``:  the think block closes before the answer block opens.
4. ``clean``:  nothing but whitespace before ``<think>``, between ``</think>`` and ``<answer>``,
   and after ``</answer>``.

``strict`` gives 1.0 exactly when all four hold (the whole response is the two blocks and
whitespace) and 0.0 otherwise; so ``soft == 1.0`` if and only if ``strict == 1.0``. Soft mode
helps a base model that has never seen the tags get a gradient toward them early in R1-Zero.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
FORMAT_MODES = ("strict", "soft")


def format_properties(text: str) -> dict[str, bool]:
    """The four properties above, for diagnostics and for `format_reward`."""
    counts = {tag: text.count(tag) for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)}
    t_open, t_close = text.find(THINK_OPEN), text.find(THINK_CLOSE)
    a_open, a_close = text.find(ANSWER_OPEN), text.find(ANSWER_CLOSE)

    think = counts[THINK_OPEN] == 1 and counts[THINK_CLOSE] == 1 and t_open < t_close
    answer = (
        counts[ANSWER_OPEN] == 1
        and counts[ANSWER_CLOSE] == 1
        and a_open < a_close
        and text[a_open + len(ANSWER_OPEN) : a_close].strip() != ""
    )
    all_present = min(t_open, t_close, a_open, a_close) >= 0
    order = all_present and text.rfind(THINK_CLOSE) < a_open
    stripped = text.strip()
    clean = (
        order
        and stripped.startswith(THINK_OPEN)
        and stripped.endswith(ANSWER_CLOSE)
        and text[t_close + len(THINK_CLOSE) : a_open].strip() == ""
    )
    return {"think": think, "answer": answer, "order": order, "clean": clean}


def format_reward(text: str, mode: str = "strict") -> float:
    """1.0/0.0 in ``strict`` mode; 0.25 per satisfied property in ``soft`` mode (module docstring)."""
    props = format_properties(text)
    if mode == "strict":
        return 1.0 if all(props.values()) else 0.0
    if mode == "soft":
        return 0.25 * sum(props.values())
    raise ValueError(f"format mode {mode!r} is not one of: {', '.join(FORMAT_MODES)}")


def extract_think(text: str) -> str | None:
    """The chain of thought: text between the first ``<think>`` and the first ``</think>`` after it.

    Without ``<think>`` but with ``</think>`` (a template that pre-fills the opening tag), the
    text before ``</think>``. ``None`` when there is no ``</think>``.
    """
    start = text.find(THINK_OPEN)
    begin = 0 if start < 0 else start + len(THINK_OPEN)
    end = text.find(THINK_CLOSE, begin)
    if end < 0:
        return None
    return text[begin:end].strip()
