"""eval-checkpoints' bookkeeping: difficulty levels from reasoning-gym metadata, per-level
summaries that add up to the whole, and a results file that survives a cut-off last line."""

import json

import pytest

from megatron_r1.config import ConfigError, DataConfig
from megatron_r1.data.prompts import load_prompts
from megatron_r1.stages.checkpoint_eval import level_of, read_rows, summarize
from megatron_r1.rollout.evaluation import EvalResult


def test_levels_come_from_the_task_metadata():
    items = load_prompts(DataConfig(eval_size=40), "eval").items
    levels = [level_of(p, "num_terms") for p in items]
    assert set(levels) == {"5", "6", "7", "8"}  # the default chain_sum: 5-8 terms
    assert all(int(lv) == len(p.entry["metadata"]["expression"].split()) // 2 + 1 for lv, p in zip(levels, items))
    assert level_of(items[0], "") is None
    with pytest.raises(ConfigError, match="no metadata field 'depth'.*num_terms"):
        level_of(items[0], "depth")


def test_per_level_summary_adds_up():
    rows = [{"accuracy": a, "maj": m, "sampled": a, "pass_k": m, "length": n} for a, m, n in [(1.0, 1.0, 10), (0.0, 1.0, 20), (1.0, 0.0, 30), (0.0, 0.0, 40)]]
    result = EvalResult(accuracy=0.5, maj_accuracy=0.5, format_rate=1.0, length_mean=25.0, samples=[], rows=rows)
    row = summarize(result, ["10", "9", "10", "9"])
    assert list(row["levels"]) == ["9", "10"]  # numeric order, not text order
    assert row["levels"]["10"] == {"n": 2, "accuracy": 1.0, "maj_accuracy": 0.5, "sampled_accuracy": 1.0, "pass_at_k": 0.5, "length_mean": 20.0}
    assert row["levels"]["9"] == {"n": 2, "accuracy": 0.0, "maj_accuracy": 0.5, "sampled_accuracy": 0.0, "pass_at_k": 0.5, "length_mean": 30.0}
    assert "levels" not in summarize(result, [None] * 4)


def test_results_file_keeps_complete_rows_only(tmp_path):
    path = tmp_path / "checkpoint_eval.jsonl"
    path.write_text(json.dumps({"step": 10, "accuracy": 0.5}) + "\n" + json.dumps({"step": 0, "accuracy": 0.1}) + "\n" + '{"step": 20, "accur')
    assert [r["step"] for r in read_rows(path)] == [0, 10]  # sorted; the cut-off step 20 is evaluated again
    assert read_rows(tmp_path / "missing.jsonl") == []
