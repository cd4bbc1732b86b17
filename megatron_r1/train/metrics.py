"""Run metrics: `metrics.jsonl`, TensorBoard scalars, per-phase timing, and the summary plot.

Only the main rank writes; the other ranks get a logger whose calls do nothing, so the training
loop never needs `if rank == 0` around logging.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PHASES = ("rollout", "reward", "logprob", "train", "sync", "eval", "checkpoint")

log = logging.getLogger(__name__)


class PhaseTimer:
    """Wall seconds per phase of a step (`with timer("rollout"): ...`), plus the remainder as `other`.
    Phases nest exclusively: time in an inner phase is not also the outer one's, so the phases and
    `other` add up to the step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._start = time.perf_counter()
        self._nested: list[float] = []  # per open phase: seconds spent in phases inside it

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            self.seconds[phase] += elapsed - self._nested.pop()
            if self._nested:
                self._nested[-1] += elapsed

    def finish(self) -> dict[str, float]:
        """Metrics `time/<phase>` for this step, `time/other` and `time/step`; resets the timer."""
        total = time.perf_counter() - self._start
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out["time/other"] = max(0.0, total - sum(self.seconds.values()))
        out["time/step"] = total
        self.seconds = defaultdict(float)
        self._start = time.perf_counter()
        return out


class MetricsLogger:
    """Appends one JSON object per step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        # Non-finite values are kept, as NaN / Infinity (Python's json reads them back): a NaN loss must
        # show up in the log and the plots, not vanish.
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        bad = sorted(k for k, v in clean.items() if not math.isfinite(v))
        if bad:
            log.warning("step %d: non-finite %s", step, ", ".join(f"{k}={clean[k]}" for k in bad))
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the file has each step once."""
        if not self.enabled or not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(r + "\n" for r in rows))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(metrics_path: str | Path, out_path: str | Path, title: str = "") -> None:
    """reward, held-out accuracy and mean response length against step (and wall time) in one PNG."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    panels = [
        ("reward/mean", "train reward (mean)"),
        ("eval/accuracy", "held-out accuracy (greedy pass@1)"),
        ("response/length_mean", "mean response length (tokens)"),
    ]
    # RL training time on a second x axis: step -> minutes by interpolating the logged wall clock.
    wall_steps, wall_seconds = series("time/wall")
    if wall_steps and wall_steps[0] > 0:
        wall_steps, wall_seconds = [0, *wall_steps], [0.0, *wall_seconds]  # the RL clock starts at step 0
    wall_minutes = [w / 60.0 for w in wall_seconds]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (key, label) in zip(axes, panels):
        x, y = series(key)
        ax.plot(x, y, marker="o" if key.startswith("eval") else None, markersize=4, label="pass@1")
        ax.set_xlabel("RL step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if len(wall_steps) >= 2:
            top = ax.secondary_xaxis(
                "top",
                functions=(lambda s: np.interp(s, wall_steps, wall_minutes), lambda m: np.interp(m, wall_minutes, wall_steps)),
            )
            top.set_xlabel("RL wall time (min)", fontsize=8)
            top.tick_params(labelsize=8)
        if key == "eval/accuracy":
            xm, ym = series("eval/maj_accuracy")
            if xm:
                ax.plot(xm, ym, marker="s", markersize=3, alpha=0.7, label="maj@k")
                ax.legend()
            ax.set_ylim(0, 1)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
