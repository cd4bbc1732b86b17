"""Where an R1-Zero step's time goes: seconds and share per phase, framework overhead included.

    .venv/bin/python benchmarks/step_breakdown.py                   # the tiny CPU config, 30 steps
    .venv/bin/python benchmarks/step_breakdown.py --steps 60 conf/stages/r1_zero_tiny.yaml rollout.max_response_tokens=128

Runs `megatron-r1 r1-zero STAGE` as users do (a held-out evaluation and a checkpoint every 10
steps) and reads the phase timers every step writes to metrics.jsonl:

  rollout     the engines sample the step's groups
  reward      rule rewards (and reward models) score them
  logprob     reference / old-policy logprobs (none when kl_beta = 0 and one update per rollout)
  train       forward, backward and optimizer step of the policy
  sync        the new weights streamed into the engines, and the logprob parity probe
  eval        held-out evaluation (every logging.eval_every steps)
  checkpoint  saving (every checkpoint.save_every steps)
  other       everything else in the loop: batching, advantages, metrics, logging -- the framework's overhead

The first step is left out (engine and allocator warm-up). The mean over the remaining steps
spreads the periodic evaluation and checkpoint over the steps, as a long run sees them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from results import append  # noqa: E402

PHASES = ("rollout", "reward", "logprob", "train", "sync", "eval", "checkpoint", "other")
OVERHEAD_TARGET = 0.05  # "other" above this share of the step is worth a look


def run(stage: str, steps: int, overrides: list[str], run_dir: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "megatron_r1.cli", "r1-zero", stage, f"steps={steps}", f"logging.run_dir={run_dir}",
           "logging.eval_every=10", "checkpoint.save_every=10", "logging.progress_bar=false", "logging.tensorboard=false",
           *overrides]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "MEGATRON_R1_LOG_LEVEL": "WARNING"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "time/step" in r and r["step"] > 1]


def breakdown(rows: list[dict]) -> dict[str, float]:
    """Mean seconds per step of each phase, and of the whole step."""
    n = len(rows)
    out = {p: sum(r.get(f"time/{p}", 0.0) for r in rows) / n for p in PHASES}
    out["step"] = sum(r["time/step"] for r in rows) / n
    out["probe"] = sum(r.get("sync/probe_seconds", 0.0) for r in rows) / n
    return out


def table(b: dict[str, float], rows: list[dict]) -> str:
    lines = ["| phase | s / step | share |", "|---|---:|---:|"]
    for p in PHASES:
        lines.append(f"| {p} | {b[p]:.3f} | {100 * b[p] / b['step']:.1f} % |")
        if p == "sync" and b["probe"]:
            lines.append(f"| &nbsp;&nbsp;of which parity probe | {b['probe']:.3f} | {100 * b['probe'] / b['step']:.1f} % |")
    lines.append(f"| **step** | **{b['step']:.3f}** | 100 % |")
    tokens = sum(r.get("train/num_tokens", 0.0) for r in rows) / len(rows)
    lines.append("")
    lines.append(f"{len(rows)} steps measured (step 1 left out); mean response length "
                 f"{sum(r['response/length_mean'] for r in rows) / len(rows):.1f} tokens, {tokens:.0f} trained tokens per step.")
    share = b["other"] / b["step"]
    verdict = "under" if share < OVERHEAD_TARGET else "ABOVE"
    lines.append(f"Framework overhead (`other`): {100 * share:.1f} % of the step, {verdict} the {100 * OVERHEAD_TARGET:.0f} % target.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", nargs="?", default="conf/stages/r1_zero_tiny.yaml", help="stage YAML")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--steps", type=int, default=30, help="RL steps to run (the first is left out)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")
    args = p.parse_intermixed_args()
    with tempfile.TemporaryDirectory(prefix="step_breakdown_") as tmp:
        rows = run(args.stage, args.steps, args.overrides, Path(tmp) / "run")
    text = table(breakdown(rows), rows)
    print(f"\nR1-Zero step breakdown: {args.stage} {' '.join(args.overrides)}\n\n{text}\n")
    if not args.no_record:
        print("appended to", append(f"Step breakdown: {Path(args.stage).name}", text))


if __name__ == "__main__":
    main()
