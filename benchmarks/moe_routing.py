"""MoE routing replay on the tiny DeepSeek-V3: what R2 costs and what it changes, with a bf16 engine.

    .venv/bin/python benchmarks/moe_routing.py              # base: the shipped assets/tiny_moe_base
    .venv/bin/python benchmarks/moe_routing.py --steps 8 --updates 4

Runs `megatron-r1 r1-zero conf/stages/r1_zero_tiny_moe.yaml` twice from the same base, prompts and
seeds, with `grpo.routing_replay` none and r2, `grpo.updates_per_rollout` mini-batches per rollout
(R2 replays the old-logprob pass's routing in them) and the engine in bfloat16
(`rollout.dtype=bfloat16`: the engine/trainer gap of a GPU run; slow on CPUs without native bf16).
Reported, median over steps after the first: the update's seconds (old-logprob pass + mini-batches),
the step's seconds, the engine/trainer mismatch KL (`train/mismatch_kl`), the share of (token, MoE
layer) choices where the updated policy's own routing differs from the replayed one
(`moe/routing_mismatch`, r2 only: with none nothing is replayed), and the clip fraction.

R2 cannot shrink the engine/trainer gap: the old-logprob pass computes the same logprobs whether or
not it records. It fixes the routing *within* a rollout's mini-batches; the engine's routing is R3's
(GPU only). The table says so with its numbers.
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

STAGE = ROOT / "conf/stages/r1_zero_tiny_moe.yaml"
COLUMNS = ["time/logprob", "time/train", "time/step", "train/mismatch_kl", "moe/routing_mismatch", "train/clip_fraction"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="Hugging Face directory of a tiny DeepSeek-V3 base")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--updates", type=int, default=4, help="grpo.updates_per_rollout")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = base_model(args.base, "assets/tiny_moe_base")
        for mode in ("none", "r2"):
            run_dir = work / mode
            print(f"running routing_replay={mode} ...", flush=True)
            run([sys.executable, "-m", "megatron_r1.cli", "r1-zero", str(STAGE), f"logging.run_dir={run_dir}", f"checkpoint.load_hf={base}",
                  "checkpoint.base_stage=", f"steps={args.steps}", f"grpo.routing_replay={mode}", f"grpo.updates_per_rollout={args.updates}",
                  f"grpo.prompts_per_step={args.prompts}", f"rollout.n_samples_per_prompt={args.samples}",
                  f"rollout.max_response_tokens={args.max_tokens}", "rollout.dtype=bfloat16", "rollout.probe_every=0",
                  "logging.eval_every=0", "checkpoint.save_every=0", "checkpoint.export_hf=false", "logging.progress_bar=false",
                  "data.eval_size=8", "logging.eval_samples=1"])
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            rows = [r for r in rows if "train/loss" in r and 1 < r["step"] < args.steps]
            results[mode] = {c: statistics.median(r[c] for r in rows) if all(c in r for r in rows) else float("nan") for c in COLUMNS}

    title = (f"tiny DeepSeek-V3 R1-Zero, bf16 engine, {args.prompts} prompts x {args.samples} samples, up to {args.max_tokens} tokens, "
             f"{args.updates} mini-batches per rollout, median of steps 2..{args.steps - 1} ({os.cpu_count()} CPU cores)")
    lines = ["| routing replay | logprob s | update s | step s | mismatch KL | routing mismatch | clip fraction |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for mode, r in results.items():
        lines.append(f"| {mode} | {r['time/logprob']:.3f} | {r['time/train']:.3f} | {r['time/step']:.2f} | {r['train/mismatch_kl']:.2e} | "
                     f"{r['moe/routing_mismatch']:.4f} | {r['train/clip_fraction']:.4f} |")
    none, r2 = results["none"], results["r2"]
    lines += ["", title + ".",
              f"R2's cost: logprob + update time x{(r2['time/logprob'] + r2['time/train']) / (none['time/logprob'] + none['time/train']):.2f} of none. "
              "The mismatch KL is the engine/trainer gap, which R2 does not touch (R3 does, on GPU); the routing mismatch is the share of "
              "(token, MoE layer) choices the later mini-batches would have routed differently without R2."]
    print("\n".join(lines))
    print("appended to", append("MoE routing replay: R2 on the tiny DeepSeek-V3", "\n".join(lines)))


if __name__ == "__main__":
    main()
