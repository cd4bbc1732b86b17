"""Prompts, templates, tokenizer and the tiny pretraining corpus.

Imports nothing from `train` or `rollout`: the trainer composes these pieces.
"""

from megatron_r1.data.prompts import PromptItem, PromptSampler, PromptSet, load_prompts
from megatron_r1.data.templates import TEMPLATES, render_prompt

__all__ = ["PromptItem", "PromptSampler", "PromptSet", "TEMPLATES", "load_prompts", "render_prompt"]
