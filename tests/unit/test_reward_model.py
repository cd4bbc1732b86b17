"""The scalar reward model (value head, Bradley-Terry, sequence-classifier export), preference pairs,
the generative judge's verdict parser."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megatron_r1.config import ParallelConfig, RewardConfig
from megatron_r1.data.preferences import PAIR_KINDS, load_preferences, synthetic_pairs
from megatron_r1.rewards.judge import NEUTRAL, Judge, parse_verdict
from megatron_r1.rewards.reward_fn import RewardFn
from megatron_r1.train.step import MicroBatch
from tests.unit.test_hf_dense import make_hf_checkpoint, small_tokenizer, tiny

OPTIONS = {"min_terms": 5, "max_terms": 8, "min_digits": 1, "max_digits": 1, "allow_negation": False}


# --------------------------------------------------------------------------------------------
# Preference pairs.


@pytest.mark.parametrize("languages,words", [((), False), (("en", "zh"), True)])
def test_synthetic_pairs_differ_in_the_property_their_kind_names(languages, words):
    """Checked with the real rewards: the chosen side is right, well formed and in the question's
    language; each rejected side fails exactly where its kind says."""
    pairs = synthetic_pairs(40, seed=11, task_options=OPTIONS, languages=languages, cot_in_words=words)
    kinds = {p.kind for p in pairs}
    assert kinds == (set(PAIR_KINDS) if words else set(PAIR_KINDS) - {"wrong_language"})
    reward = RewardFn(RewardConfig(languages=["en", "zh"]))
    items = [{"question": p.prompt} for p in pairs]
    chosen = reward([p.prompt for p in pairs], [p.chosen for p in pairs], [{**i, "answer": _answer(p.chosen)} for i, p in zip(items, pairs)])
    rejected = reward([p.prompt for p in pairs], [p.rejected for p in pairs], [{**i, "answer": _answer(p.chosen)} for i, p in zip(items, pairs)])
    assert chosen.components["accuracy"].min() == 1 and chosen.components["format"].min() == 1
    if words:
        assert chosen.components["language"].min() == 1
    for j, p in enumerate(pairs):
        c = {k: float(v[j]) for k, v in rejected.components.items()}
        if p.kind in ("wrong_answer", "guess"):
            assert c["accuracy"] == 0 and c["format"] == 1, p
        elif p.kind == "wrong_language":
            assert c["accuracy"] == 1 and c["language"] == 0, p
        else:
            assert c["accuracy"] == 1 and c["format"] == 0, p
    if words:  # questions posed in both languages
        assert any("请" in p.prompt for p in pairs) and any(p.prompt.startswith("State") for p in pairs)


def _answer(response: str) -> str:
    return response.rsplit("<answer>", 1)[1].split("</answer>")[0].strip()


def test_synthetic_pairs_are_a_pure_function_of_the_seed():
    a = synthetic_pairs(12, 5, OPTIONS, ("en", "zh"), True)
    assert a == synthetic_pairs(12, 5, OPTIONS, ("en", "zh"), True)
    assert a != synthetic_pairs(12, 6, OPTIONS, ("en", "zh"), True)


def test_malformed_preference_rows_are_skipped_and_counted(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "q", "chosen": "good", "rejected": "bad", "kind": "helpful"},
        {"question": "q2", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "same", "rejected": " same "},
        {"prompt": "q", "chosen": "a"},
        [1, 2],
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n\n")
    pairs, skipped = load_preferences(path)
    assert [(p.prompt, p.kind) for p in pairs] == [("q", "helpful"), ("q2", "user")]
    assert skipped == {"chosen_equals_rejected": 1, "missing_prompt_chosen_or_rejected": 1, "not_an_object": 1, "bad_json": 1}
    with pytest.raises(FileNotFoundError, match="reward_model.train_path"):
        load_preferences(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------------------------
# Bradley-Terry.


def test_bradley_terry_loss_and_metrics_against_hand_values():
    from megatron_r1.stages.reward_model import bradley_terry_loss_fn

    # Two pairs in rows (c0, r0, c1, r1); each row's reward sits at its `last` index.
    values = torch.tensor([[0.0, 2.0, 9.0], [0.5, 9.0, 9.0], [-1.0, 9.0, 9.0], [9.0, 9.0, 1.0]], requires_grad=True)
    last = torch.tensor([1, 0, 0, 2])
    micro = MicroBatch(tokens=torch.zeros(4, 3, dtype=torch.long), loss_mask=torch.zeros(4, 3), extras={"last": last}, num_sequences=4.0)
    loss, metrics = bradley_terry_loss_fn(values, None, micro)
    margins = torch.tensor([2.0 - 0.5, -1.0 - 1.0])
    expected = -torch.nn.functional.logsigmoid(margins).mean()
    torch.testing.assert_close(loss, expected)
    assert metrics["accuracy"].tolist() == [1.0, 1.0, 0.0, 0.0]  # per row: each pair's value twice
    torch.testing.assert_close(metrics["margin"], margins.repeat_interleave(2))
    loss.backward()
    # d/dr_c of -log sigmoid(c - r) = -(1 - sigmoid(margin)) / pairs; only the `last` entries get gradient.
    g = -(1 - torch.sigmoid(margins)) / 2
    assert values.grad[0, 1] == pytest.approx(float(g[0])) and values.grad[1, 0] == pytest.approx(-float(g[0]))
    assert values.grad.count_nonzero() == 4


# --------------------------------------------------------------------------------------------
# The model: value head, sequence-classifier export that transformers loads.


@pytest.fixture(scope="module")
def reward_model_dir(one_rank, tmp_path_factory):
    """A reward model built from a random causal LM, its head randomised, exported as a classifier."""
    from megatron_r1.models.hf.base import load_hf, save_hf
    from megatron_r1.models.reward_model import build_reward_model, reward_model_config

    root = tmp_path_factory.mktemp("rm")
    cfg = dataclasses.replace(tiny("llama+bias", tied=True), vocab_size=320)  # room for the tokenizer's 270 tokens
    lm_dir = make_hf_checkpoint(cfg, root / "lm")
    small_tokenizer(root / "tok")
    rm_cfg = reward_model_config(cfg)
    model = build_reward_model(rm_cfg, ParallelConfig()).eval()
    load_hf(model, rm_cfg, lm_dir, head="none")
    with torch.no_grad():
        model.output_layer.weight.normal_(std=0.5)
    out = save_hf(model, rm_cfg, root / "rm", tokenizer_dir=root / "tok", head="score")
    return rm_cfg, model, out


def test_reward_model_scores_equal_transformers_sequence_classifier(reward_model_dir):
    """What users load (`AutoModelForSequenceClassification`) scores like our scorer, at each row's
    last token, right-padded batches included."""
    from transformers import AutoModelForSequenceClassification

    from megatron_r1.rewards.reward_model import score_sequences

    cfg, model, out = reward_model_dir
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    g = torch.Generator().manual_seed(5)
    sequences = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (9, 17, 4)]
    ours = score_sequences(model, sequences, pad_id=0, micro_batch_size=2)
    hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = torch.stack([hf(torch.tensor([s])).logits[0, 0] for s in sequences])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours.std() > 0  # not a constant head


def test_reward_model_directory_loads_back_exactly(reward_model_dir):
    from megatron_r1.models.hf.base import load_hf
    from megatron_r1.models.reward_model import build_reward_model
    from megatron_r1.rewards.reward_model import check_reward_model_dir

    cfg, model, out = reward_model_dir
    check_reward_model_dir(out)
    again = build_reward_model(cfg, ParallelConfig())
    load_hf(again, cfg, out, head="score")
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name


def test_a_causal_lm_is_refused_as_reward_model(one_rank, tmp_path):
    from megatron_r1.config import ConfigError
    from megatron_r1.rewards.reward_model import check_reward_model_dir

    lm = make_hf_checkpoint(tiny("llama", tied=True), tmp_path / "lm")
    with pytest.raises(ConfigError, match="ForSequenceClassification with num_labels=1"):
        check_reward_model_dir(lm)
    with pytest.raises(ConfigError, match="megatron-r1 reward-model"):
        check_reward_model_dir(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------
# The generative judge.


@pytest.mark.parametrize("verdict,score", [
    ("Score: 7", 0.7), ("score = 7/10", 0.7), ("**Rating:** 6.5", 0.65), ("[[8]]", 0.8), ('{"score": 9}', 0.9),
    ("7/10", 0.7), ("85/100", 0.85), ("Score: 4/5", 0.8), ("8", 0.8), ("8\nclear and correct", 0.8), ("3.", 0.3),
    ("Score: 7. On reflection, Score: 3", 0.3),  # the last statement wins
])
def test_judge_verdicts_are_parsed(verdict, score):
    assert parse_verdict(verdict) == pytest.approx(score)


@pytest.mark.parametrize("verdict", [
    "", "   ", "The response is great", "Score: 11", "Score: -1", "-3", '{"score": "high"}', '{"score": true}',
    "  5  5 5  5", "<think> 5 + 3 = 8 </think> <answer> 8 </answer>", "Score:", "12/10", None,
])
def test_malformed_verdicts_are_none(verdict):
    assert parse_verdict(verdict) is None


def test_judge_counts_malformed_verdicts_and_scores_them_neutral():
    seen = []

    def generate(prompts):
        seen.extend(prompts)
        return ["Score: 9", "no idea", "[[2]]"]

    judge = Judge(generate)
    scores, malformed = judge(["q1", "q2", "q3"], ["r1", "r2", "r3"])
    assert scores == [0.9, NEUTRAL, 0.2] and malformed == 1
    assert "Question: q2" in seen[1] and "Response: r2" in seen[1] and seen[1].endswith("Score:")
    assert judge([], []) == ([], 0)
    with pytest.raises(ValueError, match="placeholders"):
        Judge(generate, rubric="Rate it")
