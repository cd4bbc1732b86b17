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


def base_model(path: str | None, work: Path, pretrain_stage: str, default_run_dir: str, steps: int) -> Path:
    """`path` if given; else `<default_run_dir>/hf` when it exists; else `pretrain_stage` for `steps` steps into `work`."""
    if path:
        return Path(path)
    default = ROOT / default_run_dir / "hf"
    if (default / "config.json").exists():
        return default
    print(f"no base model at {default_run_dir}/hf: pretraining one for {steps} steps (speed, not accuracy, is measured)")
    run([sys.executable, "-m", "megatron_r1.cli", "pretrain", pretrain_stage, f"logging.run_dir={work / 'base'}",
         f"steps={steps}", "pretrain.probe_samples=0", "logging.progress_bar=false"])
    return work / "base/hf"
