"""`megatron-r1 pipeline PIPELINE.yaml`: the R1 stages in order, each stage's output the next one's input.

A pipeline file names its stages and, for each, the commands that produce it::

    name: r1_tiny
    run_dir: runs/r1_tiny              # stage outputs go to <run_dir>/<stage>/
    launcher: ""                       # "" runs each command with this Python; e.g. "torchrun --nproc-per-node 2"
    overrides:                         # put before every command's own overrides (which win)
      - data.languages=[en,zh]
    stages:
      - name: cold_start_sft
        run:
          - rejection-sample conf/stages/rejection_sampling_tiny.yaml checkpoint.load_hf=${r1_zero}/hf logging.run_dir=${stage}/data
          - sft conf/stages/sft_tiny.yaml sft.train_path=${stage}/data/data.jsonl logging.run_dir=${stage}

`${stage}` is this stage's directory, `${<name>}` an earlier stage's. Every command is an ordinary
`megatron-r1` command line (what it writes is what a user running it by hand would get); the
pipeline only adds the order, the paths, skipping and the closing table:

* A command whose completion marker exists (`summary.json` for r1-zero/grpo/sft/reward-model,
  `stats.json` + `data.jsonl` for rejection-sample, `eval.json` for evaluate, `pretrain_done.json`
  for pretrain) is skipped, so rerunning a finished pipeline does no work.
* An interrupted command is simply run again: it resumes from its own checkpoints.
* SIGUSR1/SIGTERM reaching the pipeline go on to the running command, which saves and exits with
  `REQUEUE_EXIT_CODE`; the pipeline then stops with that status too (a signal between commands
  stops it before the next one), so a requeued job reruns the pipeline and picks up there.
* Each finished command's wall time is kept in `<run_dir>/timings.json` (a skipped command keeps the
  time it took when it ran).
* At the end, one row per stage from its outputs (held-out accuracy, format rate, language
  consistency, response length, samples kept, SFT loss, reward-model pair accuracy, the reward
  model's score on the held-out general prompts at the first and last evaluation of an RL stage,
  minutes) is printed, written
  to `<run_dir>/pipeline.json` and drawn, one panel per stage's purpose, in `<run_dir>/pipeline.png`.

Stage names are the paper's: r1_zero, cold_start_sft, reasoning_rl, rejection_sampling, sft,
reward_model, final_rl, distill; and student_rl, the paper's baseline for distillation (the student
trained with R1-Zero RL instead).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_r1.config import ConfigError
from megatron_r1.train.preemption import REQUEUE_EXIT_CODE, ForwardingWatch, Preempted

log = logging.getLogger(__name__)

STAGE_NAMES = ("r1_zero", "cold_start_sft", "reasoning_rl", "rejection_sampling", "sft", "reward_model", "final_rl", "distill",
               "student_rl")
TIMINGS = "timings.json"  # in the pipeline's run_dir: wall seconds of every finished command
RM_WINDOW = 5  # steps averaged at each end of an RL stage for its reward-model score on general prompts
# What each command writes last, i.e. what tells that it finished.
DONE_MARKERS = {
    "r1-zero": ("summary.json",),
    "grpo": ("summary.json",),
    "reward-model": ("summary.json",),
    "evaluate": ("eval.json",),
    "sft": ("summary.json",),
    "rejection-sample": ("stats.json", "data.jsonl"),
    "pretrain": ("pretrain_done.json",),
}
_REF = re.compile(r"\$\{(\w+)\}")


@dataclass
class Job:
    command: str
    config: str
    overrides: list[str]

    @property
    def run_dir(self) -> Path:
        for o in reversed(self.overrides):
            if o.startswith("logging.run_dir="):
                return Path(o.split("=", 1)[1])
        from megatron_r1.config import load_config

        return Path(load_config(self.config).logging.run_dir)

    def done(self) -> bool:
        return all((self.run_dir / marker).is_file() for marker in DONE_MARKERS[self.command])

    def argv(self) -> list[str]:
        return [self.command, self.config, *self.overrides]


@dataclass
class Stage:
    name: str
    dir: Path
    jobs: list[Job] = field(default_factory=list)


@dataclass
class Pipeline:
    name: str
    run_dir: Path
    launcher: list[str]
    stages: list[Stage]


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Pipeline:
    """Parse and check a pipeline file; `${...}` references resolved to stage directories.
    `overrides` (`run_dir=...`, `launcher=...`, `name=...`) replace top-level keys; `seed=N` is passed to
    every command (after the file's shared overrides), for a whole pipeline on another seed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pipeline file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    seed: list[str] = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "seed":
            if not value.lstrip("-").isdigit():
                raise ConfigError(f"pipeline override {o!r}: the seed must be an integer, e.g. seed=1235")
            seed = [f"seed={value}"]
            continue
        if key not in ("run_dir", "launcher", "name"):
            raise ConfigError(f"pipeline override {o!r}: only run_dir=, launcher=, name= and seed= can be overridden")
        data[key] = value
    unknown = set(data) - {"name", "run_dir", "launcher", "overrides", "stages"}
    if unknown:
        raise ConfigError(f"{p}: unknown keys {sorted(unknown)}; a pipeline has name, run_dir, launcher, overrides, stages")
    shared = data.get("overrides") or []
    if not isinstance(shared, list) or not all(isinstance(o, str) and "=" in o for o in shared):
        raise ConfigError(f"{p}: overrides must be a list of section.field=value strings")
    shared = [*shared, *seed]
    name = str(data.get("name") or p.stem)
    run_dir = Path(data.get("run_dir") or f"runs/{name}")
    launcher = shlex.split(data.get("launcher") or "") or [sys.executable]
    paths: dict[str, Path] = {}
    stages = []
    for i, raw in enumerate(data.get("stages") or []):
        if not isinstance(raw, dict) or "name" not in raw or "run" not in raw:
            raise ConfigError(f"{p}: stage {i} needs 'name' and 'run'")
        stage_name = raw["name"]
        if stage_name not in STAGE_NAMES:
            raise ConfigError(f"{p}: stage {stage_name!r} is not one of: {', '.join(STAGE_NAMES)}")
        if stage_name in paths:
            raise ConfigError(f"{p}: stage {stage_name!r} appears twice")
        stage = Stage(stage_name, run_dir / stage_name)
        paths[stage_name] = stage.dir
        commands = raw["run"] if isinstance(raw["run"], list) else [raw["run"]]
        for line in commands:

            def resolve(match: re.Match) -> str:
                ref = match.group(1)
                if ref == "stage":
                    return str(stage.dir)
                if ref not in paths or ref == stage_name:
                    raise ConfigError(f"{p}: stage {stage_name!r} refers to ${{{ref}}}, which is not an earlier stage")
                return str(paths[ref])

            argv = shlex.split(_REF.sub(resolve, str(line)))
            if len(argv) < 2 or argv[0] not in DONE_MARKERS:
                raise ConfigError(f"{p}: stage {stage_name!r}: {line!r} must be '<command> <config> [overrides]' with a command of: {', '.join(DONE_MARKERS)}")
            stage.jobs.append(Job(argv[0], argv[1], [*shared, *argv[2:]]))
        stages.append(stage)
    if not stages:
        raise ConfigError(f"{p}: no stages")
    return Pipeline(name, run_dir, launcher, stages)


def _launch(pipeline: Pipeline, job: Job, watch: ForwardingWatch) -> None:
    argv = [*pipeline.launcher, "-m", "megatron_r1.cli", *job.argv()]
    log.info("running: %s", shlex.join(argv))
    watch.child = subprocess.Popen(argv)
    try:
        code = watch.child.wait()
    finally:
        watch.child = None
    if code == REQUEUE_EXIT_CODE:
        raise Preempted(f"'{shlex.join(job.argv())}' saved its checkpoint and stopped; rerun the pipeline to resume")
    if code != 0:
        raise RuntimeError(f"'{shlex.join(job.argv())}' failed (exit {code}); fix it and rerun the pipeline: finished stages are skipped")


def _job_key(stage: Stage, index: int, job: Job) -> str:
    return f"{stage.name}/{index}/{job.command}"


def _read_timings(run_dir: Path) -> dict[str, float]:
    path = run_dir / TIMINGS
    return json.loads(path.read_text()) if path.is_file() else {}


def _rm_scores(metrics: Path) -> tuple[float, float, str] | None:
    """The reward model's mean score on general prompts at the start and the end of an RL stage, and
    where it comes from: the held-out general prompts' greedy responses at the first and last
    evaluation (`eval/general/reward_model`, data.general_eval_size), else the training batches'
    samples over the first and last `RM_WINDOW` steps (a noisier view: a step has a few prompts)."""
    from megatron_r1.train.metrics import read_metrics

    rows = read_metrics(metrics)
    held_out = [r["eval/general/reward_model"] for r in rows if "eval/general/reward_model" in r]
    if len(held_out) >= 2:
        return held_out[0], held_out[-1], "held-out"
    scores = [r["reward/general/reward_model"] for r in rows if "reward/general/reward_model" in r]
    if not scores:
        return None
    window = min(RM_WINDOW, len(scores))
    return sum(scores[:window]) / window, sum(scores[-window:]) / window, "training"


def stage_row(stage: Stage, timings: dict[str, float] | None = None) -> dict:
    """What the stage achieved, from its commands' outputs (later commands fill in what earlier ones left)."""
    row: dict = {"stage": stage.name}
    seconds = [(timings or {}).get(_job_key(stage, i, job)) for i, job in enumerate(stage.jobs)]
    if seconds and all(t is not None for t in seconds):
        row["minutes"] = sum(seconds) / 60
    for job in stage.jobs:
        d = job.run_dir
        if job.command == "rejection-sample" and (d / "stats.json").is_file():
            stats = json.loads((d / "stats.json").read_text())
            row.update(samples_kept=stats["kept"], samples=stats["samples"], dropped=stats.get("dropped"))
        elif job.command in ("r1-zero", "grpo") and (d / "summary.json").is_file():
            s = json.loads((d / "summary.json").read_text())
            row.update(accuracy=s["final_accuracy"], format_rate=s["final_format_rate"], response_length=s["final_response_length"],
                       language_consistency=s.get("final_language_consistency"), start_accuracy=s.get("base_accuracy"))
            rm = _rm_scores(d / "metrics.jsonl")
            if rm is not None:
                row.update(rm_score_start=rm[0], rm_score_end=rm[1], rm_score_source=rm[2])
            general = s.get("final_general") or {}
            if "accuracy" in general:  # the verifier's view of the held-out general responses
                row.update(general_accuracy=general["accuracy"])
        elif job.command == "sft" and (d / "summary.json").is_file():
            s = json.loads((d / "summary.json").read_text())
            row.update(sft_loss=s["final_loss"], eval_loss=s["final_eval_loss"], sft_conversations=s["train_conversations"])
        elif job.command == "reward-model" and (d / "summary.json").is_file():
            s = json.loads((d / "summary.json").read_text())
            row.update(pair_accuracy=s["final_accuracy"])
        elif job.command == "evaluate" and (d / "eval.json").is_file():
            s = json.loads((d / "eval.json").read_text())
            row.update(accuracy=s["accuracy"], format_rate=s["format_rate"], response_length=s["response_length"],
                       language_consistency=s["language_consistency"])
    return row


def _rm_cell(row: dict) -> str | None:
    if row.get("rm_score_start") is None:
        return None
    mark = "" if row.get("rm_score_source", "held-out") == "held-out" else " (train)"
    return f"{row['rm_score_start']:.2f} -> {row['rm_score_end']:.2f}{mark}"


def _table(rows: list[dict]) -> str:
    cols = [("stage", "stage", "{}"), ("accuracy", "held-out acc", "{:.1%}"), ("format_rate", "format", "{:.1%}"),
            ("language_consistency", "language", "{:.1%}"), ("response_length", "length", "{:.1f}"),
            ("samples_kept", "kept", "{}"), ("sft_loss", "SFT loss", "{:.3f}"), ("eval_loss", "eval loss", "{:.3f}"),
            ("pair_accuracy", "RM pair acc", "{:.1%}"), ("rm_cell", "RM score (general)", "{}"),
            ("general_accuracy", "general acc", "{:.1%}"), ("minutes", "minutes", "{:.1f}")]
    header = " | ".join(title for _, title, _ in cols)
    lines = [header, "-" * len(header)]
    for r in rows:
        r = {**r, "rm_cell": _rm_cell(r)}
        lines.append(" | ".join(fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in cols))
    return "\n".join(lines)


def run(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """Run every unfinished command of every stage, in order; print and save the table."""
    pipeline = load_pipeline(path, overrides)
    pipeline.run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    watch = ForwardingWatch()
    timings = _read_timings(pipeline.run_dir)
    for stage in pipeline.stages:
        for index, job in enumerate(stage.jobs):
            if job.done():
                log.info("[%s] %s: done already (%s), skipped", stage.name, job.command, job.run_dir)
                continue
            if watch.received is not None:  # signalled between two commands: stop before the next
                raise Preempted(f"stopped before [{stage.name}] {job.command}; rerun the pipeline to resume")
            log.info("[%s] %s -> %s", stage.name, job.command, job.run_dir)
            began = time.perf_counter()
            _launch(pipeline, job, watch)
            if not job.done():
                raise RuntimeError(f"[{stage.name}] {job.command} exited without writing {', '.join(DONE_MARKERS[job.command])} in {job.run_dir}")
            # A resumed command's time is only its last run's; the table says minutes of the runs it saw.
            timings[_job_key(stage, index, job)] = round(time.perf_counter() - began, 1)
            (pipeline.run_dir / TIMINGS).write_text(json.dumps(timings, indent=2))
    watch.close()
    rows = [stage_row(s, timings) for s in pipeline.stages]
    (pipeline.run_dir / "pipeline.json").write_text(json.dumps({"name": pipeline.name, "stages": rows,
                                                                "seconds": round(time.perf_counter() - start, 1)}, indent=2))
    plot_pipeline(pipeline, rows, pipeline.run_dir / "pipeline.png")
    print(f"\npipeline {pipeline.name} finished: {pipeline.run_dir}\n{_table(rows)}\n  plot: {pipeline.run_dir / 'pipeline.png'}\n", flush=True)
    return rows


def plot_pipeline(pipeline: Pipeline, rows: list[dict], out: Path) -> None:
    """One panel per purpose: RL accuracy over steps; accuracy and chain-of-thought language
    consistency after each stage; what rejection sampling kept and dropped; the reward model's score
    on general prompts over final RL; the distilled student against the same student trained with RL."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_r1.train.metrics import read_metrics

    by_name = {r["stage"]: r for r in rows}
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.4))
    (curves, accuracy, language), (kept, rm, distill) = axes

    def empty(ax, title: str) -> None:
        ax.set_title(title)
        ax.text(0.5, 0.5, "no such stage in this pipeline", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xticks([])
        ax.set_yticks([])

    def bars(ax, labels: list[str], values: list[float], title: str, ylabel: str = "%", color=None) -> None:
        ax.bar(range(len(values)), values, color=color)
        for i, v in enumerate(values):
            ax.text(i, v + 1, f"{v:.1f}", ha="center", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel(ylabel)
        ax.set_title(title)

    # RL stages, each metrics file read once: held-out accuracy and (final RL) the reward model's score per step.
    rm_series = []
    for stage in pipeline.stages:
        for job in stage.jobs:
            path = job.run_dir / "metrics.jsonl"
            if job.command in ("r1-zero", "grpo") and path.is_file():
                metrics = read_metrics(path)
                pts = [(r["step"], 100 * r["eval/accuracy"]) for r in metrics if "eval/accuracy" in r]
                if pts:
                    curves.plot(*zip(*pts), marker="o", markersize=3, label=stage.name)
                scores = [(r["step"], r["reward/general/reward_model"]) for r in metrics if "reward/general/reward_model" in r]
                held_out = [(r["step"], r["eval/general/reward_model"]) for r in metrics if "eval/general/reward_model" in r]
                if scores or held_out:
                    rm_series.append((stage.name, scores, held_out))
    curves.set_xlabel("RL step")
    curves.set_ylabel("held-out accuracy (%)")
    curves.set_title("RL stages: accuracy over training")
    curves.grid(alpha=0.3)
    if curves.lines:
        curves.legend(fontsize=8)

    # Accuracy and language consistency after each stage (the base first, when the pipeline starts at R1-Zero).
    shown = [r for r in rows if r.get("accuracy") is not None]
    base = by_name.get("r1_zero", {}).get("start_accuracy")
    labels = (["base"] if base is not None else []) + [r["stage"] for r in shown]
    if shown:
        bars(accuracy, labels, [100 * v for v in ([base] if base is not None else []) + [r["accuracy"] for r in shown]],
             "held-out accuracy after each stage (greedy)")
        consistent = [r for r in shown if r.get("language_consistency") is not None]
        if consistent:
            bars(language, [r["stage"] for r in consistent], [100 * r["language_consistency"] for r in consistent],
                 "chain-of-thought language consistency\n(cold start and the language reward raise it)", color="tab:orange")
        else:
            empty(language, "chain-of-thought language consistency")
    else:
        empty(accuracy, "held-out accuracy after each stage")
        empty(language, "chain-of-thought language consistency")

    # Rejection sampling: kept samples and each reason for a drop.
    sampled = [r for r in rows if r.get("samples") is not None]
    if sampled:
        reasons = sorted({k for r in sampled for k, v in (r.get("dropped") or {}).items() if v})
        bottom = [0.0] * len(sampled)
        for name, values in [("kept", [r["samples_kept"] for r in sampled]),
                             *[(k, [(r.get("dropped") or {}).get(k, 0) for r in sampled]) for k in reasons]]:
            kept.bar(range(len(sampled)), values, bottom=bottom, label=name.replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, values)]
        kept.set_xticks(range(len(sampled)), [r["stage"] for r in sampled], rotation=20, fontsize=8)
        kept.set_ylabel("samples")
        kept.set_title("rejection sampling: kept and dropped")
        kept.legend(fontsize=7)
    else:
        empty(kept, "rejection sampling: kept and dropped")

    # Final RL: the reward model's score on general prompts: held out (greedy, each evaluation) and the
    # training batches' samples (per step, faint, with a trailing mean).
    for name, pts, held_out in rm_series:
        if held_out:
            rm.plot(*zip(*held_out), marker="o", markersize=4, label=f"{name}: held-out prompts (greedy)")
        if pts:
            steps, scores = zip(*pts)
            rm.plot(steps, scores, alpha=0.25, label=f"{name}: training samples (per step)")
            sums = np.cumsum([0.0, *scores])
            w = np.minimum(np.arange(1, len(scores) + 1), RM_WINDOW)
            rm.plot(steps, (sums[1:] - sums[np.arange(1, len(scores) + 1) - w]) / w, alpha=0.7,
                    label=f"{name}: training samples ({RM_WINDOW}-step mean)")
    if rm_series:
        rm.set_xlabel("RL step")
        rm.set_ylabel("reward-model score")
        rm.set_title("final RL: reward-model score on general prompts")
        rm.grid(alpha=0.3)
        rm.legend(fontsize=8)
    else:
        empty(rm, "final RL: reward-model score on general prompts")

    # Distillation against RL on the same student.
    student = by_name.get("student_rl", {})
    labels, values = [], []
    if student.get("start_accuracy") is not None:
        labels.append("student base")
        values.append(100 * student["start_accuracy"])
    for name, label in (("student_rl", "student + R1-Zero RL"), ("distill", "student distilled")):
        if by_name.get(name, {}).get("accuracy") is not None:
            minutes = by_name[name].get("minutes")
            labels.append(label + (f"\n{minutes:.1f} min" if minutes is not None else ""))
            values.append(100 * by_name[name]["accuracy"])
    if values:
        bars(distill, labels, values, "distillation vs RL on the small model", color="tab:green")
    else:
        empty(distill, "distillation vs RL on the small model")
    fig.suptitle(f"pipeline {pipeline.name}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
