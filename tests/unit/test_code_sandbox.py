"""The code sandbox and HumanEval: real programs run in real sandboxes, nothing mocked.

Correct programs pass (all 164 canonical HumanEval solutions), wrong ones fail, and hostile ones
score 0 while the test process, the host's files and its process table stay untouched (checked
after every test: no process of the sandbox is left).
"""

from __future__ import annotations

import ast
import os
import random
import secrets
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from megatron_r1.config import DataConfig, RewardConfig
from megatron_r1.data.humaneval import EVAL_PROBLEMS, load_problems
from megatron_r1.data.prompts import load_prompts
from megatron_r1.rewards import RewardFn
from megatron_r1.rewards.code import complete_program, extract_program, run_programs, score_programs
from megatron_r1.rewards.sandbox import CHILD_SCRIPT, Job, Limits, _run, isolation, run_job
from megatron_r1.rewards.sandbox_child import SANDBOX_UID

REPO = Path(__file__).resolve().parents[2]
PROBLEMS = load_problems()
CHECK_TRUE = "def check(candidate):\n    assert candidate()\n"  # passes iff the program's f() is truthy
NAMESPACES = pytest.mark.skipif(not isolation().namespaces, reason=f"no namespace sandbox here: {isolation().detail}")


def canonical(p: dict) -> str:
    return p["prompt"] + p["canonical_solution"]


def sandbox_processes() -> list[psutil.Process]:
    """Processes of any sandbox still alive: the child script or the nobody user it runs as."""
    left = []
    for proc in psutil.process_iter(["cmdline", "uids"]):
        info = proc.info
        if (info["uids"] and info["uids"].real == SANDBOX_UID) or CHILD_SCRIPT in " ".join(info["cmdline"] or []):
            left.append(proc)
    return left


@pytest.fixture(autouse=True)
def no_stray_processes():
    yield
    deadline = time.monotonic() + 2  # a killed process may need a moment to be reaped
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []


def hostile(program: str, timeout_s: float = 2.0):
    """Run `program` (which defines f) against a check it would pass if its attack worked."""
    return run_job(Job(program, CHECK_TRUE, "f"), Limits(timeout_s=timeout_s))


# --------------------------------------------------------------------------------------------
# Correct and wrong programs


def test_canonical_humaneval_solutions_all_pass():
    """All 164 problems, 2 at a time on 2 cores: ~7-25 s depending on the machine's load."""
    counts: Counter = Counter()
    start = time.monotonic()
    scores = score_programs([canonical(p) for p in PROBLEMS], [p["test"] for p in PROBLEMS], [p["entry_point"] for p in PROBLEMS], timeout_s=10, counts=counts)
    elapsed = time.monotonic() - start
    assert len(PROBLEMS) == 164
    assert scores == [1.0] * 164, [p["task_id"] for p, s in zip(PROBLEMS, scores) if s != 1.0]
    assert counts == {"passed": 164}
    assert elapsed < 60, f"164 canonical solutions took {elapsed:.1f}s"


def test_wrong_solutions_score_zero():
    p = PROBLEMS[0]  # has_close_elements
    wrong = [
        p["prompt"] + "    return False\n",  # wrong answer
        p["prompt"] + "    return undefined_name\n",  # raises
        canonical(PROBLEMS[1]),  # another problem's solution: no has_close_elements defined
        'def has_close_elements(numbers, threshold):\n    return True\n"""',  # an open string must not swallow the tests
    ]
    results = run_programs(wrong, [p["test"]] * 4, [p["entry_point"]] * 4, Limits(timeout_s=5))
    assert [r.outcome for r in results] == ["failed"] * 4
    assert "AssertionError" in results[0].output and "NameError" in results[1].output
    assert "SyntaxError" in results[3].output


def test_every_run_gets_a_fresh_empty_workdir_and_a_minimal_environment():
    program = (
        "import os\n"
        "os.environ.setdefault('X', '1')\n"
        "first = sorted(os.listdir('.'))\n"
        "open('left_behind', 'w').write('x')\n"
        "def f():\n"
        "    return first == [] and set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'X'}\n"
    )
    os.environ["MEGATRON_R1_FAKE_SECRET"] = "s3cret"  # the trainer's environment must not leak in
    try:
        assert [r.outcome for r in run_programs([program] * 2, [CHECK_TRUE] * 2, ["f"] * 2)] == ["passed", "passed"]
    finally:
        del os.environ["MEGATRON_R1_FAKE_SECRET"]


# --------------------------------------------------------------------------------------------
# Hostile programs: each scores 0 and leaves the host as it was


def test_infinite_loop_hits_the_wall_clock_limit():
    start = time.monotonic()
    result = hostile("while True:\n    pass\n", timeout_s=1.0)
    assert result.outcome == "timeout"
    assert 1.0 <= time.monotonic() - start < 3.0


def test_fork_bomb_is_bounded_by_the_pids_limit():
    # Forks sleeping children until refused, then claims success if it got 1,000.
    program = (
        "import os, time\n"
        "n = 0\n"
        "for _ in range(1000):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "    except OSError:\n"
        "        break\n"
        "print('forked', n, flush=True)\n"
        "def f():\n"
        "    return n >= 1000\n"
    )
    result = hostile(program, timeout_s=10)
    assert result.outcome == "failed"
    forked = int(result.output.split("forked")[1].split()[0])
    if isolation().cgroups:
        assert forked < Limits.max_processes
    # and the classic one, forking forever, ends at the deadline; the fixture checks that no process is left
    assert hostile("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", timeout_s=1.5).outcome == "timeout"


def test_huge_allocation_is_a_memory_error():
    assert hostile("x = bytearray(50 * 2**30)\ndef f():\n    return True\n").outcome == "memory"


@pytest.mark.skipif(not isolation().cgroups, reason="no writable memory cgroup here")
def test_memory_of_the_whole_process_tree_is_capped():
    # 4 children of 100 MB each: every one is within its own address-space limit (256 MB), the
    # tree (400 MB) is not: the memory cgroup's OOM killer ends one.
    program = (
        "import os\n"
        "children = []\n"
        "for _ in range(4):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = b'x' * (100 << 20)\n"
        "        import time; time.sleep(2)\n"
        "        os._exit(0)\n"
        "    children.append(pid)\n"
        "statuses = [os.waitpid(pid, 0)[1] for pid in children]\n"
        "print('statuses', statuses)\n"
        "def f():\n"
        "    return statuses == [0, 0, 0, 0]\n"
    )
    result = run_job(Job(program, CHECK_TRUE, "f"), Limits(timeout_s=10, memory_mb=256))
    assert result.outcome == "failed"
    statuses = ast.literal_eval(result.output.split("statuses")[1].splitlines()[0].strip())
    assert signal.SIGKILL in statuses  # wait status of a child killed by SIGKILL (the OOM killer)


@NAMESPACES
def test_writes_outside_the_sandbox_do_not_land(tmp_path):
    targets = [Path("/tmp") / f"megatron_r1_pwned_{secrets.token_hex(4)}", REPO / f"pwned_{secrets.token_hex(4)}", tmp_path / "pwned"]
    program = (
        f"targets = {[str(t) for t in targets]!r}\n"
        "written = []\n"
        "for t in targets:\n"
        "    try:\n"
        "        open(t, 'w').write('pwned')\n"
        "        written.append(t)\n"
        "    except OSError:\n"
        "        pass\n"
        "def f():\n"
        "    return written\n"
    )
    try:
        # /tmp is writable inside (the sandbox's own tmpfs), so the check asks for all three.
        result = run_job(Job(program, "def check(c):\n    assert len(c()) == 3, c()\n", "f"), Limits(timeout_s=2))
        assert result.outcome == "failed"
        assert [t for t in targets if t.exists()] == []
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


@NAMESPACES
def test_files_outside_the_sandbox_cannot_be_read(tmp_path):
    secret = secrets.token_hex(16)
    (tmp_path / "secret.txt").write_text(secret)
    (tmp_path / "secret.txt").chmod(0o644)  # readable by everyone on the host: only the sandbox hides it
    program = (
        "found = []\n"
        f"for path in [{str(tmp_path / 'secret.txt')!r}, '/etc/shadow', '/etc/passwd', {str(REPO / 'pyproject.toml')!r}]:\n"
        "    try:\n"
        "        found.append(open(path).read())\n"
        "    except OSError as e:\n"
        "        print('refused', path, type(e).__name__)\n"
        "print(found)\n"
        "def f():\n"
        "    return found\n"
    )
    result = hostile(program)
    assert result.outcome == "failed"
    assert result.output.count("refused") == 4
    assert secret not in result.output


def test_network_connections_fail():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    program = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'leak')\n"
        "    connected = True\n"
        "except OSError as e:\n"
        "    print('refused', e)\n"
        "    connected = False\n"
        "def f():\n"
        "    return connected\n"
    )
    try:
        assert hostile(program).outcome == "failed"
        with pytest.raises(TimeoutError):  # socket.timeout: nobody connected
            listener.accept()
    finally:
        listener.close()


def test_killing_the_parent_fails_and_the_trainer_survives():
    program = (
        "import os, signal\n"
        f"for pid in (os.getppid(), {os.getpid()}, 1):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "    except OSError as e:\n"
        "        print('refused', pid, type(e).__name__)\n"
        "def f():\n"
        "    return False  # its tests fail; the point is what survives\n"
    )
    result = hostile(program)
    assert result.outcome == "failed"  # the harness itself survived to run the check
    assert psutil.Process().is_running()
    assert run_job(Job("def f():\n    return 1\n", CHECK_TRUE, "f")).outcome == "passed"  # and the sandbox still works


def test_a_gigabyte_of_output_is_cut_at_the_cap():
    start = time.monotonic()
    result = hostile("import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)\ndef f():\n    return True\n", timeout_s=30)
    assert result.outcome == "output_limit"
    assert len(result.output) <= Limits.max_output_bytes
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("exit_call", ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit(0)"])
def test_exiting_before_the_tests_run_is_not_a_pass(exit_call):
    assert hostile(f"def f():\n    return True\n{exit_call}\n").outcome == "early_exit"


def test_without_namespaces_in_process_guards_still_refuse_network_and_signals():
    """The fallback for machines without namespaces (forced here): weaker, but sockets and kill()
    are refused, and a parent kill aimed at this very process is stopped."""
    program = (
        "import os, signal, socket\n"
        "done = []\n"
        "for attempt in (lambda: os.kill(os.getppid(), signal.SIGKILL), lambda: socket.create_connection(('127.0.0.1', 1))):\n"
        "    try:\n"
        "        attempt()\n"
        "        done.append(True)\n"
        "    except PermissionError:\n"
        "        pass\n"
        "def f():\n"
        "    return done\n"
    )
    limits = Limits(timeout_s=3)
    assert _run(Job(program, CHECK_TRUE, "f"), limits, namespaces=False, cgroups=isolation().cgroups).outcome == "failed"
    assert _run(Job("def f():\n    return 1\n", CHECK_TRUE, "f"), limits, False, isolation().cgroups).outcome == "passed"
    assert _run(Job("import os\nos._exit(0)\n", CHECK_TRUE, "f"), limits, False, isolation().cgroups).outcome == "early_exit"


# --------------------------------------------------------------------------------------------
# Many at once


@pytest.mark.parametrize("total", [pytest.param(100, id="100"), pytest.param(1000, id="1000", marks=pytest.mark.slow)])
def test_many_samples_with_ten_percent_hostile(total):
    """`total` runs on 2 workers, 10 % of them hostile: exact counts, in bounded time. A run costs ~45 ms
    of CPU plus the full 4 s limit for each loop and fork bomb; 1,000 runs (`make test-slow`) measured
    58 s at load 5 and 87-189 s at load 8-13 (other jobs on the same 2 cores). The 4 s limit keeps
    correct programs from timing out on such a busy machine."""
    hostiles = {  # program -> (outcome, copies per 1,000)
        "while True:\n    pass\n": ("timeout", 3),
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n": ("timeout", 1),
        "x = bytearray(50 * 2**30)\n": ("memory", 15),
        "import os\nos._exit(0)\n": ("early_exit", 15),
        "import sys\nsys.exit(0)\n": ("early_exit", 15),
        "import socket\nsocket.create_connection(('127.0.0.1', 1), timeout=1)\n": ("failed", 14),
        "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)\n": ("output_limit", 10),
        "import os\nos.kill(os.getppid(), 9)\nos.kill(1, 9)\n": ("failed", 14),
        "def f(:\n": ("failed", 13),
    }
    programs, tests, entry_points, expected = [], [], [], Counter()
    for program, (outcome, copies) in hostiles.items():
        copies = max(1, copies * total // 1000)
        for _ in range(copies):
            programs.append(program)  # no f: a program that survives its attack fails the check
            tests.append(CHECK_TRUE)
            entry_points.append("f")
        expected[outcome] += copies
    hostile = len(programs)
    assert hostile == total // 10 or total < 1000
    benign = [PROBLEMS[i % 60] for i in range(total - hostile)]  # 60 quick problems, cycled
    programs += [canonical(p) for p in benign]
    tests += [p["test"] for p in benign]
    entry_points += [p["entry_point"] for p in benign]
    expected["passed"] += len(benign)
    order = list(range(total))
    random.Random(0).shuffle(order)  # hostile runs spread through the batch
    counts: Counter = Counter()
    start = time.monotonic()
    scores = score_programs([programs[i] for i in order], [tests[i] for i in order], [entry_points[i] for i in order], timeout_s=4.0, max_workers=2, counts=counts)
    elapsed = time.monotonic() - start
    assert counts == expected
    assert sum(scores) == len(benign)
    # Bounded: the runs' own limits, not the machine's speed, set this (a generous ceiling).
    assert elapsed < 0.4 * total, f"{total} samples took {elapsed:.0f}s"
    print(f"{total} sandboxed samples in {elapsed:.1f}s", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# HumanEval as a task, end to end through the reward


def test_humaneval_prompts_have_a_fixed_held_out_split():
    train = load_prompts(DataConfig(task="humaneval"), "train")
    held_out = load_prompts(DataConfig(task="humaneval"), "eval")
    assert (len(train), len(held_out)) == (164 - EVAL_PROBLEMS, EVAL_PROBLEMS)
    assert [it.entry["task_id"] for it in held_out] == [f"HumanEval/{i}" for i in range(144, 164)]
    assert not {it.question for it in train} & {it.question for it in held_out}
    item = train[0]
    assert item.prompt.startswith("A conversation between User and Assistant") and "def has_close_elements(" in item.prompt
    assert item.prompt.endswith("Assistant:") and item.answer == canonical(PROBLEMS[0])


def test_reward_fn_scores_code_items_in_the_sandbox():
    problem = PROBLEMS[0]
    item = load_prompts(DataConfig(task="humaneval"), "train")[0].as_reward_item()
    body = problem["canonical_solution"]
    signature_and_body = "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n" + body
    responses = [
        f"<think>pairs</think> <answer>\n```python\n{signature_and_body}```\n</answer>",  # no import: added from the prompt
        f"<think>x</think> <answer>{body}</answer>",  # the body alone: completed with the prompt
        "<think>x</think> <answer>\n```python\ndef has_close_elements(numbers, threshold):\n    return False\n```\n</answer>",
        "<think>x</think> <answer>I do not know</answer>",  # prose: runs, fails
        "no code at all",
    ]
    math_item = {"question": "1+1", "answer": "2", "entry": None, "language": None}
    fn = RewardFn(RewardConfig(code_timeout_s=10, code_workers=2))
    batch = fn(["p"] * 6, responses + ["<think>x</think> <answer>2</answer>"], [item] * 5 + [math_item])
    assert batch.components["accuracy"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert batch.code_outcomes == {"passed": 2, "failed": 2, "no_program": 1}
    assert batch.failures == 0


def test_extract_and_complete_program():
    assert extract_program("<answer>```python\ndef f():\n    return 1\n```</answer>") == "def f():\n    return 1\n"
    assert extract_program("<think>```python\nold\n```</think>```py\nnew\n```") == "new\n"
    assert extract_program("<answer>def f(): return 1</answer>") == "def f(): return 1"
    assert extract_program("nothing here") is None
    assert extract_program("<answer>\n    x = 1\n    return x\n</answer>") == "    x = 1\n    return x"  # a body keeps its indent
    prompt = "from typing import List\n\n\ndef g(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n"
    assert complete_program("    return sum(xs)\n", prompt, "g") == prompt + "    return sum(xs)\n"
    assert complete_program("def g(xs):\n    return sum(xs)\n", prompt, "g") == "from typing import List\ndef g(xs):\n    return sum(xs)\n"


def test_isolation_layers_on_this_machine():
    """Where the field notes say they work (root, kernel namespaces, cgroup v1), all are on."""
    if os.geteuid() != 0 or not Path("/sys/fs/cgroup/pids").is_dir():
        pytest.skip("not root with cgroup v1 here")
    layers = isolation()
    assert (layers.namespaces, layers.cgroups, layers.detail) == (True, True, "")
    result = run_job(Job("import os\ndef f():\n    return (os.getuid(), os.getpid(), os.getcwd())\n",
                         "def check(c):\n    assert c() == (65534, 1, '/work'), c()\n", "f"))
    assert result.outcome == "passed", result.output


def test_default_workers_share_the_node_between_ranks(monkeypatch):
    import os

    from megatron_r1.rewards.code import default_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers() == 12  # torchrun: nothing binds the ranks, so they share the node
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert default_workers() == 12  # srun --cpus-per-task=12: the binding already is this rank's share
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    assert default_workers() == 96
