"""Prompt templates: the text a question is wrapped in before the policy sees it.

``r1_zero`` is the template of the DeepSeek-R1 paper (Table 1), used to train R1-Zero from a base
model: it asks for the reasoning inside ``<think> </think>`` and the answer inside
``<answer> </answer>``, and it ends at ``Assistant:`` so the completion starts right after it.
"""

from __future__ import annotations

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {question}. Assistant:"
)

TEMPLATES: dict[str, str] = {
    "r1_zero": R1_ZERO_TEMPLATE,
    "plain": "{question}",  # the question as it is (chat templates are applied elsewhere)
}


def render_prompt(template_name: str, question: str) -> str:
    """Fill `question` into the template called `template_name`."""
    try:
        template = TEMPLATES[template_name]
    except KeyError:
        raise ValueError(
            f"unknown prompt template {template_name!r}; valid templates: {', '.join(sorted(TEMPLATES))}"
        ) from None
    # str.replace, not str.format: questions may contain braces ("{1, 2}") that format would parse.
    return template.replace("{question}", question)
