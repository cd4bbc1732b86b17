"""Colocated against disaggregated GRPO, and what one step of staleness buys: the tiny R1-Zero run, two ranks.

    .venv/bin/python benchmarks/async_rl.py                               # 150 steps, seed 1234, three layouts
    .venv/bin/python benchmarks/async_rl.py --seeds 1234 1235 1236        # the spread over seeds
    .venv/bin/python benchmarks/async_rl.py --steps 30 --layouts colocated k1   # a quick look
    .venv/bin/python benchmarks/async_rl.py --moe                         # the tiny DeepSeek-V3 (make r1-zero-moe's base)

Runs `megatron-r1 r1-zero conf/stages/r1_zero_tiny.yaml` (its own steps, prompts, group size, lengths,
evaluation every 10 steps; `--moe`: conf/stages/r1_zero_tiny_moe.yaml) under `torchrun --nproc-per-node 2`,
from the same base model, per seed:

* colocated: engine DP 2 x trainer DP 2 (MoE: one engine of TP 2, vLLM's CPU build has no
  data-parallel MoE engines), generation and the update take turns on both ranks;
* k0: disaggregated, rank 0 trains and rank 1 generates, synchronous (`async.max_staleness=0`);
* k1, k2: the same one or two steps stale: the rollout rank samples the next batches while the
  trainer updates.

and reports per layout: the step's seconds (median over the steps without an evaluation), the
trainer's wait for a batch and the rollout rank's wait for weights as shares of the step (each
side's bubble), the run's wall time, the held-out accuracy at the end, and the wall time at which
the held-out accuracy first came within 3 points of the colocated run's final accuracy. On a 2-core
machine the ranks share the cores: the colocated ranks use both cores in both phases while each
disaggregated side has one, so what overlap can win here is bounded by that (on a cluster each side
has its own GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from launch import base_model, run  # noqa: E402
from results import append  # noqa: E402

STAGE = ROOT / "conf/stages/r1_zero_tiny.yaml"
LAYOUTS = {
    "colocated": ("colocated (engine DP2 x trainer DP2)", []),
    "k0": ("disaggregated 1+1, k=0", ["placement=disaggregated", "async.max_staleness=0"]),
    "k1": ("disaggregated 1+1, k=1", ["placement=disaggregated", "async.max_staleness=1"]),
    "k2": ("disaggregated 1+1, k=2", ["placement=disaggregated", "async.max_staleness=2"]),
}
WITHIN = 0.03  # "reached the synchronous accuracy": within 3 points of the colocated run's final


def _measure(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in rows)
    trained = [r for r in rows if "train/loss" in r and 1 < r["step"] < steps and "eval/accuracy" not in r]
    step = statistics.median(r["time/step"] for r in trained)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "step_s": step,
        "trainer_wait": statistics.median(r.get("async/trainer_wait_s", 0.0) for r in trained) / step,
        "rollout_wait": statistics.median(r.get("async/rollout_wait_s", 0.0) for r in trained) / step,
        "staleness": statistics.mean(r.get("async/staleness_mean", 0.0) for r in trained),
        "wall_s": summary["wall_seconds"],
        "base": summary["base_accuracy"],
        "final": summary["final_accuracy"],
        "curve": [(r.get("time/wall", 0.0), r["eval/accuracy"]) for r in rows if "eval/accuracy" in r],
    }


def _reached(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((wall for wall, accuracy in curve if accuracy >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="Hugging Face base model directory")
    parser.add_argument("--steps", type=int, help="RL steps (default: the stage's, 150)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234])
    parser.add_argument("--moe", action="store_true", help="the tiny DeepSeek-V3 stage and base (assets/tiny_moe_base)")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=["colocated", "k0", "k1"])
    args = parser.parse_args()
    layouts = {key: LAYOUTS[key] for key in args.layouts}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.moe:
            stage = ROOT / "conf/stages/r1_zero_tiny_moe.yaml"
            base = base_model(args.base, "assets/tiny_moe_base")
        else:
            stage = STAGE
            base = base_model(args.base)
        results: dict[str, list[dict]] = {key: [] for key in layouts}
        for seed in args.seeds:
            for key, (name, extra) in layouts.items():
                run_dir = work / f"{key}_{seed}"
                overrides = [f"logging.run_dir={run_dir}", f"checkpoint.load_hf={base}", "checkpoint.base_stage=", f"seed={seed}",
                             "checkpoint.save_every=0", "checkpoint.export_hf=false", "logging.progress_bar=false",
                             *([f"steps={args.steps}"] if args.steps else []),
                             *(["rollout.engine_tensor_parallel_size=2"] if args.moe and key == "colocated" else [])]
                print(f"running {name}, seed {seed} ...", flush=True)
                run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_r1.cli", "r1-zero", str(stage), *overrides, *extra])
                results[key].append(_measure(run_dir))
                r = results[key][-1]
                print(f"  step {r['step_s']:.2f} s, wall {r['wall_s']:.0f} s, held-out {100 * r['base']:.1f} -> {100 * r['final']:.1f} %", flush=True)

    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in results[key])

    first = next(iter(layouts))
    lines = [f"| layout | step s | x {first} | trainer waits | rollout waits | mean staleness | wall s | held-out final | within 3 points of {first}'s final at |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for key, (name, _) in layouts.items():
        finals = ", ".join(f"{100 * r['final']:.1f}" for r in results[key])
        reached = []
        for r, reference in zip(results[key], results[first]):
            wall = _reached(r["curve"], reference["final"] - WITHIN)
            reached.append(f"{wall:.0f} s" if wall is not None else "never")
        lines.append(f"| {name} | {med(key, 'step_s'):.2f} | {med(first, 'step_s') / med(key, 'step_s'):.2f} | "
                     f"{100 * med(key, 'trainer_wait'):.0f} % | {100 * med(key, 'rollout_wait'):.0f} % | {med(key, 'staleness'):.2f} | "
                     f"{med(key, 'wall_s'):.0f} | {finals} % | {', '.join(reached)} |")
    lines += ["", f"{stage.relative_to(ROOT)}{f' steps={args.steps}' if args.steps else ''}, base held-out "
              f"{100 * statistics.median(r['base'] for rs in results.values() for r in rs):.1f} %; seeds {' '.join(map(str, args.seeds))} "
              f"(medians over seeds; final accuracy and time-to-target per seed, in seed order); step s: median over steps "
              f"without an evaluation; waits: median share of the step; {os.cpu_count()} CPU cores shared by the 2 ranks. "
              f"x {first}: its step time / this step time (> 1: faster)."]
    print("\n".join(lines))
    print("appended to", append("GRPO: colocated vs disaggregated, bounded staleness (2 ranks)", "\n".join(lines)))


if __name__ == "__main__":
    main()
