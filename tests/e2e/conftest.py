"""Shared e2e fixtures: the CLI as users run it, and one quickly pretrained tiny base model per session."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = ROOT / "conf/stages/pretrain_tiny.yaml"


def cli(*args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "megatron_r1.cli"]
    if ranks > 1:  # as users launch it
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m", "megatron_r1.cli"]
    out = subprocess.run([*launcher, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"megatron-r1 {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    """A quickly pretrained tiny base model (the real stage, 150 steps instead of 4,000)."""
    run_dir = tmp_path_factory.mktemp("tiny_base")
    cli(
        "pretrain", str(PRETRAIN), f"logging.run_dir={run_dir}", "steps=150", "logging.progress_bar=false",
        "data.eval_size=16", "pretrain.probe_samples=2", "rollout.max_response_tokens=48",
    )
    assert (run_dir / "hf/config.json").exists()
    probe = json.loads((run_dir / "pretrain_done.json").read_text())["base_probe"]
    assert probe["samples"] == 32 and 0.0 <= probe["worked_share"] <= 1.0 and 0.0 <= probe["greedy_accuracy"] <= 1.0
    return run_dir / "hf"


@pytest.fixture(scope="session")
def two_rank_run(base_model, tmp_path_factory) -> tuple[Path, list[str]]:
    """One uninterrupted R1-Zero run on 2 ranks (engine DP 2 x trainer DP 2, 2 steps, rollouts saved),
    shared by the tests that need it: the SPMD test checks its sampling and update, the Slurm smoke
    test compares a preempted and requeued run with it. Returns its run directory and the overrides
    that reproduce it."""
    from tests.e2e.test_r1_zero import STAGE, TINY_RUN

    overrides = [f"checkpoint.load_hf={base_model}", "checkpoint.base_stage=", *TINY_RUN, "logging.save_rollouts=true", "steps=2"]
    run_dir = tmp_path_factory.mktemp("two_rank") / "run"
    cli("r1-zero", str(STAGE), f"logging.run_dir={run_dir}", *overrides, ranks=2)
    return run_dir, overrides
