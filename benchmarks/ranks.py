"""One rank against two: the R1-Zero step with SPMD colocated engines, as users launch it.

    .venv/bin/python benchmarks/ranks.py                       # base: the shipped assets/tiny_base
    .venv/bin/python benchmarks/ranks.py --steps 10 --prompts 16 --samples 8

Runs `megatron-r1 r1-zero conf/stages/r1_zero_tiny.yaml` for `--steps` steps in three layouts, under
`torchrun --nproc-per-node N` for N = 2 (one plain process for N = 1):

* 1 rank: one engine, trainer DP 1;
* 2 ranks, engine DP 2 x trainer DP 2: each engine samples half of the prompts, each trainer
  rank trains on half of the sequences;
* 2 ranks, engine TP 2 x trainer TP 2: one engine over both ranks, the trainer's tensors split.

and reports, from each run's metrics.jsonl (median over steps after the first): rollout seconds
and rollout tokens/s (all engines together), the update's seconds, the step's seconds, and the
sequences each engine sampled and each rank trained on. Every layout gets the same base model,
prompts, group size, lengths and seeds. On a 2-core machine the two ranks share the cores: the
point there is that no work is duplicated, not a speed-up.
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
    "1 rank": (1, []),
    "2 ranks: engine DP2 x trainer DP2": (2, []),
    "2 ranks: engine TP2 x trainer TP2": (2, ["rollout.engine_tensor_parallel_size=2", "parallel.tensor_model_parallel_size=2"]),
}
COLUMNS = ["time/rollout", "perf/tokens_per_s", "time/train", "time/sync", "time/step",
           "rollout/sequences_sampled_per_engine", "rollout/sequences_per_rank"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="Hugging Face base model directory")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--samples", type=int, default=8, help="responses per prompt")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = base_model(args.base)
        results = {}
        for name, (ranks, extra) in LAYOUTS.items():
            run_dir = work / name.replace(" ", "_").replace(":", "")
            overrides = [f"logging.run_dir={run_dir}", f"checkpoint.load_hf={base}", "checkpoint.base_stage=", f"steps={args.steps}",
                         f"grpo.prompts_per_step={args.prompts}", f"rollout.n_samples_per_prompt={args.samples}",
                         f"rollout.max_response_tokens={args.max_tokens}", "logging.eval_every=0", "checkpoint.save_every=0",
                         "checkpoint.export_hf=false", "logging.progress_bar=false", "data.eval_size=16", "logging.eval_samples=1"]
            launcher = [sys.executable, "-m", "megatron_r1.cli"]
            if ranks > 1:
                launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m", "megatron_r1.cli"]
            print(f"running {name} ...", flush=True)
            run([*launcher, "r1-zero", str(STAGE), *overrides, *extra])
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            rows = [r for r in rows if "train/loss" in r and 1 < r["step"] < args.steps]  # no first step, no final eval
            results[name] = {c: statistics.median(r[c] for r in rows) for c in COLUMNS}

    print(f"\nR1-Zero step, {args.prompts} prompts x {args.samples} samples, up to {args.max_tokens} tokens, "
          f"median of steps 2..{args.steps - 1} ({os.cpu_count()} CPU cores)")
    header = f"{'layout':36s} {'rollout s':>9s} {'tokens/s':>9s} {'update s':>9s} {'sync s':>7s} {'step s':>7s} {'seq/engine':>10s} {'seq/rank':>9s}"
    print(header)
    for name, r in results.items():
        print(f"{name:36s} {r['time/rollout']:9.2f} {r['perf/tokens_per_s']:9.0f} {r['time/train']:9.2f} {r['time/sync']:7.2f} "
              f"{r['time/step']:7.2f} {r['rollout/sequences_sampled_per_engine']:10.0f} {r['rollout/sequences_per_rank']:9.0f}")
    one = results["1 rank"]
    for name, r in list(results.items())[1:]:
        print(f"{name}: step time x{r['time/step'] / one['time/step']:.2f}, rollout tokens/s x{r['perf/tokens_per_s'] / one['perf/tokens_per_s']:.2f} of 1 rank")
    lines = ["| layout | rollout s | tokens/s | update s | sync s | step s | seq/engine | seq/rank |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['time/rollout']:.2f} | {r['perf/tokens_per_s']:.0f} | {r['time/train']:.2f} | {r['time/sync']:.2f} | "
                     f"{r['time/step']:.2f} | {r['rollout/sequences_sampled_per_engine']:.0f} | {r['rollout/sequences_per_rank']:.0f} |")
    lines += ["", f"{args.prompts} prompts x {args.samples} samples, up to {args.max_tokens} tokens, median of steps 2..{args.steps - 1}, "
              f"{os.cpu_count()} CPU cores (the ranks share them)."]
    print("appended to", append("R1-Zero step: 1 rank vs 2 ranks (SPMD layouts)", "\n".join(lines)))


if __name__ == "__main__":
    main()
