"""The planner's time model against NeMo-RL's published DeepSeek-V3 runs: the fitted constant and the
table the README shows (predicted vs published, error %).

    .venv/bin/python tools/calibrate_planner.py [--json]
"""

from __future__ import annotations

import argparse
import json
import logging

from megatron_r1.planner.calibration import fitted_train_mfu, table
from megatron_r1.planner.timing import EFFICIENCY


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    rows, fit = table(), fitted_train_mfu()
    if args.json:
        print(json.dumps({"fitted_train_mfu": fit, "stored_train_mfu": EFFICIENCY.train_mfu, "rows": rows}, indent=2))
        return 0
    print(f"train_mfu fitted on the 256-H100 step: {fit:.4f} (stored in planner/timing.py: {EFFICIENCY.train_mfu:.4f})\n")
    print(f"{'run':<42}{'published':>14}{'predicted':>14}{'error':>9}")
    for r in rows:
        if "published_step_seconds" in r:
            tag = " (fitted)" if r["fitted"] else ""
            print(f"{r['run'] + tag:<42}{r['published_step_seconds']:>12.1f} s{r['predicted_step_seconds']:>12.1f} s{r['step_error_pct']:>8.1f}%")
            print(f"{'':<42}{r['published_tokens_per_s_per_gpu']:>8.2f} tok/s{r['predicted_tokens_per_s_per_gpu']:>8.2f} tok/s{r['tokens_error_pct']:>8.1f}%")
            print(f"{'':<42}phases: " + ", ".join(f"{k} {v} s" for k, v in r["seconds"].items()))
        else:
            print(f"{r['run']:<42}{r['published_refit_seconds']:>12} s{r['predicted_refit_seconds']:>12.1f} s{r['refit_error_pct']:>8.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
