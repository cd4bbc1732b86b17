"""Code rewards: model-written Python scored by running it against unit tests, many at once.

`score_programs` is the batch entry point (HumanEval format: ``tests[i]`` defines
``check(candidate)``, run as ``check(<entry_point>)``). Each program runs in its own sandbox
(`rewards/sandbox.py` lists the isolation layers) on a bounded thread pool: the threads only wait
on child processes, so the pool's size is the number of programs running at once. Nothing a
program does reaches the trainer: every failure, including one of the parent's own, scores 0 and
is counted by outcome (`sandbox.OUTCOMES`) for the logs.

`RewardFn` routes prompt items whose entry is a code problem (`is_code_item`, e.g. HumanEval from
`data/humaneval.py`) here: the program is taken from the response (`extract_program`), scored as
one batch per reward call, and reported as the ``accuracy`` component.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from megatron_r1.data.humaneval import CODE_VERIFIER
from megatron_r1.rewards.accuracy import extract_answer
from megatron_r1.rewards.sandbox import Job, Limits, RunResult, run_job


_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def default_workers() -> int:
    """Programs one rank runs at once: the CPUs this process may use (srun's `--cpus-per-task`
    binding shows here), shared with the other ranks on the node when nothing binds them (torchrun)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    unbound = cpus == (os.cpu_count() or cpus)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if unbound else 1
    return max(1, cpus // max(ranks_here, 1))


def run_programs(
    programs: Sequence[str | None],
    tests: Sequence[str],
    entry_points: Sequence[str],
    limits: Limits = Limits(),
    max_workers: int | None = None,
) -> list[RunResult]:
    """One `RunResult` per program, in order; ``None`` programs are not run (outcome "no_program").
    At most `max_workers` (default: `default_workers()`) run at once."""
    if not len(programs) == len(tests) == len(entry_points):
        raise ValueError(f"{len(programs)} programs, {len(tests)} tests, {len(entry_points)} entry points")

    def one(i: int) -> RunResult:
        if programs[i] is None:
            return RunResult("no_program", None, "", 0.0)
        return run_job(Job(programs[i], tests[i], entry_points[i]), limits)

    workers = max(1, max_workers or default_workers())
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="code-sandbox") as pool:
        return list(pool.map(one, range(len(programs))))


def score_programs(
    programs: Sequence[str | None],
    tests: Sequence[str],
    entry_points: Sequence[str],
    timeout_s: float,
    max_workers: int | None = None,
    counts: Counter | None = None,
    memory_mb: int = Limits.memory_mb,
) -> list[float]:
    """1.0 for each program whose ``check(entry_point)`` ran to completion, else 0.0.

    `timeout_s` bounds each run's wall clock (interpreter start included, ~0.1 s). With `counts`,
    the outcome of every run is added to it ("passed", "failed", "timeout", ...).
    """
    results = run_programs(programs, tests, entry_points, Limits(timeout_s=timeout_s, memory_mb=memory_mb), max_workers)
    if counts is not None:
        counts.update(r.outcome for r in results)
    return [float(r.passed) for r in results]


# --------------------------------------------------------------------------------------------
# From a response to a program


def is_code_item(item: dict[str, Any]) -> bool:
    """A prompt item (`PromptItem.as_reward_item()`) scored by running code against tests."""
    entry = item.get("entry")
    return isinstance(entry, dict) and entry.get("verifier") == CODE_VERIFIER


def extract_program(response: str) -> str | None:
    """The code of a response: inside the last ``<answer>…</answer>`` (a fenced block in it if it
    has one, else all of it), otherwise the last fenced Python block anywhere; None if neither."""
    answer = extract_answer(response)
    if answer:
        blocks = _FENCE.findall(answer)
        if blocks:
            return blocks[-1]
        # extract_answer strips; a bare function body needs its first line's indentation back.
        before = response[: response.rfind(answer)]
        return before[len(before.rstrip(" \t")) :] + answer
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else None


def complete_program(code: str, prompt: str, entry_point: str) -> str:
    """`code` made runnable against the problem: the prompt's import lines first (models often
    drop ``from typing import List``), and the whole prompt (signature + docstring) first when
    `code` is only a function body (it never defines `entry_point`)."""
    if not re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return prompt + code
    imports = [line for line in prompt.splitlines() if re.match(r"(from\s+\S+\s+)?import\s", line)]
    return "\n".join(imports + [code]) if imports else code


def score_code_items(
    responses: Sequence[str], items: Sequence[dict[str, Any]], timeout_s: float, max_workers: int | None = None, memory_mb: int = Limits.memory_mb
) -> tuple[dict[int, float], Counter]:
    """Scores of the code items among `items` (index -> 0/1) and the outcome counts."""
    index = [i for i, item in enumerate(items) if is_code_item(item)]
    programs, tests, entry_points = [], [], []
    for i in index:
        entry = items[i]["entry"]
        code = extract_program(responses[i])
        programs.append(None if code is None else complete_program(code, entry["prompt"], entry["entry_point"]))
        tests.append(entry["test"])
        entry_points.append(entry["entry_point"])
    counts: Counter = Counter()
    scores = score_programs(programs, tests, entry_points, timeout_s, max_workers, counts, memory_mb) if index else []
    return dict(zip(index, scores)), counts
