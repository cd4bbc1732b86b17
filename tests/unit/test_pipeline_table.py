"""The pipeline's closing table and figure read what each stage's commands wrote: the reward model's
score on general prompts at both ends of final RL, the minutes each stage took (kept across reruns),
the drops of rejection sampling, and the student baseline next to the distilled student."""

import json

import pytest

from megatron_r1.pipeline import RM_WINDOW, TIMINGS, _job_key, _table, load_pipeline, plot_pipeline, stage_row

PIPELINE = """
name: table_test
run_dir: {run_dir}
stages:
  - name: r1_zero
    run: r1-zero conf/stages/r1_zero_tiny.yaml logging.run_dir=${{stage}}
  - name: rejection_sampling
    run: rejection-sample conf/stages/rejection_sampling_tiny.yaml logging.run_dir=${{stage}}
  - name: final_rl
    run: grpo conf/stages/final_rl_tiny.yaml logging.run_dir=${{stage}}
  - name: distill
    run:
      - sft conf/stages/sft_tiny.yaml logging.run_dir=${{stage}}
      - evaluate conf/stages/r1_zero_tiny.yaml logging.run_dir=${{stage}}/eval
  - name: student_rl
    run: r1-zero conf/stages/r1_zero_tiny.yaml logging.run_dir=${{stage}}
"""


def _rl_outputs(d, base, final, language, rm_scores=()):
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"base_accuracy": base, "final_accuracy": final, "final_format_rate": 1.0,
                                                "final_response_length": 40.0, "final_language_consistency": language}))
    rows = [{"step": i + 1, "time/step": 1.0, "eval/accuracy": final, **({"reward/general/reward_model": s} if s is not None else {})}
            for i, s in enumerate(rm_scores or [None] * 3)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def finished(tmp_path):
    """A pipeline whose commands all wrote their outputs (no model runs: only what the table reads)."""
    spec = tmp_path / "p.yaml"
    spec.write_text(PIPELINE.format(run_dir=tmp_path / "run"))
    pipeline = load_pipeline(spec)
    stage = {s.name: s for s in pipeline.stages}
    _rl_outputs(stage["r1_zero"].dir, base=0.05, final=0.6, language=0.5)
    stage["rejection_sampling"].dir.mkdir(parents=True)
    (stage["rejection_sampling"].dir / "stats.json").write_text(json.dumps(
        {"kept": 300, "samples": 1000, "dropped": {"wrong_answer": 500, "mixed_language": 200, "duplicate": 0}}))
    # 12 steps of final RL: the first RM_WINDOW average 1.0, the last RM_WINDOW 3.0.
    _rl_outputs(stage["final_rl"].dir, base=0.6, final=0.62, language=0.9, rm_scores=[1.0] * RM_WINDOW + [2.0, 2.0] + [3.0] * RM_WINDOW)
    sft_dir = stage["distill"].dir
    sft_dir.mkdir(parents=True)
    (sft_dir / "summary.json").write_text(json.dumps({"final_loss": 0.3, "final_eval_loss": None, "train_conversations": 900}))
    (sft_dir / "eval").mkdir()
    (sft_dir / "eval/eval.json").write_text(json.dumps({"accuracy": 0.4, "format_rate": 1.0, "response_length": 40.0,
                                                        "language_consistency": 0.8}))
    _rl_outputs(stage["student_rl"].dir, base=0.02, final=0.2, language=0.5)
    timings = {_job_key(s, i, job): 60.0 * (n + 1) for n, s in enumerate(pipeline.stages) for i, job in enumerate(s.jobs)}
    del timings[_job_key(stage["student_rl"], 0, stage["student_rl"].jobs[0])]  # a command that never ran here
    (pipeline.run_dir / TIMINGS).write_text(json.dumps(timings))
    return pipeline, stage, timings


def test_rows_read_each_stage_s_outputs(finished):
    pipeline, stage, timings = finished
    rows = {r["stage"]: r for r in (stage_row(s, timings) for s in pipeline.stages)}
    assert rows["r1_zero"]["accuracy"] == 0.6 and rows["r1_zero"]["start_accuracy"] == 0.05
    assert "rm_score_start" not in rows["r1_zero"]  # no general prompts in R1-Zero
    assert rows["final_rl"]["rm_score_start"] == pytest.approx(1.0) and rows["final_rl"]["rm_score_end"] == pytest.approx(3.0)
    assert rows["rejection_sampling"]["dropped"]["mixed_language"] == 200 and rows["rejection_sampling"]["samples_kept"] == 300
    assert rows["distill"]["accuracy"] == 0.4 and rows["distill"]["sft_conversations"] == 900
    assert rows["distill"]["minutes"] == pytest.approx(4 + 4)  # both of its commands: 240 s each
    assert "minutes" not in rows["student_rl"]  # unknown, not guessed
    table = _table(list(rows.values()))
    assert "RM score (general)" in table and "1.00 -> 3.00 (train)" in table and "minutes" in table


def test_held_out_rm_score_is_preferred(finished):
    """With held-out general prompts evaluated (data.general_eval_size), the table shows their greedy
    responses' score at the first and last evaluation, not the training batches' few samples."""
    pipeline, stage, timings = finished
    metrics = stage["final_rl"].dir / "metrics.jsonl"
    with metrics.open("a") as f:
        for step, score in ((0, 0.5), (6, 0.9), (12, 1.7)):
            f.write(json.dumps({"step": step, "eval/accuracy": 0.6, "eval/general/reward_model": score}) + "\n")
    summary = json.loads((stage["final_rl"].dir / "summary.json").read_text())
    summary["final_general"] = {"reward_model": 1.7, "accuracy": 0.45, "language_consistency": 0.9, "format_rate": 1.0}
    (stage["final_rl"].dir / "summary.json").write_text(json.dumps(summary))
    row = stage_row(stage["final_rl"], timings)
    assert (row["rm_score_start"], row["rm_score_end"], row["rm_score_source"]) == (0.5, 1.7, "held-out")
    assert row["general_accuracy"] == 0.45
    assert "0.50 -> 1.70 | 45.0% |" in _table([row])  # with the held-out general prompts' accuracy beside it


def test_figure_has_a_panel_per_purpose(finished, tmp_path):
    pipeline, stage, timings = finished
    rows = [stage_row(s, timings) for s in pipeline.stages]
    out = tmp_path / "pipeline.png"
    plot_pipeline(pipeline, rows, out)
    assert out.stat().st_size > 20_000
    # With none of the stages' outputs, every panel says so instead of failing.
    plot_pipeline(pipeline, [{"stage": s.name} for s in pipeline.stages], tmp_path / "empty.png")
    assert (tmp_path / "empty.png").is_file()


def test_seed_table_reports_mean_range_and_each_seed(tmp_path):
    """tools/pipeline_seeds.py: one row per stage, each metric as mean (min-max; per seed)."""
    import subprocess
    import sys

    from tests.e2e.conftest import ROOT

    dirs = []
    for seed, (acc, rm_end) in enumerate([(0.40, 2.5), (0.44, 2.9), (0.42, None)]):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        stages = [{"stage": "r1_zero", "accuracy": acc, "start_accuracy": 0.04, "minutes": 2.0},
                  {"stage": "final_rl", "accuracy": acc, **({"rm_score_start": 2.0, "rm_score_end": rm_end} if rm_end else {})}]
        (d / "pipeline.json").write_text(json.dumps({"name": "p", "stages": stages}))
        dirs.append(str(d))
    out = subprocess.run([sys.executable, "tools/pipeline_seeds.py", *dirs], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "| `r1_zero` | 4.0 (4.0-4.0; 4.0, 4.0, 4.0) | 42.0 (40.0-44.0; 40.0, 44.0, 42.0) |" in out
    assert "| minutes |" in out and "2.70 (2.50-2.90; 2.50, 2.90, -)" in out  # a seed without the metric is shown as such, not averaged
    assert "minutes" not in subprocess.run([sys.executable, "tools/pipeline_seeds.py", "--no-minutes", *dirs], cwd=ROOT,
                                           capture_output=True, text=True, check=True).stdout
    (tmp_path / "seed2" / "pipeline.json").write_text(json.dumps({"name": "p", "stages": [{"stage": "r1_zero"}]}))
    bad = subprocess.run([sys.executable, "tools/pipeline_seeds.py", *dirs], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "different stages" in bad.stderr
