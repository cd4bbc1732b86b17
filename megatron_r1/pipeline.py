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
* At the end, one row per stage from its outputs (held-out accuracy, format rate, language
  consistency, response length, samples kept, SFT loss, reward-model pair accuracy) is printed and
  written to `<run_dir>/pipeline.json`.

Stage names are the paper's: r1_zero, cold_start_sft, reasoning_rl, rejection_sampling, sft,
reward_model, final_rl, distill.
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

STAGE_NAMES = ("r1_zero", "cold_start_sft", "reasoning_rl", "rejection_sampling", "sft", "reward_model", "final_rl", "distill")
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
    `overrides` (`run_dir=...`, `launcher=...`) replace top-level keys."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pipeline file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    for o in overrides:
        key, _, value = o.partition("=")
        if key not in ("run_dir", "launcher", "name"):
            raise ConfigError(f"pipeline override {o!r}: only run_dir=, launcher= and name= can be overridden")
        data[key] = value
    unknown = set(data) - {"name", "run_dir", "launcher", "overrides", "stages"}
    if unknown:
        raise ConfigError(f"{p}: unknown keys {sorted(unknown)}; a pipeline has name, run_dir, launcher, overrides, stages")
    shared = data.get("overrides") or []
    if not isinstance(shared, list) or not all(isinstance(o, str) and "=" in o for o in shared):
        raise ConfigError(f"{p}: overrides must be a list of section.field=value strings")
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


def stage_row(stage: Stage) -> dict:
    """What the stage achieved, from its commands' outputs (later commands fill in what earlier ones left)."""
    row: dict = {"stage": stage.name}
    for job in stage.jobs:
        d = job.run_dir
        if job.command == "rejection-sample" and (d / "stats.json").is_file():
            stats = json.loads((d / "stats.json").read_text())
            row.update(samples_kept=stats["kept"], samples=stats["samples"])
        elif job.command in ("r1-zero", "grpo") and (d / "summary.json").is_file():
            s = json.loads((d / "summary.json").read_text())
            row.update(accuracy=s["final_accuracy"], format_rate=s["final_format_rate"], response_length=s["final_response_length"],
                       language_consistency=s.get("final_language_consistency"))
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


def _table(rows: list[dict]) -> str:
    cols = [("stage", "stage", "{}"), ("accuracy", "held-out acc", "{:.1%}"), ("format_rate", "format", "{:.1%}"),
            ("language_consistency", "language", "{:.1%}"), ("response_length", "length", "{:.1f}"),
            ("samples_kept", "kept", "{}"), ("sft_loss", "SFT loss", "{:.3f}"), ("eval_loss", "eval loss", "{:.3f}"),
            ("pair_accuracy", "RM pair acc", "{:.1%}")]
    header = " | ".join(title for _, title, _ in cols)
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(" | ".join(fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in cols))
    return "\n".join(lines)


def run(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """Run every unfinished command of every stage, in order; print and save the table."""
    pipeline = load_pipeline(path, overrides)
    pipeline.run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    watch = ForwardingWatch()
    for stage in pipeline.stages:
        for job in stage.jobs:
            if job.done():
                log.info("[%s] %s: done already (%s), skipped", stage.name, job.command, job.run_dir)
                continue
            if watch.received is not None:  # signalled between two commands: stop before the next
                raise Preempted(f"stopped before [{stage.name}] {job.command}; rerun the pipeline to resume")
            log.info("[%s] %s -> %s", stage.name, job.command, job.run_dir)
            _launch(pipeline, job, watch)
            if not job.done():
                raise RuntimeError(f"[{stage.name}] {job.command} exited without writing {', '.join(DONE_MARKERS[job.command])} in {job.run_dir}")
    watch.close()
    rows = [stage_row(s) for s in pipeline.stages]
    (pipeline.run_dir / "pipeline.json").write_text(json.dumps({"name": pipeline.name, "stages": rows,
                                                                "seconds": round(time.perf_counter() - start, 1)}, indent=2))
    plot_pipeline(pipeline, rows, pipeline.run_dir / "pipeline.png")
    print(f"\npipeline {pipeline.name} finished: {pipeline.run_dir}\n{_table(rows)}\n  plot: {pipeline.run_dir / 'pipeline.png'}\n", flush=True)
    return rows


def plot_pipeline(pipeline: Pipeline, rows: list[dict], out: Path) -> None:
    """Left: held-out accuracy and language consistency after each stage. Right: held-out accuracy
    against step in every RL stage (r1-zero / grpo commands), one line per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_r1.train.metrics import read_metrics

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.2))
    shown = [r for r in rows if r.get("accuracy") is not None]
    x = range(len(shown))
    for offset, key, label in ((-0.2, "accuracy", "held-out accuracy"), (0.2, "language_consistency", "language consistency")):
        bars.bar([i + offset for i in x], [100 * (r.get(key) or 0.0) for r in shown], width=0.4, label=label)
    bars.set_xticks(list(x), [r["stage"] for r in shown], rotation=20)
    bars.set_ylabel("%")
    bars.set_ylim(0, 105)
    bars.legend(loc="lower right")
    bars.set_title("after each stage (greedy, held-out)")
    for stage in pipeline.stages:
        for job in stage.jobs:
            path = job.run_dir / "metrics.jsonl"
            if job.command in ("r1-zero", "grpo") and path.is_file():
                pts = [(r["step"], 100 * r["eval/accuracy"]) for r in read_metrics(path) if "eval/accuracy" in r]
                if pts:
                    curves.plot(*zip(*pts), marker="o", markersize=3, label=stage.name)
    curves.set_xlabel("RL step")
    curves.set_ylabel("held-out accuracy (%)")
    curves.set_title("RL stages")
    curves.grid(alpha=0.3)
    curves.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
