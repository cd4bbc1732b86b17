"""The RL-training-time study as users run it: `examples/rl_time_scaling/study.py run` trains a short
R1-Zero run, `megatron-r1 eval-checkpoints` evaluates each saved checkpoint through the engine, and
the curve is written. Checked against the run itself: the base and the last checkpoint, loaded
into the engine after training, score exactly what the training loop's own greedy evaluation scored
on the live policy; a rerun retrains and re-evaluates nothing."""

import csv
import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT
from tests.e2e.test_r1_zero import TINY_RUN

pytestmark = pytest.mark.slow  # the study end to end, ~1.5 minutes (`make test-slow`)

STUDY = ROOT / "examples/rl_time_scaling/study.py"


def _study(base_model, out, *extra):
    cmd = [sys.executable, str(STUDY), "run", "--seeds", "1", "--steps", "4", "--out", str(out),
           f"checkpoint.load_hf={base_model}", "checkpoint.base_stage=", *TINY_RUN, "checkpoint.save_every=2", *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def test_study_trains_evaluates_checkpoints_and_plots(base_model, tmp_path):
    out = tmp_path / "study"
    res = _study(base_model, out)
    run_dir = out / "default/seed1"
    rows = [json.loads(line) for line in (run_dir / "checkpoint_eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]

    # The evaluation after training agrees with the loop's own (greedy pass@1 is deterministic).
    summary = json.loads((run_dir / "summary.json").read_text())
    assert rows[0]["accuracy"] == summary["base_accuracy"]
    assert rows[-1]["accuracy"] == summary["final_accuracy"]
    assert rows[-1]["length_mean"] == summary["final_response_length"]
    assert rows[0]["wall_seconds"] == 0 < rows[1]["wall_seconds"] < rows[2]["wall_seconds"] <= summary["wall_seconds"]

    # Per difficulty level (data.level_key: num_terms): the levels partition the held-out set.
    levels = rows[-1]["levels"]
    assert set(levels) <= {"5", "6", "7", "8"} and sum(m["n"] for m in levels.values()) == 16
    assert abs(sum(m["n"] * m["accuracy"] for m in levels.values()) / 16 - rows[-1]["accuracy"]) < 1e-9

    table = list(csv.DictReader((out / "curve.csv").open()))
    assert {r["level"] for r in table} == {"all", *levels}
    assert (out / "curve.png").stat().st_size > 10_000
    for r in rows:  # k = 2 samples per prompt: the sampled metrics are bounded by each other
        assert 0.0 <= r["sampled_accuracy"] <= r["pass_at_k"] <= 1.0 and r["maj_accuracy"] <= r["pass_at_k"]
    verdict = json.loads((out / "study.json").read_text())["verdict"]["default"]["1"]
    assert verdict["end_step"] == 4 and verdict["half_step"] == 2
    for key in ("accuracy", "sampled_accuracy", "maj_accuracy", "pass_at_k"):
        v = verdict[key]
        assert (v["start"], v["half"], v["end"]) == (rows[0][key], rows[1][key], rows[2][key])
        assert v["rising_in_second_half"] == (rows[2][key] > rows[1][key])
    assert "greedy pass@1" in res.stdout and "sampled pass@1" in res.stdout

    # Rerunning the same command finds everything done: no training step, no evaluation row added.
    again = _study(base_model, out)
    assert "r1-zero" not in again.stdout.split("eval-checkpoints")[0]
    assert len((run_dir / "checkpoint_eval.jsonl").read_text().splitlines()) == 3
