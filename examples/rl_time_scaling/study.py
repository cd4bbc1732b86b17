"""How reasoning grows with RL training time: train R1-Zero for a budget, evaluate every saved
checkpoint on the held-out set, and plot accuracy and response length against RL steps and
wall-clock time, over seeds and configurations.

    python examples/rl_time_scaling/study.py run                       # the default study: 3 seeds on CPU
    python examples/rl_time_scaling/study.py run --seeds 1 --steps 60  # a shorter one
    python examples/rl_time_scaling/study.py sweep examples/rl_time_scaling/sweep.yaml
    python examples/rl_time_scaling/study.py plot runs/rl_time_scaling  # redraw from what is there

Each (variant, seed) is an ordinary `megatron-r1 r1-zero` run in <out>/<variant>/seed<N>, followed by
`megatron-r1 eval-checkpoints` on it; both resume, so rerunning the same command after an
interruption continues where it stopped. `--launcher 'torchrun --nproc-per-node 8'` runs them on
several ranks; `--slurm` submits them with the Slurm scripts (slurm/r1_zero.sh and
slurm/eval_checkpoints.sh, `sbatch --wait`, `--sbatch-args` passed on), e.g. with
conf/stages/r1_zero_qwen2.5_7b.yaml.

Writes <out>/curve.csv (one row per variant, seed, step and level), <out>/curve.png and
<out>/study.json (accuracy at the start, at half the budget and at the end, per seed).
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed")  # importing megatron-core on CPU

from megatron_r1.config import load_config  # noqa: E402
from megatron_r1.stages.checkpoint_eval import RESULT_FILE, read_rows  # noqa: E402

DEFAULT_CONFIG = "examples/rl_time_scaling/chain_sum_tiny.yaml"
DEFAULT_OUT = "runs/rl_time_scaling"
METRICS = ("accuracy", "sampled_accuracy", "maj_accuracy", "pass_at_k", "length_mean")
CSV_FIELDS = ["variant", "seed", "step", "wall_seconds", "level", "n", *METRICS]
# What the accuracy columns mean (evaluate.py): greedy pass@1; the mean accuracy of k samples at the
# training temperature (the paper's pass@1); majority vote over those k; any of the k right.
HEADLINE = "sampled_accuracy"  # the metric of the wall-clock and per-level panels
LABELS = {"accuracy": "greedy pass@1", "sampled_accuracy": "sampled pass@1 (mean of k)", "maj_accuracy": "maj@k", "pass_at_k": "pass@k"}


# --------------------------------------------------------------------------------------------
# Running: train, then evaluate the checkpoints, for every variant and seed.


def run_one(config: str, overrides: list[str], run_dir: Path, seed: int, launcher: list[str], slurm: list[str] | None) -> None:
    """Train (unless finished) and evaluate one seed of one variant."""
    args = [config, f"seed={seed}", f"logging.run_dir={run_dir}", *overrides]
    if not (run_dir / "summary.json").exists():
        _launch("r1-zero", args, launcher, slurm, "slurm/r1_zero.sh")
    _launch("eval-checkpoints", args, launcher, slurm, "slurm/eval_checkpoints.sh")


def _launch(command: str, args: list[str], launcher: list[str], slurm: list[str] | None, script: str) -> None:
    if slurm is not None:
        cmd = ["sbatch", "--wait", *slurm, script, *args]  # the script runs `megatron-r1 <command>` on every rank
    else:
        cmd = [*launcher, sys.executable, "-m", "megatron_r1.cli", command, *args]
    print("$", shlex.join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc:
        raise SystemExit(f"study: `{shlex.join(cmd)}` exited with {rc}; fix it and rerun the same study command (finished parts are kept)")


# --------------------------------------------------------------------------------------------
# Collecting: the rows of every run's checkpoint_eval.jsonl into one table.


def collect(out: Path, variants: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    for variant in variants:
        for seed in seeds:
            for r in read_rows(out / variant / f"seed{seed}" / RESULT_FILE):
                base = {"variant": variant, "seed": seed, "step": r["step"], "wall_seconds": r["wall_seconds"]}
                rows.append({**base, "level": "all", "n": None, **{k: r[k] for k in METRICS}})
                for level, m in r.get("levels", {}).items():
                    rows.append({**base, "level": level, "n": m["n"], **{k: m[k] for k in METRICS}})
    return rows


def rollout_lengths(out: Path, variant: str, seeds: list[int]) -> dict[int, dict[int, float]]:
    """{seed: {step: mean response length of the step's training rollouts}} from each run's metrics.jsonl
    (the length the paper plots against RL steps)."""
    lengths = {}
    for seed in seeds:
        path = out / variant / f"seed{seed}" / "metrics.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            lengths[seed] = {r["step"]: r["response/length_mean"] for r in rows if "response/length_mean" in r}
    return lengths


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})


def _series(rows: list[dict], variant: str, level: str, key: str) -> dict[int, dict[int, float]]:
    """{seed: {step: value}} of one variant and level."""
    out: dict[int, dict[int, float]] = {}
    for r in rows:
        if r["variant"] == variant and r["level"] == level:
            out.setdefault(r["seed"], {})[r["step"]] = r[key]
    return out


def _across_seeds(series: dict[int, dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps every seed reached, with the mean, minimum and maximum over seeds."""
    steps = sorted(set.intersection(*(set(s) for s in series.values()))) if series else []
    values = [[series[seed][step] for seed in series] for step in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def verdict(rows: list[dict], variants: list[str]) -> dict:
    """Per variant and seed: each accuracy metric and the response length at the start, at half the
    budget and at the end (the last checkpoint), and whether the end is above the half."""
    report = {}
    for variant in variants:
        per_seed = {}
        series = {key: _series(rows, variant, "all", key) for key in METRICS}
        for seed, by_step in series["accuracy"].items():
            steps = sorted(by_step)
            end = steps[-1]
            half = min(steps, key=lambda s: (abs(s - end / 2), s))  # the checkpoint nearest half the budget
            per_seed[seed] = {"half_step": half, "end_step": end}
            for key in METRICS:
                v = series[key][seed]
                per_seed[seed][key] = {"start": v[steps[0]], "half": v[half], "end": v[end], "rising_in_second_half": v[end] > v[half]}
        report[variant] = per_seed
    return report


def print_verdict(report: dict) -> None:
    print("\nheld-out, by seed: start -> half the budget -> end (the last checkpoint)")
    for variant, per_seed in report.items():
        for seed, v in per_seed.items():
            print(f"  {variant} seed {seed} (half: step {v['half_step']}, end: step {v['end_step']})")
            for key in METRICS:
                m = v[key]
                scale, unit = (1, " tokens") if key == "length_mean" else (100, " %")
                mark = "rising" if m["rising_in_second_half"] else "NOT rising"
                label = LABELS.get(key, "mean response length")
                print(f"    {label:<28} {scale * m['start']:6.1f}{unit} -> {scale * m['half']:6.1f}{unit} -> {scale * m['end']:6.1f}{unit}  [{mark}]")


# --------------------------------------------------------------------------------------------
# Plotting: accuracy and length against steps and wall-clock, seeds as a band.


def plot(rows: list[dict], variants: list[str], path: Path, title: str, rollout_len: dict[str, dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (acc_ax, len_ax), (wall_ax, level_ax) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, variant in enumerate(variants):
        c = colors[i % len(colors)]
        acc = _series(rows, variant, "all", "accuracy")
        if not acc:
            continue
        label = f"{variant} ({len(acc)} seed{'s' if len(acc) > 1 else ''})"
        steps, mean, lo, hi = _across_seeds(acc)
        acc_ax.plot(steps, [100 * m for m in mean], color=c, label=f"{label} greedy pass@1")
        acc_ax.fill_between(steps, [100 * v for v in lo], [100 * v for v in hi], color=c, alpha=0.2)
        for key, style in (("sampled_accuracy", "-."), ("maj_accuracy", "--")):
            steps_m, mean_m, _, _ = _across_seeds(_series(rows, variant, "all", key))
            acc_ax.plot(steps_m, [100 * m for m in mean_m], color=c, linestyle=style, label=f"{variant} {LABELS[key]}")
        steps_l, mean_l, lo_l, hi_l = _across_seeds(_series(rows, variant, "all", "length_mean"))
        len_ax.plot(steps_l, mean_l, color=c, linestyle="--", marker=".", label=f"{variant}: held-out, greedy")
        if rollout_len and rollout_len.get(variant):
            steps_r, mean_r, lo_r, hi_r = _across_seeds(rollout_len[variant])
            len_ax.plot(steps_r, mean_r, color=c, label=f"{variant}: training rollouts")
            len_ax.fill_between(steps_r, lo_r, hi_r, color=c, alpha=0.2)
        wall = _series(rows, variant, "all", "wall_seconds")
        for seed, by_step in _series(rows, variant, "all", HEADLINE).items():  # each seed on its own clock
            ws = sorted(by_step)
            wall_ax.plot([wall[seed][s] / 60 for s in ws], [100 * by_step[s] for s in ws], color=c, alpha=0.8,
                         label=label if seed == next(iter(acc)) else None)
    levels = sorted({r["level"] for r in rows if r["variant"] == variants[0] and r["level"] != "all"}, key=_numeric_first)
    for j, level in enumerate(levels):
        steps, mean, lo, hi = _across_seeds(_series(rows, variants[0], level, HEADLINE))
        level_ax.plot(steps, [100 * m for m in mean], color=colors[j % len(colors)], label=f"level {level}")
        level_ax.fill_between(steps, [100 * v for v in lo], [100 * v for v in hi], color=colors[j % len(colors)], alpha=0.15)
    acc_ax.set(xlabel="RL step", ylabel="held-out accuracy (%)", title="accuracy vs RL steps (band: seed min-max)")
    len_ax.set(xlabel="RL step", ylabel="mean response length (tokens)", title="response length vs RL steps")
    wall_ax.set(xlabel="RL wall-clock time (min)", ylabel=f"held-out {LABELS[HEADLINE]} (%)", title="accuracy vs training time (one line per seed)")
    level_ax.set(xlabel="RL step", ylabel=f"held-out {LABELS[HEADLINE]} (%)", title=f"{variants[0]}: accuracy per difficulty level")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _numeric_first(level: str):
    try:
        return (0, float(level))
    except ValueError:
        return (1, level)


# --------------------------------------------------------------------------------------------
# The study file and the command line.


def load_study(path: str | None, args: argparse.Namespace) -> dict:
    """A sweep file (name, config, out, seeds, overrides, variants: {name: [overrides]}) or the
    single-variant study `run` describes."""
    if path:
        spec = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(spec) - {"name", "config", "out", "seeds", "overrides", "variants"}
        if unknown:
            raise SystemExit(f"study: {path}: unknown keys {sorted(unknown)}; allowed: name, config, out, seeds, overrides, variants")
        if not spec.get("variants"):
            raise SystemExit(f"study: {path} names no variants; add e.g. `variants: {{grpo: [], dr_grpo: [grpo.scale_advantages_by_std=false]}}`")
    else:
        spec = {"name": "default", "variants": {"default": []}}
    spec.setdefault("config", args.config or DEFAULT_CONFIG)
    spec.setdefault("out", DEFAULT_OUT)
    spec.setdefault("seeds", [1, 2, 3])
    spec.setdefault("overrides", [])
    if args.config:
        spec["config"] = args.config
    if args.out:
        spec["out"] = args.out
    if args.seeds:
        spec["seeds"] = args.seeds
    spec["overrides"] = [*spec["overrides"], *(f"steps={args.steps}",) * bool(args.steps), *args.overrides]
    return spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="study.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["run", "sweep", "plot"])
    p.add_argument("study", nargs="?", help="sweep: the study file (examples/rl_time_scaling/sweep.yaml); plot: the output directory")
    p.add_argument("overrides", nargs="*", help="section.field=value for every run, e.g. optimizer.lr=3e-5")
    p.add_argument("--config", help=f"stage YAML (default {DEFAULT_CONFIG})")
    p.add_argument("--out", help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 1 2 3)")
    p.add_argument("--steps", type=int, help="RL steps: the budget (default: the config's)")
    p.add_argument("--launcher", default="", help="prefix for multi-rank runs, e.g. 'torchrun --nproc-per-node 2'")
    p.add_argument("--slurm", action="store_true", help="submit every run with sbatch --wait (slurm/r1_zero.sh, slurm/eval_checkpoints.sh)")
    p.add_argument("--sbatch-args", default="", help="options for sbatch with --slurm, e.g. '--nodes=32 --partition=gpu'")
    args = p.parse_intermixed_args(argv)
    if args.mode == "run" and args.study:  # `run` takes no study file: the first free word is an override
        args.overrides.insert(0, args.study)
        args.study = None
    if args.mode == "plot":
        out = Path(args.study or DEFAULT_OUT).resolve()
        spec = json.loads((out / "study.json").read_text())["spec"] if (out / "study.json").exists() else None
        if spec is None:
            raise SystemExit(f"study: {out}/study.json not found: run the study first")
    else:
        if args.mode == "sweep" and not args.study:
            raise SystemExit("study: sweep needs a study file, e.g. examples/rl_time_scaling/sweep.yaml")
        spec = load_study(args.study if args.mode == "sweep" else None, args)
        config = Path(spec["config"])
        config = (config if config.exists() else ROOT / config).resolve()  # the runs start in ROOT
        spec["config"] = str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config)
        out = Path(spec["out"]).resolve()
        out.mkdir(parents=True, exist_ok=True)
        launcher = shlex.split(args.launcher)
        for variant, variant_overrides in spec["variants"].items():
            load_config(str(config), [*spec["overrides"], *variant_overrides])  # a bad override fails now, not after hours
        for variant, variant_overrides in spec["variants"].items():
            for seed in spec["seeds"]:
                run_one(str(config), [*spec["overrides"], *variant_overrides], out / variant / f"seed{seed}", seed, launcher,
                        shlex.split(args.sbatch_args) if args.slurm else None)
    variants, seeds = list(spec["variants"]), spec["seeds"]
    rows = collect(out, variants, seeds)
    if not rows:
        raise SystemExit(f"study: no checkpoint_eval.jsonl under {out}: nothing to plot")
    write_csv(rows, out / "curve.csv")
    report = verdict(rows, variants)
    lengths = {variant: rollout_lengths(out, variant, seeds) for variant in variants}
    plot(rows, variants, out / "curve.png", f"R1-Zero GRPO over RL training time ({spec['name']}: {Path(spec['config']).name})", lengths)
    (out / "study.json").write_text(json.dumps({"spec": spec, "verdict": report}, indent=2))
    print_verdict(report)
    print(f"\n  table  {out / 'curve.csv'}\n  figure {out / 'curve.png'}\n  report {out / 'study.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
