"""The same pipeline run on several seeds, side by side: each stage's metrics per seed, their mean and range.

    .venv/bin/python tools/pipeline_seeds.py runs/r1_tiny runs/r1_tiny_seed1235 runs/r1_tiny_seed1236

Reads each run_dir's `pipeline.json` (written by `megatron-r1 pipeline ... seed=N run_dir=DIR`) and prints
a Markdown table: one row per stage, one cell per metric as `mean (min-max; seed values in order)`.
Every run must have the same stages (the same pipeline file).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# (key in a pipeline.json row, column title, scale, decimals)
METRICS = (
    ("start_accuracy", "accuracy before (RL) %", 100, 1),
    ("accuracy", "held-out accuracy %", 100, 1),
    ("language_consistency", "CoT language %", 100, 1),
    ("samples_kept", "samples kept", 1, 0),
    ("pair_accuracy", "RM pair accuracy %", 100, 1),
    ("rm_score_start", "RM score (general), start", 1, 2),
    ("rm_score_end", "RM score (general), end", 1, 2),
    ("general_accuracy", "general prompts' accuracy %", 100, 1),
    ("minutes", "minutes", 1, 1),
)


def load(run_dir: Path) -> list[dict]:
    path = run_dir / "pipeline.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; run `megatron-r1 pipeline PIPELINE.yaml run_dir={run_dir}` first")
    return json.loads(path.read_text())["stages"]


def cell(values: list[float | None], scale: float, decimals: int) -> str:
    known = [v * scale for v in values if v is not None]
    if not known:
        return ""
    fmt = f"{{:.{decimals}f}}"
    if len(known) == 1:
        return fmt.format(known[0])
    each = ", ".join(fmt.format(v * scale) if v is not None else "-" for v in values)
    return f"{fmt.format(statistics.mean(known))} ({fmt.format(min(known))}-{fmt.format(max(known))}; {each})"


def table(runs: list[list[dict]], skip: tuple[str, ...] = ()) -> str:
    names = [r["stage"] for r in runs[0]]
    if any([r["stage"] for r in run] != names for run in runs[1:]):
        raise SystemExit("the runs have different stages: compare runs of the same pipeline file")
    columns = [m for m in METRICS if m[0] not in skip and any(r.get(m[0]) is not None for run in runs for r in run)]
    lines = ["| stage | " + " | ".join(title for _, title, _, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for i, name in enumerate(names):
        cells = [cell([run[i].get(key) for run in runs], scale, decimals) for key, _, scale, decimals in columns]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="pipeline run_dirs, one per seed")
    p.add_argument("--no-minutes", action="store_true", help="leave out the minutes (runs that shared a machine's cores)")
    args = p.parse_args(argv)
    print(f"{len(args.run_dirs)} run(s): " + ", ".join(str(d) for d in args.run_dirs))
    print(table([load(d) for d in args.run_dirs], skip=("minutes",) if args.no_minutes else ()))


if __name__ == "__main__":
    sys.exit(main())
