"""RL prompts: loading them (reasoning-gym tasks or jsonl files) and sampling batches of them.

Rows that cannot be used are skipped and counted, never fatal: a run over 100k prompts should not
die on line 73,912. The counts are logged once per load as one warning line and kept on the
`PromptSet` for the run summary.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from megatron_r1.config import ConfigError, DataConfig
from megatron_r1.data.gym import gym_entry, make_gym_dataset
from megatron_r1.data.humaneval import TASK as HUMANEVAL_TASK
from megatron_r1.data.humaneval import humaneval_rows
from megatron_r1.data.phrasebook import LOCALIZABLE_TASKS, check_languages, localize_question, pick_language
from megatron_r1.data.templates import render_prompt

logger = logging.getLogger(__name__)

SPLITS = ("train", "eval")


@dataclass
class PromptItem:
    """One prompt, with what the reward functions need to score answers to it."""

    prompt: str  # the rendered prompt (template + question)
    question: str  # the question alone
    answer: str  # the reference answer
    entry: dict[str, Any] | None  # the reasoning-gym entry (for its score_answer), None for jsonl
    index: int  # position in the source: reasoning-gym item index or 0-based jsonl line number
    prompt_ids: list[int] | None = None  # token ids of `prompt` when loaded with a tokenizer
    language: str | None = None  # the language the question is posed in, when known (else detected)
    source: str = "reasoning"  # reasoning: rule rewards | general: scored by the reward model or judge

    def as_reward_item(self) -> dict[str, Any]:
        """The view the reward functions take."""
        return {"question": self.question, "answer": self.answer, "entry": self.entry, "language": self.language}


@dataclass
class PromptSet:
    """The usable prompts of one split, and what was skipped on the way."""

    split: str
    items: list[PromptItem]
    skip_reasons: Counter = field(default_factory=Counter)  # reason -> rows skipped

    @property
    def skipped(self) -> int:
        return sum(self.skip_reasons.values())

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> PromptItem:
        return self.items[i]

    def __iter__(self) -> Iterator[PromptItem]:
        return iter(self.items)


def load_prompts(data_cfg: DataConfig, split: str, tokenizer: Any = None) -> PromptSet:
    """Load the `split` ("train" | "eval") prompts that `data_cfg` describes.

    With a Hugging Face `tokenizer`, prompts longer than `data_cfg.max_prompt_tokens` tokens are
    skipped and each kept item carries its `prompt_ids`. Evaluation questions that also occur in
    the training split are dropped (counted as "in_train"), so held-out scores are held out.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if data_cfg.source == "reasoning_gym":
        rows, reasons = _task_rows(data_cfg, split), Counter()
    else:  # "jsonl" (the config loader accepts these two only)
        rows, reasons = _jsonl_rows(_jsonl_path(data_cfg, split))

    if split == "eval":
        train_questions = _train_questions(data_cfg)
        kept = [r for r in rows if r[1] not in train_questions]
        if len(kept) < len(rows):
            reasons["in_train"] += len(rows) - len(kept)
        rows = kept

    items = [
        PromptItem(prompt=render_prompt(data_cfg.template, q), question=q, answer=a, entry=e, index=i, language=lang)
        for i, q, a, e, lang in rows
    ]
    if tokenizer is not None:
        items = _fit_to_length(items, tokenizer, data_cfg.max_prompt_tokens, reasons)

    prompts = PromptSet(split=split, items=items, skip_reasons=reasons)
    if prompts.skipped:
        detail = ", ".join(f"{k}: {v}" for k, v in reasons.most_common())
        logger.warning("%s prompts: kept %d, skipped %d (%s)", split, len(items), prompts.skipped, detail)
    if not items:
        raise _no_prompts(split, reasons, data_cfg)
    return prompts


def load_general_prompts(data_cfg: DataConfig, tokenizer: Any = None) -> PromptSet:
    """The general prompts of the final RL stage (`data.general_path`, else `data.general_task`):
    scored by a reward model or judge, not by rules. Rows need no answer; a reference answer or a
    reasoning-gym entry, when there is one, is only used to report how right the responses are."""
    if data_cfg.general_path:
        path = Path(data_cfg.general_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data.general_path: no such file {data_cfg.general_path!r}")
        rows, reasons = _jsonl_rows(path, answer_required=False)
    elif data_cfg.general_task:
        if data_cfg.general_seed in (data_cfg.train_seed, data_cfg.eval_seed):
            raise ConfigError("data.general_seed must differ from data.train_seed and data.eval_seed")
        general = replace(data_cfg, task=data_cfg.general_task, task_options=data_cfg.general_task_options,
                          train_seed=data_cfg.general_seed, train_size=data_cfg.general_size,
                          languages=data_cfg.languages if data_cfg.general_task in LOCALIZABLE_TASKS else [])
        rows, reasons = _gym_rows(general, "train"), Counter()
    else:
        raise ConfigError("data.general_share > 0 needs general prompts: set data.general_path (jsonl) or data.general_task")
    items = [
        PromptItem(prompt=render_prompt(data_cfg.template, q), question=q, answer=a, entry=e, index=i, language=lang, source="general")
        for i, q, a, e, lang in rows
    ]
    if tokenizer is not None:
        items = _fit_to_length(items, tokenizer, data_cfg.max_prompt_tokens, reasons)
    prompts = PromptSet(split="general", items=items, skip_reasons=reasons)
    if prompts.skipped:
        detail = ", ".join(f"{k}: {v}" for k, v in reasons.most_common())
        logger.warning("general prompts: kept %d, skipped %d (%s)", len(items), prompts.skipped, detail)
    if not items:
        raise _no_prompts("general", reasons, data_cfg)
    return prompts


def hold_out_general(general: PromptSet, n: int) -> tuple[PromptSet, PromptSet | None]:
    """(training, held-out) general prompts: the first `n` are kept out of training, so the final RL
    stage can measure its own target (the general scorer's mean on greedy responses) on prompts it
    never saw. `n` = 0: no held-out set."""
    if n < 0:
        raise ConfigError(f"data.general_eval_size must be >= 0 (0: no held-out general prompts), got {n}")
    if n == 0:
        return general, None
    if n >= len(general.items):
        raise ConfigError(f"data.general_eval_size={n} leaves no general prompt to train on ({len(general.items)} usable); "
                          "lower it or add general prompts (data.general_size / data.general_path)")
    return (PromptSet("general", general.items[n:], general.skip_reasons),
            PromptSet("general_eval", general.items[:n]))


# Why rows were skipped -> the setting that decides it.
_SKIP_FIXES = {
    "too_long": "raise data.max_prompt_tokens (now {max_prompt_tokens}) or shorten the prompts",
    "in_train": "every held-out question is also a training question: use another data.eval_seed or data.eval_path",
}


def _no_prompts(split: str, reasons: Counter, data_cfg: DataConfig) -> ConfigError:
    """One line: no prompt of `split` survived, the counts by reason, and what to change."""
    if not reasons:
        size = {"train": "train_size", "eval": "eval_size", "general": "general_size"}[split]
        return ConfigError(f"no usable {split} prompts: the source gave none; check data.source / the file / data.{size}")
    counts = ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common())
    fixes = [_SKIP_FIXES[r].format(max_prompt_tokens=data_cfg.max_prompt_tokens) for r, _ in reasons.most_common() if r in _SKIP_FIXES]
    if set(reasons) - set(_SKIP_FIXES):
        fixes.append("fix the rows of the jsonl file (each needs a \"question\" or \"prompt\" string and an \"answer\")")
    return ConfigError(f"no usable {split} prompts (skipped {counts}); {'; '.join(fixes)}")


# A row is (index, question, answer, entry, language) once validated.
_Row = tuple[int, str, str, dict[str, Any] | None, str | None]


def _task_rows(data_cfg: DataConfig, split: str) -> list[_Row]:
    """Rows of `data.task`: a reasoning-gym dataset, or a task built in here (humaneval: code
    problems with a fixed split, data/humaneval.py)."""
    if data_cfg.task == HUMANEVAL_TASK:
        if data_cfg.languages:
            raise ValueError("data.languages: humaneval exists in English only; set data.languages=[]")
        return humaneval_rows(split)
    return _gym_rows(data_cfg, split)


def _gym_rows(data_cfg: DataConfig, split: str) -> list[_Row]:
    seed = data_cfg.train_seed if split == "train" else data_cfg.eval_seed
    size = data_cfg.train_size if split == "train" else data_cfg.eval_size
    if data_cfg.train_seed == data_cfg.eval_seed:
        raise ValueError("data.train_seed and data.eval_seed must differ (the eval prompts would be training prompts)")
    languages = check_languages(data_cfg.languages, "data.languages")
    if languages and data_cfg.task not in LOCALIZABLE_TASKS:
        raise ValueError(f"data.languages: questions of {data_cfg.task!r} exist in English only ({', '.join(LOCALIZABLE_TASKS)} can be posed in others); set data.languages=[]")
    dataset = make_gym_dataset(data_cfg.task, data_cfg.task_options, seed, size)
    rows = []
    for i in range(size):
        entry = gym_entry(dataset, i)
        question, language = str(entry["question"]), None
        if languages:
            language = pick_language(languages, "prompt", seed, i)
            question = localize_question(question, language)
        rows.append((i, question, str(entry["answer"]), entry, language))
    return rows


def _jsonl_path(data_cfg: DataConfig, split: str) -> Path:
    key = "train_path" if split == "train" else "eval_path"
    raw = getattr(data_cfg, key)
    if not raw:
        raise FileNotFoundError(f"data.{key} is empty; with data.source=jsonl set it to a .jsonl file")
    path = Path(raw).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.{key}: no such file {raw!r}; fix the path or set data.source=reasoning_gym")
    return path


def _jsonl_rows(path: Path, answer_required: bool = True) -> tuple[list[_Row], Counter]:
    """Rows `{"question" | "prompt": str, "answer": str | number}`; anything else is counted and skipped."""
    rows: list[_Row] = []
    reasons: Counter = Counter()
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue  # blank lines (often a trailing newline) are not rows
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                reasons["bad_json"] += 1
                continue
            if not answer_required and isinstance(obj, dict) and obj.get("answer") is None:
                obj = {**obj, "answer": ""}
            row, reason = _validate_row(obj, line_no)
            if row is None:
                reasons[reason] += 1
            else:
                rows.append(row)
    return rows, reasons


def _validate_row(obj: Any, line_no: int) -> tuple[_Row | None, str]:
    # An optional "language" (ISO 639-1) says which language the answer should think in.
    if not isinstance(obj, dict):
        return None, "not_an_object"
    question = obj.get("question", obj.get("prompt"))  # "prompt" is accepted as the question text
    if question is None:
        return None, "missing_question"
    if not isinstance(question, str) or not question.strip():
        return None, "bad_question"
    answer = obj.get("answer")
    if answer is None:
        return None, "missing_answer"
    # Numbers are fine as answers (json files often store 42, not "42"); bools and containers are not.
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return None, "bad_answer"
    language = obj.get("language")
    if language is not None and (not isinstance(language, str) or not language.strip()):
        return None, "bad_language"
    return (line_no, question, str(answer), None, language.strip().lower() if language else None), ""


def _train_questions(data_cfg: DataConfig) -> set[str]:
    """Questions of the training split, to keep the evaluation split disjoint from it."""
    if data_cfg.source == "reasoning_gym":
        return {row[1] for row in _task_rows(data_cfg, "train")}
    if data_cfg.train_path and Path(data_cfg.train_path).expanduser().is_file():
        return {row[1] for row in _jsonl_rows(Path(data_cfg.train_path).expanduser())[0]}
    return set()  # evaluating on a file alone: nothing to compare against


def _fit_to_length(items: list[PromptItem], tokenizer: Any, max_tokens: int, reasons: Counter) -> list[PromptItem]:
    # One batched call: a fast tokenizer encodes 20k prompts in well under a second this way.
    # Special tokens as the tokenizer defines them: the BOS that Llama / DeepSeek base models expect.
    if not items:  # a fast tokenizer fails on an empty batch; the caller reports "no usable prompts"
        return []
    ids = tokenizer([it.prompt for it in items])["input_ids"]
    kept = []
    for item, item_ids in zip(items, ids):
        if len(item_ids) > max_tokens:
            reasons["too_long"] += 1
            continue
        item.prompt_ids = list(item_ids)
        kept.append(item)
    return kept


class PromptSampler:
    """Endless batches of prompts: each epoch visits every prompt once, in a fresh shuffled order.

    A batch that reaches the end of an epoch is completed from the next one, so every batch has
    `batch_size` prompts. The order depends only on (seed, epoch), which makes resuming exact:
    `load_state_dict(state_dict())` continues with the very batch the original run would draw next.
    """

    def __init__(self, prompt_set: PromptSet | list[PromptItem], batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(prompt_set) == 0:
            raise ValueError("cannot sample from an empty prompt set")
        self.items = list(prompt_set)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # next index into this epoch's order
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        # A string seed is hashed with SHA-512 by `random`, stable across processes and Python runs.
        order = list(range(len(self.items)))
        random.Random(f"prompt-sampler:{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> PromptSampler:
        return self

    def __next__(self) -> list[PromptItem]:
        batch = []
        while len(batch) < self.batch_size:
            batch.append(self.items[self._order[self.position]])
            self.position += 1
            if self.position == len(self._order):  # roll over now, so the state never points past an epoch
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
        return batch

    def next_batch(self) -> list[PromptItem]:
        """The next `batch_size` prompts (same as `next(sampler)`)."""
        return next(self)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_prompts": len(self.items)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        n = state.get("num_prompts", len(self.items))
        if n != len(self.items):
            raise ValueError(
                f"sampler state was saved over {n} prompts but this prompt set has {len(self.items)}; "
                "resume with the same data config"
            )
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)


class MixedSampler:
    """Batches of `round(batch_size * share)` general prompts and the rest reasoning prompts, each
    drawn by its own `PromptSampler` (reasoning first in a batch). With no general prompts it is the
    reasoning sampler alone; its state holds both samplers' states for an exact resume."""

    def __init__(self, reasoning: PromptSet, general: PromptSet | None, batch_size: int, share: float, seed: int = 0):
        if not 0.0 <= share < 1.0:
            raise ValueError(f"data.general_share must be in [0, 1), got {share}")
        n_general = round(batch_size * share) if general is not None else 0
        if general is not None and share > 0 and n_general == 0:
            raise ValueError(f"data.general_share={share} of {batch_size} prompts per step rounds to 0 general prompts; raise it or grpo.prompts_per_step")
        if n_general >= batch_size:
            raise ValueError(f"data.general_share={share} leaves no reasoning prompt in a batch of {batch_size}")
        self.reasoning = PromptSampler(reasoning, batch_size - n_general, seed=seed)
        self.general = PromptSampler(general, n_general, seed=seed + 1) if n_general else None

    def next_batch(self) -> list[PromptItem]:
        batch = self.reasoning.next_batch()
        return batch + self.general.next_batch() if self.general is not None else batch

    def state_dict(self) -> dict:
        state = self.reasoning.state_dict()
        if self.general is not None:
            state["general"] = self.general.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.reasoning.load_state_dict({k: v for k, v in state.items() if k != "general"})
        if (self.general is None) != ("general" not in state):
            raise ValueError("sampler state and data.general_share disagree on general prompts; resume with the same data config")
        if self.general is not None:
            self.general.load_state_dict(state["general"])
