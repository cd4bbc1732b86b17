"""The reward-model stage, final RL with the reward model and with the judge, and `evaluate`, as users run them."""

import json

import pytest
import torch

from tests.e2e.conftest import cli
from tests.e2e.test_r1_zero import TINY_RUN


@pytest.fixture(scope="module")
def reward_model(base_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reward_model")
    cli("reward-model", "conf/stages/reward_model_tiny.yaml", f"checkpoint.load_hf={base_model}", "checkpoint.base_stage=",
        "reward_model.synthetic_pairs=1600", "reward_model.synthetic_eval_pairs=200", "reward_model.eval_every=0",
        "logging.progress_bar=false", f"logging.run_dir={run_dir}")
    return run_dir


def test_reward_model_ranks_held_out_pairs_far_better_than_chance(reward_model):
    s = json.loads((reward_model / "summary.json").read_text())
    assert s["steps"] == 50 and s["train_pairs"] == 1600 and s["eval_pairs"] == 200
    assert s["final_accuracy"] >= 0.75, s  # chance is 0.5
    assert s["final_accuracy"] > s["initial_accuracy"] + 0.1
    assert s["final_accuracy_by_kind"]["guess"] >= 0.9  # a missing chain of steps is the easiest tell


def test_reward_model_export_scores_like_the_run_in_transformers(reward_model):
    """The exported classifier, loaded as users load it, ranks the held-out pairs as the run measured."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from megatron_r1.data.preferences import synthetic_pairs
    from megatron_r1.data.templates import render_prompt

    hf = reward_model / "hf"
    meta = json.loads((hf / "reward_model.json").read_text())
    assert meta["template"] == "r1_zero"
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForSequenceClassification.from_pretrained(hf, dtype=torch.float32).eval()
    s = json.loads((reward_model / "summary.json").read_text())
    cfg = s["config"]
    pairs = synthetic_pairs(200, cfg["reward_model"]["eval_seed"], cfg["data"]["task_options"])

    def score(prompt: str, response: str) -> float:
        ids = tok(render_prompt("r1_zero", prompt))["input_ids"] + tok(" " + response.lstrip(), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            return float(model(torch.tensor([ids])).logits[0, 0])

    right = [score(p.prompt, p.chosen) > score(p.prompt, p.rejected) for p in pairs]
    assert sum(right) / len(right) == pytest.approx(s["final_accuracy"], abs=0.011)


def test_final_rl_rewards_general_prompts_with_the_reward_model(base_model, reward_model, tmp_path):
    run_dir = tmp_path / "final_rl"
    cli("grpo", "conf/stages/final_rl_tiny.yaml", f"checkpoint.load_hf={base_model}", f"reward.model_path={reward_model / 'hf'}",
        "data.languages=[]", "steps=2", *TINY_RUN, "grpo.prompts_per_step=8", f"logging.run_dir={run_dir}", "logging.save_rollouts=true")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["reward/general"] == pytest.approx(0.25)  # 2 of 8 prompts per step
        # General prompts are rewarded by the reward model alone (weight 1), reasoning ones by the rules.
        assert r["reward/general/mean"] == pytest.approx(r["reward/general/reward_model"], abs=1e-5)
        assert "reward/reasoning/reward_model" not in r and 0.0 <= r["reward/reasoning/accuracy"] <= 1.0
        assert 0.0 <= r["reward/general/accuracy"] <= 1.0  # the verifier's view, logged, not rewarded
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "final_rl" and summary["config"]["data"]["general_share"] == 0.25
    # The held-out general prompts (never sampled for training) are scored by the reward model at every evaluation.
    base_eval = next(r for r in rows if r["step"] == 0 and "eval/accuracy" in r)
    general = summary["final_general"]
    assert "eval/general/reward_model" in base_eval and set(general) == {"reward_model", "accuracy", "language_consistency", "format_rate"}
    assert 0.0 <= general["accuracy"] <= 1.0 and 0.0 <= general["format_rate"] <= 1.0


def test_final_rl_with_the_judge_counts_malformed_verdicts(base_model, tmp_path):
    """The tiny policy judges its own answers: it cannot follow the rubric, so its verdicts are
    malformed, counted, and score the neutral 0.5 (no push either way)."""
    run_dir = tmp_path / "judge"
    cli("grpo", "conf/stages/final_rl_tiny.yaml", f"checkpoint.load_hf={base_model}", "reward.general_scorer=judge",
        "data.languages=[]", "steps=1", *TINY_RUN, "grpo.prompts_per_step=8", f"logging.run_dir={run_dir}")
    row = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "time/step" in line][0]
    assert 0 <= row["reward/judge_malformed"] <= 8 and 0.0 <= row["reward/general/judge"] <= 1.0
    if row["reward/judge_malformed"] == 8:
        assert row["reward/general/judge"] == pytest.approx(0.5)


def test_evaluate_reports_the_held_out_metrics_of_any_model(base_model, tmp_path):
    """`evaluate` on the base gives the greedy accuracy its pretraining probe measured (same prompts, budget)."""
    out = cli("evaluate", "conf/stages/r1_zero_tiny.yaml", f"checkpoint.load_hf={base_model}", "checkpoint.base_stage=",
              "data.eval_size=16", "rollout.max_response_tokens=48", "logging.eval_samples=2", f"logging.run_dir={tmp_path}")
    result = json.loads((tmp_path / "eval.json").read_text())
    probe = json.loads((base_model.parent / "pretrain_done.json").read_text())["base_probe"]
    assert result["accuracy"] == pytest.approx(probe["greedy_accuracy"])
    assert result["eval_size"] == 16 and 0.0 <= result["format_rate"] <= 1.0 and result["response_length"] > 0
    assert "held-out evaluation" in out.stdout


def test_rejection_sampling_mixes_in_reward_model_approved_general_rows(base_model, reward_model, tmp_path):
    """Reasoning rows verified, general rows picked by the reward model, mixed by the configured ratio."""
    cli("rejection-sample", "conf/stages/rejection_sampling_tiny.yaml", f"checkpoint.load_hf={base_model}",
        "rejection.max_prompts=48", "rejection.samples_per_prompt=8", "rollout.max_response_tokens=48",
        "rejection.general_ratio=0.5", "data.general_task=chain_sum", "data.general_size=64",
        "data.general_task_options={min_terms: 5, max_terms: 8, min_digits: 1, max_digits: 1, allow_negation: false}",
        f"reward.model_path={reward_model / 'hf'}", "logging.progress_bar=false", f"logging.run_dir={tmp_path}")
    stats = json.loads((tmp_path / "stats.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    reasoning = [r for r in rows if r["source"] == "reasoning"]
    general = [r for r in rows if r["source"] == "general"]
    assert len(reasoning) == stats["kept"] > 0
    assert stats["general"]["target"] == round(0.5 * stats["kept"]) and len(general) == stats["general"]["kept"] <= stats["general"]["target"]
    assert len({r["provenance"]["index"] for r in general}) == len(general)  # keep_per_prompt=1
    assert all(isinstance(r["provenance"]["reward_model_score"], float) for r in general)
