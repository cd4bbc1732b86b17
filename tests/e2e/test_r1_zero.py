"""R1-Zero end to end on CPU: tiny base model -> GRPO with the colocated vLLM engine -> contract files;
and resume: a run stopped after step k and restarted reaches step k+1 with the same loss."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "conf/stages/r1_zero_tiny.yaml"
PRETRAIN = ROOT / "conf/stages/pretrain_tiny.yaml"

# Small but complete: every phase runs, including eval, checkpoint, probe and export.
TINY_RUN = [
    "grpo.prompts_per_step=4",
    "rollout.n_samples_per_prompt=4",
    "rollout.max_response_tokens=48",
    "data.eval_size=16",
    "logging.eval_every=2",
    "logging.eval_samples=2",
    "logging.progress_bar=false",
    "checkpoint.save_every=2",
]


def _cli(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "megatron_r1.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"megatron-r1 {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A quickly pretrained tiny base model (the real stage, with a short time budget)."""
    run_dir = tmp_path_factory.mktemp("tiny_base")
    _cli(
        "pretrain", str(PRETRAIN), f"logging.run_dir={run_dir}", "extra.time_budget_s=20", "logging.progress_bar=false",
        "data.eval_size=16", "extra.probe_samples=2", "rollout.max_response_tokens=48",
    )
    assert (run_dir / "hf/config.json").exists()
    probe = json.loads((run_dir / "pretrain_done.json").read_text())["base_probe"]
    assert probe["samples"] == 32 and 0.0 <= probe["worked_share"] <= 1.0 and 0.0 <= probe["greedy_accuracy"] <= 1.0
    return run_dir / "hf"


def _r1_zero(run_dir: Path, base: Path, *extra: str) -> subprocess.CompletedProcess:
    return _cli("r1-zero", str(STAGE), f"logging.run_dir={run_dir}", f"checkpoint.load_hf={base}", "extra.base_stage=", *TINY_RUN, *extra)


def _rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}


def test_contract_files(base_model, tmp_path):
    run_dir = tmp_path / "run"
    out = _r1_zero(run_dir, base_model, "steps=4")
    assert "held-out accuracy" in out.stdout  # the closing table

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("base_accuracy", "final_accuracy", "steps", "wall_seconds", "task", "prompt_template"):
        assert key in summary, key
    assert summary["steps"] == 4 and summary["task"]["name"] == "chain_sum"
    assert "{question}" in summary["prompt_template"]
    assert 0.0 <= summary["final_accuracy"] <= 1.0

    rows = _rows(run_dir)
    assert sorted(rows) == [1, 2, 3, 4]
    for key in ("reward/mean", "reward/accuracy", "response/length_mean", "train/grad_norm", "train/clip_fraction",
                "train/entropy", "time/rollout", "time/train", "time/sync", "sync/logprob_abs_diff_max"):
        assert key in rows[1], key
    assert rows[4]["sync/logprob_abs_diff_max"] < 1e-3  # vLLM holds exactly the trained policy

    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "plot.png").stat().st_size > 10_000
    assert (run_dir / "checkpoints/latest").read_text().strip() == "4"

    # The exported policy loads in transformers.
    from transformers import AutoModelForCausalLM

    from megatron_r1.data.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    tok = load_tokenizer(run_dir / "hf")
    assert model.config.vocab_size >= len(tok)


def test_resume_reaches_the_same_loss(base_model, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _r1_zero(straight, base_model, "steps=3", "logging.eval_every=0")
    _r1_zero(resumed, base_model, "steps=2", "logging.eval_every=0", "checkpoint.save_every=1")
    _r1_zero(resumed, base_model, "steps=3", "logging.eval_every=0", "checkpoint.save_every=1")
    a, b = _rows(straight), _rows(resumed)
    assert sorted(b) == [1, 2, 3]  # each step logged once
    for key in ("train/loss", "train/grad_norm", "reward/mean"):
        assert b[3][key] == pytest.approx(a[3][key], abs=1e-5), key
