"""Peer comparison: the same R1-Zero GRPO run with Hugging Face TRL's `GRPOTrainer` and with megatron-r1.

    .venv/bin/python benchmarks/peer_trl.py                        # tiny (pretrained), 25M, 100M (~15 min on 2 cores; 25M and 100M ~12 of them)
    .venv/bin/python benchmarks/peer_trl.py --sizes tiny --quick   # smoke run, a minute or two per size
    .venv/bin/python benchmarks/peer_trl.py --sizes 25m,100m --lengths fixed   # every response at the cap: no spread
    .venv/bin/python benchmarks/peer_trl.py --trl-generation transformers --lengths fixed

Three model sizes, each trained by both trainers from identical weights with identical settings:

* tiny (0.6M, `tiny_dense`): the shipped pretrained base `assets/tiny_base`,
  16 prompts x 8 samples, 96 response tokens, lr 5e-5, 40 steps, then the held-out evaluation;
* 25M (`bench_25m`) and 100M (`bench_100m`): no time to pretrain them, so each is built randomly
  initialised by megatron-r1's own model builder and exported with `save_hf` together with the tiny
  tokenizer; 2 (25M) or 1 (100M) prompts x 8 samples, up to 256 response tokens, 8 steps. Their
  accuracy is ~0 for both trainers: these rows measure speed only. A random policy's response
  lengths drift apart between two trainers after one update, so both engines are told every
  response's length: R1-Zero's spread from `benchmarks/length_plan.py` (`--lengths spread`, the
  default), or the cap for all (`--lengths fixed`: no spread, no padding to save).

Both trainers get the same stage (`conf/stages/r1_zero_tiny.yaml`) with the same overrides:
chain_sum prompts from reasoning-gym (same train/eval seeds, r1_zero template; TRL is fed them in
the order megatron-r1's sampler draws them), reward accuracy + 0.1 x strict format (the project's
`RewardFn` for both), group size, response length, constant learning rate, PPO clip 0.2, no KL,
token-mean loss, one optimizer step per rollout batch split into the same micro-batches, and
token-level truncated importance sampling against the engine's log-probs. Each trainer runs in a
fresh process: megatron-r1 through its CLI, TRL through `benchmarks/_trl_worker.py`. TRL generates
with its colocated vLLM engine (`vllm_mode="colocate"`), or with transformers' `generate` when that
fails or `--trl-generation transformers` asks for it; the table says which.

Reported per size: seconds per step in the steady state (the mean over steps 2..N: the first
step, with engine warm-up, is left out, and so are megatron-r1's evaluation and checkpoint at the
last step), rollout tokens/s (response tokens over generation seconds, same steps), the held-out
accuracy after the last step (tiny only: greedy pass@1 on the same 200 prompts, scored by
`megatron-r1 evaluate` for TRL's final model, the evaluation megatron-r1 runs in its loop), and
TRL / megatron-r1 ratios; then where the step time goes, phase by phase, the crossover, and the
phases in which megatron-r1 spends more than TRL. All of it is printed and, except with --quick,
appended to benchmarks/RESULTS.md (benchmarks/results.py adds the date, machine, versions, command).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/results.py
from results import append  # noqa: E402

from megatron_r1.checksums import verify_checksums  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGE = "conf/stages/r1_zero_tiny.yaml"
TINY_BASE = ROOT / "assets/tiny_base"
WORKER = ROOT / "benchmarks/_trl_worker.py"
MAX_MODEL_LEN = 384  # prompt (under 100 tokens with the tiny tokenizer) + up to 256 response tokens
# megatron-r1's update in micro-batches of at most this many positions, cut to their longest row (its own
# setting: the same gradient as the padded micro-batches both trainers otherwise share).
TOKEN_BUDGET = 2048
SEED = 1234  # both trainers' seed (prompt order, sampling, initialisation of the random bases); --seed
# How the randomly initialised sizes fix their response lengths (--lengths): "spread", R1-Zero's spread from
# benchmarks/length_plan.py, the same lengths on both sides; "fixed", every response at the cap (no spread).
LENGTHS = "spread"
LENGTH_PLAN = ROOT / "benchmarks/length_plan.py"


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    model: str  # conf/models preset
    pretrained: bool  # True: the tiny pretrained base; False: randomly initialised (speed only)
    prompts: int  # prompts per step
    samples: int  # group size
    max_tokens: int  # response budget
    steps: int
    lr: float
    eval_size: int  # held-out prompts (the untrained sizes only need a few for megatron-r1's probe)


SIZES = {
    "tiny": Size("tiny", "tiny_dense", True, prompts=16, samples=8, max_tokens=96, steps=40, lr=5e-5, eval_size=200),
    # Fewer prompts and steps, so that the whole comparison stays near 15 minutes on 2 cores.
    # 8 steps: one step of either trainer can take 1.5x its neighbours on this machine (memory first touched at a
    # new batch shape), and 7 steady steps keep such a step from deciding the mean.
    "25m": Size("25m", "bench_25m", False, prompts=2, samples=8, max_tokens=256, steps=8, lr=5e-5, eval_size=4),
    "100m": Size("100m", "bench_100m", False, prompts=1, samples=8, max_tokens=256, steps=8, lr=5e-5, eval_size=4),
}
# --quick: the same code paths in a minute or two per size.
QUICK = {
    "tiny": dict(prompts=4, steps=3, eval_size=16),
    "25m": dict(prompts=2, max_tokens=64, steps=2),
    "100m": dict(prompts=1, max_tokens=64, steps=2),
}


@dataclasses.dataclass
class Numbers:
    """One trainer at one size, steady state (steps 2..N)."""

    step_s: float  # mean seconds per step
    tokens_per_s: float  # rollout tokens / generation seconds
    response_tokens: float  # mean response length (tokens) over the same steps
    phases: dict[str, float]  # mean seconds per step of each phase in PHASES
    accuracy: float | None = None  # held-out greedy pass@1 after the last step
    note: str = ""
    padding_share: float | None = None  # share of the update's positions that were padding (megatron-r1 measures it)


# Phases of a step, as both trainers can be timed: megatron-r1's metrics (time/rollout, time/train,
# time/logprob, time/sync with its parity probe, time/reward), TRL's timed calls (_trl_worker.py).
PHASES = {
    "generation": "generation",
    "update": "update (forward + backward + optimizer)",
    "logprob_pass": "extra log-prob pass",
    "sync": "weight sync (megatron-r1: + parity probe)",
    "reward": "reward",
}


def overrides(size: Size) -> list[str]:
    """The stage overrides both trainers get (megatron-r1 on its command line, TRL via the worker). How soon a
    random policy samples EOS drifts apart between the two trainers after one update, and a step's work with
    it, so the randomly initialised sizes fix every response's length: with `--lengths fixed` all at the cap
    (`rollout.min_response_tokens`), with `--lengths spread` by the length plan (`planned`)."""
    fixed = [] if size.pretrained or LENGTHS != "fixed" else [f"rollout.min_response_tokens={size.max_tokens}"]
    return [*fixed,
        f"seed={SEED}", f"model={size.model}", f"steps={size.steps}", f"grpo.prompts_per_step={size.prompts}",
        f"rollout.n_samples_per_prompt={size.samples}", f"rollout.max_response_tokens={size.max_tokens}",
        f"rollout.max_model_len={MAX_MODEL_LEN}", f"optimizer.lr={size.lr}", "optimizer.lr_decay_style=constant",
        f"data.eval_size={size.eval_size}", "logging.eval_samples=1",  # greedy pass@1 only; no maj@k sampling
    ]


def planned(size: Size) -> bool:
    """Whether both engines generate this size's responses at the lengths of `benchmarks/length_plan.py`."""
    return not size.pretrained and LENGTHS == "spread"


def run(cmd: list[str], log: Path) -> None:
    """Run `cmd` from the repository root with its output in `log`; RuntimeError with the log's tail if it fails."""
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"exit {code}: {shlex.join(cmd)}\n{tail}")


def make_random_base(model: str, out: Path) -> None:
    """(In a subprocess) a randomly initialised `model` built by megatron-r1's builder, exported with
    `save_hf` and the tiny tokenizer, so both trainers start from the very same weights."""
    from megatron_r1.config import ParallelConfig, load_config
    from megatron_r1.distributed import init_distributed
    from megatron_r1.models.build import build_model
    from megatron_r1.models.hf import save_hf

    init_distributed(ParallelConfig(), seed=0)  # seeds the initialisation
    cfg = load_config(None, [f"model={model}"]).model
    save_hf(build_model(cfg, ParallelConfig()), cfg, out, tokenizer_dir=TINY_BASE)


def count_parameters(hf_dir: Path) -> int:
    """Parameters of an exported model (the tied LM head is not stored, so it counts once)."""
    from safetensors import safe_open

    total = 0
    for file in hf_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def run_megatron(size: Size, base: Path, work: Path) -> Numbers:
    run_dir = work / "megatron_r1"
    launcher = [str(LENGTH_PLAN), "--cap", str(size.max_tokens), "--seed", str(SEED)] if planned(size) else []
    cmd = [sys.executable, *launcher, "-m", "megatron_r1.cli", "r1-zero", STAGE, *overrides(size),
           f"checkpoint.load_hf={base}", "checkpoint.base_stage=", f"logging.run_dir={run_dir}", "checkpoint.save_every=0",
           "checkpoint.export_hf=false", "logging.eval_every=0", "logging.progress_bar=false", "logging.tensorboard=false",
           f"memory.max_tokens_per_microbatch={TOKEN_BUDGET}",
           # The engine compiled, as TRL's is (vLLM's default); megatron-r1's CPU default is eager, for start-up time.
           "rollout.enforce_eager=false"]
    run(cmd, work / "megatron_r1.log")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [r for r in rows if "time/step" in r and r["step"] > 1]
    # The last step also holds the final evaluation and checkpoint: not part of a training step.
    seconds = [r["time/step"] - r.get("time/eval", 0.0) - r.get("time/checkpoint", 0.0) for r in steady]
    tokens = sum(r["response/length_mean"] * r["rollout/sequences"] for r in steady)
    sequences = sum(r["rollout/sequences"] for r in steady)
    metric = {"generation": "time/rollout", "update": "time/train", "logprob_pass": "time/logprob", "sync": "time/sync", "reward": "time/reward"}
    phases = {phase: statistics.mean(r.get(key, 0.0) for r in steady) for phase, key in metric.items()}
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    return Numbers(
        step_s=statistics.mean(seconds), tokens_per_s=tokens / (phases["generation"] * len(steady)), phases=phases,
        response_tokens=tokens / sequences,
        accuracy=evals[-1] if size.pretrained else None,
        note=f"base {100 * evals[0]:.1f} %" if size.pretrained else "",
        padding_share=statistics.mean(r.get("train/padding_share", 0.0) for r in steady),
    )


def run_trl(size: Size, base: Path, work: Path, generation: str) -> Numbers:
    """TRL in its own process: vLLM colocate first (unless told otherwise), transformers if that fails."""
    order = ["vllm", "transformers"] if generation == "auto" else [generation]
    if planned(size):  # the plan tells vLLM the lengths; transformers' generate could not do the same work
        if "vllm" not in order:
            sys.exit("--lengths spread plans vLLM's response lengths: run TRL with --trl-generation vllm (or auto), or use --lengths fixed")
        order = ["vllm"]
    failures = []
    for backend in order:
        out = work / f"trl_{backend}"
        cmd = [sys.executable, str(WORKER), "--model", str(base), "--out", str(out), "--generation", backend,
               *(["--save"] if size.pretrained else []), *(["--length-plan", str(SEED)] if planned(size) else []),
               STAGE, *overrides(size)]
        try:
            run(cmd, work / f"trl_{backend}.log")
        except RuntimeError as e:
            failures.append(f"{backend}: {str(e).splitlines()[-1]}")
            print(f"    TRL with {backend} generation failed: {failures[-1]}", flush=True)
            continue
        numbers = trl_numbers(json.loads((out / "result.json").read_text()))
        if size.pretrained:
            numbers.accuracy = evaluate(size, out / "hf", work)
        numbers.note = "; ".join([numbers.note, *(f"fell back after {f}" for f in failures)]).strip("; ")
        return numbers
    raise RuntimeError("TRL failed with every generation backend: " + " | ".join(failures))


def trl_numbers(result: dict) -> Numbers:
    """Steady-state numbers of a TRL run: steps 2..N (TRL's global_step >= 1 while they run). Its
    update is what remains of the step once the timed phases are taken out."""
    steady = len(result["step_seconds"]) - 1
    per_step = dict.fromkeys([*PHASES, "rollout_tokens"], 0.0)
    for phase, step, value in result["phases"]:
        if step >= 1:
            per_step[phase] += value / steady
    step_s = statistics.mean(result["step_seconds"][1:])
    tokens = per_step.pop("rollout_tokens")
    per_step["update"] = step_s - sum(per_step.values())
    backend = "vLLM colocate" if result["generation"] == "vllm" else "transformers generate"
    sequences = result["sequences_per_step"]
    return Numbers(step_s=step_s, tokens_per_s=tokens / per_step["generation"], phases=per_step, response_tokens=tokens / sequences,
                   note=f"{backend}, {result['engine_dtype'].replace('torch.', '')}")


def evaluate(size: Size, model: Path, work: Path) -> float:
    """TRL's final model through megatron-r1's held-out evaluation: same prompts, greedy, same reward."""
    run_dir = work / "trl_eval"
    cmd = [sys.executable, "-m", "megatron_r1.cli", "evaluate", STAGE, *overrides(size), f"checkpoint.load_hf={model}",
           "checkpoint.base_stage=", f"logging.run_dir={run_dir}"]
    run(cmd, work / "trl_eval.log")
    return json.loads((run_dir / "eval.json").read_text())["accuracy"]


# --------------------------------------------------------------------------------------------
# Report.


def percent(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def table(results: dict) -> str:
    lines = [
        "| model | params | prompts x samples, response tokens, steps | s/step megatron-r1 | s/step TRL | TRL / megatron-r1 "
        "| response length megatron-r1 / TRL | rollout tok/s megatron-r1 | rollout tok/s TRL | TRL / megatron-r1 "
        "| held-out acc. megatron-r1 | held-out acc. TRL | TRL generation |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (size, params, mr1, trl) in results.items():
        if size.pretrained:
            acc_m, acc_t = f"{percent(mr1.accuracy)} ({mr1.note})", percent(trl.accuracy)
        else:
            acc_m = acc_t = "~0 (random init, not evaluated)"
        lines.append(
            f"| {name} | {params / 1e6:.1f}M | {size.prompts} x {size.samples}, {size.max_tokens}, {size.steps} "
            f"| {mr1.step_s:.2f} | {trl.step_s:.2f} | {trl.step_s / mr1.step_s:.2f} | {mr1.response_tokens:.0f} / {trl.response_tokens:.0f} "
            f"| {mr1.tokens_per_s:,.0f} | {trl.tokens_per_s:,.0f} | {trl.tokens_per_s / mr1.tokens_per_s:.2f} "
            f"| {acc_m} | {acc_t} | {trl.note} |"
        )
    return "\n".join(lines)


def breakdown(results: dict) -> str:
    lines = ["| model | trainer | s/step | " + " | ".join(PHASES.values()) + " | other | update padding |", "|---" * (len(PHASES) + 5) + "|"]
    for name, (_, _, mr1, trl) in results.items():
        for trainer, n in (("megatron-r1", mr1), ("TRL", trl)):
            other = n.step_s - sum(n.phases.values())
            cells = " | ".join(f"{n.phases[p]:.2f}" for p in PHASES)
            padding = "not measured" if n.padding_share is None else f"{n.padding_share:.0%}"
            lines.append(f"| {name} | {trainer} | {n.step_s:.2f} | {cells} | {max(other, 0.0):.2f} | {padding} |")
    return "\n".join(lines)


def crossover(results: dict) -> str:
    """Which trainer takes less time per step at which size, and where that changes."""
    ratios = [(name, r[3].step_s / r[2].step_s) for name, r in results.items()]
    ours = [f"{n} (TRL x{q:.2f} the time)" for n, q in ratios if q > 1]
    theirs = [f"{n} (TRL x{q:.2f} the time)" for n, q in ratios if q <= 1]
    if not theirs:
        return "megatron-r1 takes less time per step at every size measured: " + ", ".join(ours) + "; no crossover in this range."
    if not ours:
        return "TRL takes less time per step at every size measured: " + ", ".join(theirs) + "; no crossover in this range."
    flips = [f"between {a} and {b}" for (a, qa), (b, qb) in zip(ratios, ratios[1:]) if (qa > 1) != (qb > 1)]
    return (f"megatron-r1 faster at {', '.join(ours)}; TRL faster at {', '.join(theirs)}; "
            f"crossover {' and '.join(flips) or 'not between neighbouring sizes'}.")


def where_slower(results: dict) -> str:
    """The phases in which megatron-r1 spends more than TRL (by over 5 %), size by size."""
    found = []
    for name, (_, _, mr1, trl) in results.items():
        for phase, label in PHASES.items():
            ours, theirs = mr1.phases[phase], trl.phases[phase]
            if ours > 1.05 * theirs and ours - theirs >= 0.01:
                found.append(f"{name} {label.split(' (')[0]}: {ours:.2f} s vs {theirs:.2f} s")
    if not found:
        return "megatron-r1 spends no more than TRL in any phase."
    return "Phases where megatron-r1 spends more than TRL: " + "; ".join(found) + "."


def title(results: dict) -> str:
    random_sizes = any(not r[0].pretrained for r in results.values())
    lengths = f" (random bases: {'R1-Zero length spread' if LENGTHS == 'spread' else 'every response at the cap'})" if random_sizes else ""
    return f"R1-Zero GRPO: TRL GRPOTrainer vs megatron-r1, sizes {', '.join(results)}{lengths}, seed {SEED}"


def lengths_text() -> str:
    """How the randomly initialised sizes fixed their response lengths (the body's first paragraph)."""
    if LENGTHS == "fixed":
        return ("both trainers generate every response to the cap (`--lengths fixed`: `rollout.min_response_tokens`, vLLM's "
                "`min_tokens`), so there is no length spread and no padding for the token budget to save there")
    return ("both engines generate every sampled response at the length `benchmarks/length_plan.py` draws for it (`--lengths "
            "spread`: R1-Zero's spread, 70 % of responses 5 tokens to a third of the cap, 30 % half the cap to the cap, "
            "the same draws in the same places on both sides, set on `vllm.LLM.generate` from outside both trainers), so "
            "both do the same work with the padding a real GRPO batch has")


def body(results: dict, minutes: float) -> str:
    return "\n".join([
        "Same stage (`conf/stages/r1_zero_tiny.yaml`) and overrides for both trainers at each size: chain_sum prompts "
        "(same seeds and order), reward accuracy + 0.1 x strict format, group size, response length, constant lr, clip 0.2, "
        "no KL, token-mean loss, one optimizer step per rollout, token-level truncated IS (cap 2) against the engine's "
        "log-probs, fp32 training. s/step and tokens/s are means over steps 2..N (step 1, with engine warm-up, is left out; "
        "so are megatron-r1's final evaluation and checkpoint). Held-out accuracy: greedy pass@1 on the same prompts after "
        "the last step (`megatron-r1 evaluate` for TRL's final model). The 25M and 100M models are randomly initialised: "
        "their rows measure speed only. A random policy's response lengths drift apart between the trainers after one "
        f"update, and the step's work with them, so {lengths_text()}; the tiny row has the real length spread of its "
        "R1-Zero training.",
        "",
        "Differences the numbers include: on CPU TRL's colocated vLLM engine is built with megatron-r1's engine dtype "
        "(fp32; TRL 1.16 passes vLLM none and \"auto\" would pick bf16) and its weight sync goes through vLLM's "
        "`reload_weights` (TRL's own per-parameter `load_weights` fails on vLLM 0.32's CPU linears), both set by "
        "`_trl_worker.py` from outside TRL's code (last column: the dtype each engine ran); both engines are compiled "
        "(TRL leaves vLLM's default, megatron-r1 runs with `rollout.enforce_eager=false`; its CPU default is eager, "
        "which starts ~40 s sooner and decodes ~20 % slower at 100M); megatron-r1 trains in "
        f"micro-batches of at most {TOKEN_BUDGET} positions cut to their longest row (`memory.max_tokens_per_microbatch`), "
        "TRL in micro-batches padded to the batch's longest; megatron-r1 refits directly into the live parameters "
        "(`rollout.weight_loading=auto`); TRL makes an "
        "extra no-grad log-prob pass per step for its importance sampling against vLLM (only with vLLM generation), "
        "megatron-r1 takes the on-policy old log-probs from the update's own forward; megatron-r1 probes engine/trainer "
        "log-prob parity after its first weight sync and every 10th (inside its sync time) and checks it on every step's "
        "batch from the update's own log-probs; TRL divides advantages by the Bessel-corrected "
        "group std, megatron-r1 by the population std (TRL's advantages are x0.94 of megatron-r1's for groups of 8).",
        "",
        table(results),
        "",
        "Where the time of a step goes (mean seconds per step, same steps; TRL's update is the rest of its step):",
        "",
        breakdown(results),
        "",
        crossover(results),
        "",
        where_slower(results),
        "",
        f"Whole comparison: {minutes:.1f} minutes (both trainers, every size, start-up and evaluations included).",
    ])


# --------------------------------------------------------------------------------------------


def main() -> None:
    global SEED, LENGTHS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,25m,100m", help=f"comma-separated, of: {', '.join(SIZES)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer prompts, tokens and steps; nothing appended to RESULTS.md")
    parser.add_argument("--trl-generation", choices=["auto", "vllm", "transformers"], default="auto",
                        help="TRL's generation backend (auto: vLLM colocate, transformers if that fails)")
    parser.add_argument("--steps", type=int, help="steps of every size (default: each size's own: tiny 40, 25m and 100m 8)")
    parser.add_argument("--lengths", choices=["spread", "fixed"], default=LENGTHS,
                        help="the randomly initialised sizes' response lengths: spread (R1-Zero's, planned the same for both; "
                             "default) or fixed (every response at the cap: no spread)")
    parser.add_argument("--seed", type=int, default=SEED, help="both trainers' seed (run several to see the spread of the tiny accuracy)")
    parser.add_argument("--work", help="keep the runs (logs, metrics, models) in this directory (default: a temporary one)")
    parser.add_argument("--make-base", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)  # internal: one subprocess per base
    args = parser.parse_args()
    if args.make_base:
        make_random_base(args.make_base[0], Path(args.make_base[1]))
        return

    SEED, LENGTHS = args.seed, args.lengths
    names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if unknown := [n for n in names if n not in SIZES]:
        sys.exit(f"unknown size(s) {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    verify_checksums(TINY_BASE)  # the tiny base, and the tokenizer of every size

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peer_trl_") as tmp:
        work = Path(args.work or tmp)
        results = {}
        for name in names:
            size = dataclasses.replace(SIZES[name], **(QUICK[name] if args.quick else {}))
            if args.steps:
                size = dataclasses.replace(size, steps=args.steps)
            size_dir = work / name
            size_dir.mkdir(parents=True, exist_ok=True)
            base = TINY_BASE
            if not size.pretrained:
                base = size_dir / "base"
                print(f"[{name}] building the randomly initialised base ({size.model}) ...", flush=True)
                run([sys.executable, os.path.relpath(__file__, ROOT), "--make-base", size.model, str(base)], size_dir / "base.log")
            params = count_parameters(base)
            print(f"[{name}] {params / 1e6:.1f}M parameters; megatron-r1 ...", flush=True)
            mr1 = run_megatron(size, base, size_dir)
            print(f"[{name}] megatron-r1 {mr1.step_s:.2f} s/step, {mr1.tokens_per_s:,.0f} rollout tokens/s; TRL ...", flush=True)
            trl = run_trl(size, base, size_dir, args.trl_generation)
            print(f"[{name}] TRL {trl.step_s:.2f} s/step, {trl.tokens_per_s:,.0f} rollout tokens/s ({trl.note})", flush=True)
            if not size.pretrained and abs(mr1.response_tokens - trl.response_tokens) > 0.5:
                trl.note += f"; NOT equal work: responses {mr1.response_tokens:.1f} vs {trl.response_tokens:.1f} tokens"
                print(f"[{name}] warning: {trl.note}", flush=True)
            results[name] = (size, params, mr1, trl)
    minutes = (time.perf_counter() - start) / 60

    text = body(results, minutes)
    print(f"\n## {title(results)}\n\n{text}\n")
    if args.quick:
        print("(--quick: not appended to benchmarks/RESULTS.md)")
    else:
        print("appended to", append(title(results), text))


if __name__ == "__main__":
    main()
