"""Compare the metrics of two runs value by value, timings aside: are they the same run?

    .venv/bin/python tools/compare_runs.py RUN_A RUN_B [--tolerance 0]

Reads `metrics.jsonl` of each run directory, pairs rows by step and compares every key both rows
have, except wall-clock measurements (`time/*`, seconds, rates). With `--tolerance 0` (the default)
"same" means bit-identical floats. Exit status 0 when they agree, 1 otherwise; prints each
difference. Also compares `hf/model.safetensors` byte for byte when both runs exported one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

# Keys that measure the machine, not the run.
TIMING = ("time/", "perf/", "sync/seconds", "sync/gb_per_s", "sync/probe_seconds")


def rows_by_step(run_dir: Path) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out.setdefault(row["step"], []).append(row)
    return out


def differences(a: Path, b: Path, tolerance: float = 0.0) -> list[str]:
    ra, rb = rows_by_step(a), rows_by_step(b)
    problems = [f"step {s}: only in {a if s in ra else b}" for s in sorted(set(ra) ^ set(rb))]
    for step in sorted(set(ra) & set(rb)):
        if len(ra[step]) != len(rb[step]):
            problems.append(f"step {step}: {len(ra[step])} rows vs {len(rb[step])}")
            continue
        for x, y in zip(ra[step], rb[step]):
            for key in sorted(set(x) & set(y)):
                if key == "step" or key.startswith(TIMING):
                    continue
                u, v = x[key], y[key]
                same = u == v or (math.isnan(u) and math.isnan(v)) or abs(u - v) <= tolerance
                if not same:
                    problems.append(f"step {step}: {key} {u!r} vs {v!r}")
    return problems


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--tolerance", type=float, default=0.0, help="largest absolute difference counted as equal (default 0: bit-identical)")
    args = p.parse_args(argv)
    problems = differences(args.run_a, args.run_b, args.tolerance)
    steps = len(rows_by_step(args.run_a))
    weights = [_digest(d / "hf" / "model.safetensors") for d in (args.run_a, args.run_b)]
    if None not in weights and weights[0] != weights[1]:
        problems.append("hf/model.safetensors differ")
    for line in problems:
        print(line)
    exported = "; exported weights identical" if None not in weights and weights[0] == weights[1] else ""
    print(f"{steps} steps compared: {'the same run' if not problems else f'{len(problems)} differences'}{exported}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
