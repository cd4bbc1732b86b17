"""Running the `megatron-r1` command line from a benchmark: quietly, stopping with its stderr on a
failure, and the tiny base model a benchmark starts from (the one `make r1-zero` / `make r1-zero-moe`
pretrained, else a short pretraining of its own: the benchmarks measure speed, not accuracy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-4000:]}")


def base_model(path: str | None, shipped: str = "assets/tiny_base") -> Path:
    """`path` if given, else the shipped tiny base (`assets/tiny_base` or `assets/tiny_moe_base`): every
    machine measures from the same weights."""
    return Path(path) if path else ROOT / shipped
