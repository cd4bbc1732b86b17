"""`megatron-r1 prepare-data`: the prompt files the cluster recipes read, made from public datasets.

The GPU stage configs read prompts as jsonl (`data.source: jsonl`): one `{"question", "answer"}` object
per line, the answer checked by math-verify. This command writes such files from

* a dataset in the Hugging Face Hub's formats, read with `datasets`: a Hub name (`openai/gsm8k`, with
  `--subset main`) on a machine that reaches the Hub, or a local copy (a `.parquet`, `.jsonl`, `.json`
  or `.csv` file, or a directory of them, e.g. from `huggingface-cli download --repo-type dataset`);
* `reasoning-gym:TASK` (`--size`, `--task-options '{"min_terms": 5}'`): generated problems.

Each source row is read in one of these layouts, found from its columns (or `--format`):

* `gsm8k`: `question` + `answer` ending in `#### 42` (most rows do): the number after `####`;
* `math`: `problem` + `solution` (MATH, competition_math): the last `\\boxed{...}` of the solution;
* `qa`: `problem` | `question` | `prompt` + `answer` (DeepScaleR, NuminaMath, ...): the answer as given;
* `preferences`: `chosen` + `rejected` (+ `prompt`), as strings, chat message lists (UltraFeedback) or
  whole `Human:/Assistant:` transcripts (HH-RLHF): `{"prompt", "chosen", "rejected"}` rows for the
  reward-model stage;
* `prompts`: `question` | `prompt` | `instruction` or a chat `messages` list, no answer: the general
  prompts of final RL (`data.general_path`), `{"question"}` rows.

Answers are normalised for math-verify (outer `$...$` and `\\boxed{}` removed, thousands separators
dropped, whitespace collapsed) and must parse; rows without a question, or whose answer math-verify
cannot read, are skipped and counted. `--eval-out FILE --eval-size N` holds N rows out (seeded) into a
second file, disjoint from the first, for datasets with one split.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from megatron_r1.config import ConfigError
from megatron_r1.rewards.accuracy import parse_answer

log = logging.getLogger(__name__)

FORMATS = ("auto", "gsm8k", "math", "qa", "preferences", "prompts")
_LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_QUESTION_KEYS = ("question", "problem", "prompt", "instruction")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def normalise_answer(answer: Any) -> str:
    """A reference answer as math-verify reads it best: bare (no `$...$` or `\\boxed{}` around it),
    no thousands separators, single spaces."""
    text = " ".join(str(answer).split())
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed.strip()
    while len(text) >= 2 and text[0] == "$" and text[-1] == "$":
        text = text[1:-1].strip()
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    return text


def detect_format(rows: list[dict]) -> str:
    """The row layout of a dataset from its columns (and, for GSM8K, its answers' `####`)."""
    cols = set(rows[0])
    if "answer" in cols and cols & set(_QUESTION_KEYS):
        sample = [str(r.get("answer")) for r in rows[:50]]
        return "gsm8k" if sum("####" in a for a in sample) * 2 > len(sample) else "qa"
    if "problem" in cols and "solution" in cols:
        return "math"
    if "chosen" in cols and "rejected" in cols:
        return "preferences"
    if cols & set(_QUESTION_KEYS) or "messages" in cols:
        return "prompts"
    raise ConfigError(f"cannot tell the layout of a dataset with columns {sorted(cols)}: it needs question|problem|prompt and "
                      "answer, or problem and solution; rename the columns or give --format")


def _text(value: Any) -> str | None:
    """A message's text: a string, or the content of the last assistant turn of a chat message list."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list):
        turns = [m for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
        answers = [m["content"] for m in turns if m.get("role") == "assistant"]
        return (answers[-1].strip() or None) if answers else None
    return None


def _first_user_turn(value: Any) -> str | None:
    if isinstance(value, list):
        for m in value:
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str) and m["content"].strip():
                return m["content"].strip()
    return None


def _preference(row: dict[str, Any]) -> tuple[dict | None, str]:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    prompt = row.get("prompt") if isinstance(row.get("prompt"), str) else None
    if isinstance(chosen, str) and isinstance(rejected, str) and prompt is None and "\n\nAssistant:" in chosen:
        # A whole transcript per side (HH-RLHF): the shared part up to the last assistant turn is the prompt.
        head_c, _, chosen = chosen.rpartition("\n\nAssistant:")
        head_r, _, rejected = rejected.rpartition("\n\nAssistant:")
        if head_c != head_r:
            return None, "different_prompts"
        prompt = head_c.replace("\n\nHuman:", "\n").strip()
    prompt = prompt or _first_user_turn(chosen)
    chosen_text, rejected_text = _text(chosen), _text(rejected)
    if not prompt or not prompt.strip():
        return None, "missing_prompt"
    if not chosen_text or not rejected_text:
        return None, "missing_response"
    if chosen_text == rejected_text:
        return None, "identical_responses"
    return {"prompt": prompt.strip(), "chosen": chosen_text, "rejected": rejected_text}, ""


def convert_row(row: dict[str, Any], fmt: str) -> tuple[dict | None, str]:
    """The output row (`{"question", "answer"}`; `{"prompt", "chosen", "rejected"}` for preferences;
    `{"question"}` for prompts) and "", or `(None, reason)` for a row to skip."""
    if fmt == "preferences":
        return _preference(row)
    question = next((row[k] for k in _QUESTION_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
    if question is None and fmt == "prompts":
        question = _first_user_turn(row.get("messages"))
    if question is None:
        return None, "missing_question"
    if fmt == "prompts":
        return {"question": question.strip()}, ""
    if fmt == "math":
        raw = last_boxed(str(row.get("solution") or ""))
        if raw is None:
            return None, "no_boxed_answer"
    else:
        raw = row.get("answer")
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None, "missing_answer"
        if fmt == "gsm8k":
            if "####" not in str(raw):
                return None, "no_final_answer"
            raw = str(raw).rsplit("####", 1)[1]
    answer = normalise_answer(raw)
    if not answer:
        return None, "missing_answer"
    if not parse_answer(answer):
        return None, "unparseable_answer"
    return {"question": question.strip(), "answer": answer}, ""


def _load_rows(source: str, split: str, subset: str | None) -> list[dict]:
    """Rows of a Hub dataset or a local file/directory in the Hub's formats."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("prepare-data reads datasets with the `datasets` package: pip install datasets") from None
    datasets.disable_progress_bars()  # our one summary line is the output
    datasets.logging.set_verbosity_error()
    path = Path(source)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in _LOCAL_BUILDERS) if path.is_dir() else [path]
        if not files or path.suffix not in _LOCAL_BUILDERS and not path.is_dir():
            raise ConfigError(f"{source}: expected a {'/'.join(_LOCAL_BUILDERS)} file or a directory of them")
        if path.is_dir():  # a Hub snapshot: files of the wanted split ("train-00000-of-00001.parquet", "test.jsonl", ...)
            matching = [p for p in files if split in p.name or split in p.parent.name]
            if not matching:
                raise ConfigError(f"{source}: no file of split {split!r} among {', '.join(p.name for p in files[:8])}")
            files = matching
        builder = _LOCAL_BUILDERS[files[0].suffix]
        ds = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
    else:
        try:
            ds = datasets.load_dataset(source, subset, split=split)
        except Exception as e:  # network, unknown name, wrong split: one line, no traceback
            raise ConfigError(f"cannot load {source!r} (split {split!r}) from the Hugging Face Hub: {str(e).splitlines()[0]}; "
                              "give a local copy instead (huggingface-cli download --repo-type dataset ...)") from None
    return [dict(r) for r in ds]


def _gym_rows(task: str, size: int, options: dict, seed: int) -> list[dict]:
    from megatron_r1.data.gym import make_gym_dataset

    try:
        ds = make_gym_dataset(task, options, seed, size)
    except Exception as e:
        raise ConfigError(f"reasoning-gym:{task}: {e}") from None
    return [{"question": ds[i]["question"], "answer": str(ds[i]["answer"])} for i in range(size)]


def prepare(source: str, out: Path, *, split: str = "train", subset: str | None = None, fmt: str = "auto", limit: int = 0,
            eval_out: Path | None = None, eval_size: int = 0, seed: int = 0, size: int = 1000, task_options: dict | None = None) -> dict:
    """Write `out` (and `eval_out`); returns the counts also logged."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    if (eval_out is None) != (eval_size == 0):
        raise ConfigError("--eval-out and --eval-size go together")
    for target in (out, eval_out):
        if target is not None and target.is_dir():
            raise ConfigError(f"{target} is a directory; give a .jsonl file path")
    if source.startswith("reasoning-gym:"):
        rows, fmt = _gym_rows(source.split(":", 1)[1], size, task_options or {}, seed), "qa"
    else:
        rows = _load_rows(source, split, subset)
        if not rows:
            raise ConfigError(f"{source} (split {split!r}) has no rows")
        if fmt == "auto":
            fmt = detect_format(rows)
    kept, skipped = [], Counter()
    for row in rows:
        converted, reason = convert_row(row, fmt)
        if converted is None:
            skipped[reason] += 1
        else:
            kept.append(converted)
    if limit:
        kept = kept[:limit]
    held_out: list[dict] = []
    if eval_size:
        if eval_size >= len(kept):
            raise ConfigError(f"--eval-size {eval_size} leaves no training rows of the {len(kept)} usable ones")
        order = list(range(len(kept)))
        random.Random(seed).shuffle(order)
        chosen = set(order[:eval_size])
        held_out = [r for i, r in enumerate(kept) if i in chosen]
        kept = [r for i, r in enumerate(kept) if i not in chosen]
    if not kept:
        raise ConfigError(f"no usable rows in {source} (skipped: {dict(skipped)})")
    for target, part in ((out, kept), (eval_out, held_out)):
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
            tmp.replace(target)  # a reader never sees half a file
    stats = {"source": source, "format": fmt, "rows": len(rows), "written": len(kept), "held_out": len(held_out), "skipped": dict(skipped)}
    print(f"prepare-data: {source} ({fmt}): {len(rows)} rows -> {len(kept)} in {out}"
          + (f", {len(held_out)} in {eval_out}" if eval_out else "")
          + (f"; skipped {', '.join(f'{k} {v}' for k, v in skipped.most_common())}" if skipped else ""), flush=True)
    return stats


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-r1 prepare-data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n"
                                       "  megatron-r1 prepare-data openai/gsm8k --subset main --out data/math_train.jsonl\n"
                                       "  megatron-r1 prepare-data openai/gsm8k --subset main --split test --out data/math_eval.jsonl\n"
                                       "  megatron-r1 prepare-data ./DeepScaleR-Preview-Dataset --out data/reasoning_train.jsonl \\\n"
                                       "      --eval-out data/reasoning_eval.jsonl --eval-size 500\n"
                                       "  megatron-r1 prepare-data reasoning-gym:chain_sum --size 5000 --out data/chain_sum.jsonl")
    p.add_argument("source", help="a Hub dataset name, a local .parquet/.jsonl/.json/.csv file or directory, or reasoning-gym:TASK")
    p.add_argument("--out", type=Path, required=True, help="the jsonl to write")
    p.add_argument("--split", default="train", help="split to read (default train)")
    p.add_argument("--subset", default=None, help="dataset configuration, e.g. main for openai/gsm8k")
    p.add_argument("--format", dest="fmt", default="auto", choices=FORMATS, help="row layout (default: from the columns)")
    p.add_argument("--limit", type=int, default=0, help="keep at most this many rows (0: all)")
    p.add_argument("--eval-out", type=Path, default=None, help="also write this many held-out rows here (with --eval-size)")
    p.add_argument("--eval-size", type=int, default=0, help="rows to hold out into --eval-out")
    p.add_argument("--seed", type=int, default=0, help="seed of the hold-out draw and of reasoning-gym")
    p.add_argument("--size", type=int, default=1000, help="reasoning-gym: problems to generate")
    p.add_argument("--task-options", type=json.loads, default=None, help="reasoning-gym: task options as JSON")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    prepare(args.source, args.out, split=args.split, subset=args.subset, fmt=args.fmt, limit=args.limit, eval_out=args.eval_out,
            eval_size=args.eval_size, seed=args.seed, size=args.size, task_options=args.task_options)
    return 0
