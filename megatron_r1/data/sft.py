"""Supervised fine-tuning data: conversations -> token ids with a response-only loss mask -> packed rows.

A jsonl file holds one conversation per line, in either form:

* ``{"prompt": "...", "response": "..."}``: one user turn and the assistant's answer;
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``: the chat form;
  every assistant turn is trained on.

How a conversation becomes text (`SFTConfig.template`):

* ``chat``: the tokenizer's own chat template (`apply_chat_template`), as the model will be prompted
  after training. Each assistant turn's tokens are found by rendering the conversation up to the
  turn with the generation prompt and then including it; a template that rewrites earlier turns
  (some drop past reasoning) breaks that prefix property and its rows are skipped and counted.
* ``r1_zero`` / ``plain``: a single user turn wrapped in the prompt template of `data/templates.py`
  (what the R1-Zero stage prompts with), the response after it, then the end-of-sequence token.
  The loss covers the response and its end-of-sequence token: the model learns to stop.
* ``auto``: ``chat`` when the tokenizer has a chat template, else ``r1_zero``.

Malformed rows (not JSON, missing fields, empty response, unsupported roles) and conversations longer
than `max_seq_len` are skipped, counted by reason and reported; they never stop the run. Truncating
a long conversation would teach the model to stop mid-answer, so it is dropped instead.

Packing puts several conversations into one row of `max_seq_len` tokens (first fit, in a seeded
shuffled order, so a row's documents are a fair sample); `segment_ids` numbers the documents of a row
and the training step turns it into per-document causal attention (`train.step.packed_attention`).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_r1.data.templates import TEMPLATES, render_prompt

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One tokenized conversation: ids and a token-aligned mask (1 on the tokens trained on)."""

    ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class SFTDataset:
    examples: list[Example]
    skipped: Counter = field(default_factory=Counter)  # reason -> rows skipped
    rows: int = 0  # rows read

    @property
    def response_tokens(self) -> int:
        return sum(sum(e.loss_mask) for e in self.examples)


class SFTDataError(ValueError):
    """A dataset the run cannot use at all (missing file, nothing usable); one line naming the fix."""


def resolve_template(template: str, tokenizer: Any) -> str:
    """``auto`` -> ``chat`` if the tokenizer has a chat template, else ``r1_zero``."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "r1_zero"
    if template == "chat" and not has_chat:
        raise SFTDataError("sft.template=chat but the tokenizer has no chat template; use sft.template=r1_zero or plain")
    if template != "chat" and template not in TEMPLATES:
        raise SFTDataError(f"unknown sft.template {template!r}; valid: auto, chat, {', '.join(sorted(TEMPLATES))}")
    return template


def _messages(row: Any) -> tuple[list[dict[str, str]] | None, str]:
    """The row as a list of chat messages, or (None, reason)."""
    if not isinstance(row, dict):
        return None, "not_an_object"
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return None, "bad_messages"
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return None, "bad_messages"
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            return None, "no_final_assistant_turn"
        return messages, ""
    prompt, response = row.get("prompt", row.get("question")), row.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        return None, "missing_prompt_or_response"
    if not response.strip():
        return None, "empty_response"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], ""


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def encode_conversation(messages: list[dict[str, str]], tokenizer: Any, template: str) -> tuple[Example | None, str]:
    """Token ids and the response-only mask of one conversation, or (None, reason)."""
    if template == "chat":
        ids: list[int] = []
        mask: list[int] = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = _chat_ids(tokenizer, messages[:i], generation_prompt=True)
            full = _chat_ids(tokenizer, messages[: i + 1], generation_prompt=False)
            if full[: len(prefix)] != prefix or prefix[: len(ids)] != ids:
                return None, "chat_template_not_prefix_stable"
            mask += [0] * (len(prefix) - len(ids)) + [1] * (len(full) - len(prefix))
            ids = full
        return Example(ids, mask), ""
    # A prompt template: one user turn (a system message cannot be expressed), the response, eos.
    if [m["role"] for m in messages] != ["user", "assistant"]:
        return None, "multi_turn_needs_chat_template"
    prompt_ids = tokenizer.encode(render_prompt(template, messages[0]["content"]))  # BOS as the tokenizer defines it
    response = messages[1]["content"]
    if not response.startswith((" ", "\n")):
        response = " " + response  # the templates end at "Assistant:"; the completion starts with a space
    response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    return Example(prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)), ""


def load_sft_dataset(path: str | Path, tokenizer: Any, template: str, max_seq_len: int) -> SFTDataset:
    """Every usable conversation of a jsonl file, tokenized; the rest skipped and counted."""
    p = Path(path)
    if not str(path):
        raise SFTDataError("sft.train_path is empty: name a jsonl file of conversations")
    if not p.is_file():
        raise SFTDataError(f"SFT data file not found: {p} (check sft.train_path / sft.eval_path)")
    template = resolve_template(template, tokenizer)
    data = SFTDataset(examples=[])
    with open(p) as f:
        for line in f:
            if not line.strip():
                continue
            data.rows += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                data.skipped["not_json"] += 1
                continue
            messages, reason = _messages(row)
            if messages is None:
                data.skipped[reason] += 1
                continue
            example, reason = encode_conversation(messages, tokenizer, template)
            if example is None:
                data.skipped[reason] += 1
            elif len(example) > max_seq_len:
                data.skipped["longer_than_max_seq_len"] += 1
            elif not any(example.loss_mask):
                data.skipped["no_response_tokens"] += 1
            else:
                data.examples.append(example)
    if not data.examples:
        reasons = ", ".join(f"{k}: {v}" for k, v in data.skipped.most_common()) or "the file is empty"
        raise SFTDataError(f"no usable conversation in {p} ({data.rows} rows; skipped {reasons})")
    return data


# --------------------------------------------------------------------------------------------
# Rows and batches.


@dataclass
class Row:
    """One training row: one conversation, or several packed (`segments` numbers them from 1)."""

    ids: list[int]
    loss_mask: list[int]
    segments: list[int]


def pack(examples: list[Example], max_seq_len: int) -> list[Row]:
    """First-fit packing into rows of at most `max_seq_len` tokens, documents kept whole and in order
    within a row. Deterministic for a given input order."""
    rows: list[Row] = []
    room: list[int] = []  # free tokens per row
    for ex in examples:
        for i, free in enumerate(room):
            if len(ex) <= free:
                break
        else:
            rows.append(Row([], [], []))
            room.append(max_seq_len)
            i = len(rows) - 1
        row = rows[i]
        doc = (row.segments[-1] if row.segments else 0) + 1
        row.ids += ex.ids
        row.loss_mask += ex.loss_mask
        row.segments += [doc] * len(ex)
        room[i] -= len(ex)
    return rows


def unpacked(examples: list[Example]) -> list[Row]:
    return [Row(list(e.ids), list(e.loss_mask), [1] * len(e)) for e in examples]


def epoch_rows(examples: list[Example], epoch: int, seed: int, max_seq_len: int, packing: bool) -> list[Row]:
    """The rows of one epoch: the examples in a seeded shuffled order, packed or one per row."""
    order = list(range(len(examples)))
    random.Random(f"sft:{seed}:{epoch}").shuffle(order)
    shuffled = [examples[i] for i in order]
    return pack(shuffled, max_seq_len) if packing else unpacked(shuffled)

