"""examples/rl_time_scaling/study.py without training: the sweep file, the verdict, the figure and the
table of several variants and seeds."""

import argparse
import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("study", ROOT / "examples/rl_time_scaling/study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)

ARGS = argparse.Namespace(config=None, out=None, seeds=None, steps=None, overrides=[])


def test_the_shipped_sweep_file_loads_and_every_variant_is_a_valid_config():
    spec = study.load_study(str(ROOT / "examples/rl_time_scaling/sweep.yaml"), ARGS)
    assert set(spec["variants"]) == {"grpo", "dr_grpo", "clip_higher", "group_16", "lr_5e-5"} and spec["seeds"] == [1, 2, 3]
    for overrides in spec["variants"].values():
        cfg = study.load_config(str(ROOT / spec["config"]), [*spec["overrides"], *overrides])
        assert cfg.grpo.prompts_per_step * cfg.rollout.n_samples_per_prompt == 128  # every variant samples the same batch


def test_a_bad_sweep_file_names_the_fix(tmp_path):
    bad = tmp_path / "sweep.yaml"
    bad.write_text("name: x\nvariant: {a: []}\n")
    with pytest.raises(SystemExit, match="unknown keys \\['variant'\\].*allowed"):
        study.load_study(str(bad), ARGS)
    bad.write_text("name: x\n")
    with pytest.raises(SystemExit, match="names no variants"):
        study.load_study(str(bad), ARGS)


def _write_run(out: Path, variant: str, seed: int, accuracies: list[float]) -> None:
    run = out / variant / f"seed{seed}"
    run.mkdir(parents=True)
    rows = []
    for i, a in enumerate(accuracies):
        metrics = {"accuracy": a, "sampled_accuracy": a / 2, "maj_accuracy": a, "pass_at_k": min(1.0, 2 * a), "length_mean": 10.0 + i}
        rows.append({"step": 10 * i, "wall_seconds": 5.0 * i, "k": 4, **metrics, "levels": {"5": {"n": 2, **metrics}, "8": {"n": 2, **metrics}}})
    (run / "checkpoint_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "response/length_mean": 10.0 + s}) + "\n" for s in range(1, 31)))


def test_verdict_table_and_figure_over_variants_and_seeds(tmp_path):
    _write_run(tmp_path, "grpo", 1, [0.1, 0.2, 0.4, 0.5])
    _write_run(tmp_path, "grpo", 2, [0.1, 0.3, 0.3, 0.3])
    _write_run(tmp_path, "dr_grpo", 1, [0.1, 0.1, 0.6, 0.7])
    rows = study.collect(tmp_path, ["grpo", "dr_grpo"], [1, 2])
    report = study.verdict(rows, ["grpo", "dr_grpo"])
    assert report["grpo"][1]["half_step"] == 10 and report["grpo"][1]["end_step"] == 30  # 15 is between: the earlier
    assert report["grpo"][1]["accuracy"] == {"start": 0.1, "half": 0.2, "end": 0.5, "rising_in_second_half": True}
    assert report["grpo"][2]["accuracy"]["rising_in_second_half"] is False
    assert set(report["dr_grpo"]) == {1}  # a seed that never ran is not invented
    study.write_csv(rows, tmp_path / "curve.csv")
    table = list(csv.DictReader((tmp_path / "curve.csv").open()))
    assert len(table) == 3 * 4 * 3 and {r["level"] for r in table} == {"all", "5", "8"}
    lengths = {v: study.rollout_lengths(tmp_path, v, [1, 2]) for v in ("grpo", "dr_grpo")}
    study.plot(rows, ["grpo", "dr_grpo"], tmp_path / "curve.png", "test", lengths)
    assert (tmp_path / "curve.png").stat().st_size > 10_000
