"""The time model against published runs: the one fitted constant and the errors it leaves.

NeMo-RL v0.6's DeepSeek-V3 GRPO numbers on DGX H100 (docs/about/performance-summary.md in
NVIDIA-NeMo/RL, branch r0.6.0; tokens/s/GPU counts prompt + response tokens over every GPU of the
job, averaged over 5 steps). The 256-GPU on-policy step fits `Efficiency.train_mfu`; every other
point is predicted with that constant, never refitted:

    .venv/bin/python tools/calibrate_planner.py
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_r1.planner.timing import EFFICIENCY

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Published:
    name: str
    config: str  # under conf/reference/
    nodes: int
    step_seconds: float
    tokens_per_s_per_gpu: float
    fitted: bool = False  # the calibration point


PUBLISHED = (
    Published("256 H100, on-policy, BF16", "nemo_rl_deepseek_v3_256.yaml", 32, 134.0, 12.1, fitted=True),
    Published("512 H100, on-policy, BF16", "nemo_rl_deepseek_v3_512.yaml", 64, 111.0, 7.24),
)
# Their refit (NCCL reshard from the trainer's PP16 x EP16 to vLLM's TP32 x DP8), 2.39-2.83 s on H100.
PUBLISHED_REFIT_SECONDS = (2.39, 2.83)


def _plan(point: Published):
    from megatron_r1.config import load_config
    from megatron_r1.planner import GPUS, plan_stage

    return plan_stage(load_config(ROOT / "conf/reference" / point.config, []), point.nodes, GPUS["h100"])


def fitted_train_mfu() -> float:
    """The `train_mfu` at which the calibration point's predicted step equals the published one.
    Trainer time (logprob passes + update) scales as 1 / train_mfu; the other phases do not."""
    point = next(p for p in PUBLISHED if p.fitted)
    seconds = _plan(point).time["seconds"]
    trainer = seconds["logprob"] + seconds["train"]
    other = sum(seconds.values()) - trainer
    if point.step_seconds <= other:
        raise ValueError(f"the model's non-trainer phases alone ({other:.1f} s) exceed the published step ({point.step_seconds} s)")
    return EFFICIENCY.train_mfu * trainer / (point.step_seconds - other)


def table() -> list[dict]:
    """Predicted vs published for every point (and the refit), with the error in %."""
    rows = []
    for point in PUBLISHED:
        result = _plan(point)
        t = result.time
        rows.append({
            "run": point.name, "config": f"conf/reference/{point.config}", "nodes": point.nodes, "fitted": point.fitted,
            "published_step_seconds": point.step_seconds, "predicted_step_seconds": round(t["step_seconds"], 1),
            "step_error_pct": round(100 * (t["step_seconds"] / point.step_seconds - 1), 1),
            "published_tokens_per_s_per_gpu": point.tokens_per_s_per_gpu, "predicted_tokens_per_s_per_gpu": round(t["tokens_per_s_per_gpu"], 2),
            "tokens_error_pct": round(100 * (t["tokens_per_s_per_gpu"] / point.tokens_per_s_per_gpu - 1), 1),
            "seconds": {k: round(v, 1) for k, v in t["seconds"].items()},
        })
    refit = next(r for r in rows if r["fitted"])["seconds"]["refit"]
    low, high = PUBLISHED_REFIT_SECONDS
    rows.append({"run": "refit, 256 H100 (engine shard per GPU)", "published_refit_seconds": f"{low}-{high}", "predicted_refit_seconds": refit,
                 "refit_error_pct": round(100 * (refit / ((low + high) / 2) - 1), 1)})
    return rows
