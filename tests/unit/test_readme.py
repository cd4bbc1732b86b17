"""The README's commands name files that exist: every `sbatch`, `megatron-r1`, `make` or `python` command
it shows (in code blocks and inline code) is read for repository paths (configs, scripts, tools,
examples), and each one must be there; every stage config a command names loads with the command's
overrides (a GPU one also runs through `megatron-r1 plan` in tests/unit/test_gpu_stage_configs.py)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from megatron_r1.cli import COMMAND_HELP, OWN_PARSERS, load_config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# Paths inside the repository that a command may name.
_REPO_PATH = re.compile(r"^(conf|slurm|tools|examples|benchmarks|tests)/[\w./-]+$")
_COMMAND = re.compile(r"^(sbatch|megatron-r1|\.venv/bin/megatron-r1|\.venv/bin/python|python3?|make|\.venv/bin/torchrun)\b")


def _commands() -> list[str]:
    """Command lines in ``` blocks and in `inline code`, comments and continuation lines joined."""
    lines = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", README, flags=re.S):
        joined = block.replace("\\\n", " ")
        lines += [line.split(" #")[0].strip() for line in joined.splitlines()]
    lines += [m.strip() for m in re.findall(r"`([^`\n]+)`", README)]
    return [line for line in lines if _COMMAND.match(line)]


def _tokens(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError:  # an unbalanced quote in prose: split plainly
        return line.split()


def test_the_readme_shows_commands():
    assert len(_commands()) > 30


def test_every_repository_path_a_command_names_exists():
    missing = sorted({tok for line in _commands() for tok in _tokens(line) if _REPO_PATH.match(tok.rstrip(".,;:)")) and "*" not in tok
                      and "<" not in tok and not (ROOT / tok.rstrip(".,;:)")).exists()})
    assert not missing, f"the README names files that do not exist: {missing}"


def test_every_megatron_r1_command_is_a_command():
    known = set(COMMAND_HELP) | set(OWN_PARSERS)
    wrong = []
    for line in _commands():
        tokens = _tokens(line)
        if tokens[0] in ("megatron-r1", ".venv/bin/megatron-r1") and len(tokens) > 1 and not tokens[1].startswith("-"):
            if tokens[1] not in known:
                wrong.append(line)
    assert not wrong, wrong


def test_every_stage_config_a_command_runs_loads_with_its_overrides():
    failures = []
    for line in _commands():
        tokens = _tokens(line)
        if tokens[0] == "sbatch":
            tokens = [t for t in tokens[1:] if not t.startswith("--")]
            args = tokens[1:]  # after the script: CONFIG overrides...
        elif tokens[0] in ("megatron-r1", ".venv/bin/megatron-r1") and len(tokens) > 2 and tokens[1] in COMMAND_HELP:
            args = tokens[2:]
        else:
            continue
        if not args or not args[0].startswith("conf/stages/"):
            continue
        overrides = [a for a in args[1:] if "=" in a and not a.startswith("-") and "<" not in a and "..." not in a]
        try:
            load_config(ROOT / args[0], overrides)
        except Exception as e:  # noqa: BLE001 - report every failing command at once
            failures.append(f"{line}: {e}")
    assert not failures, "\n".join(failures)
