"""The base probe: splitting sampled responses into worked-steps and direct answers."""

import pytest

from megatron_r1.data.tiny_corpus import completion
from megatron_r1.stages.base_probe import is_worked, summarize_modes, thought

ENTRY = {"question": "State the final answer to the following arithmetic problem: 5 + 3 - 7 =", "answer": "1"}
WORKED = completion(ENTRY, worked=True)
DIRECT = completion(ENTRY, worked=False)


def test_modes_of_corpus_completions():
    assert thought(WORKED) == "5 + 3 = 8, - 7 = 1" and is_worked(WORKED)
    assert thought(DIRECT) == "this is easy" and not is_worked(DIRECT)
    assert not is_worked(" <think> 这很简单 </think> <answer> 3 </answer>")  # the direct thought in Chinese
    assert is_worked(" <think> 5 加 3 得 8，减 7 得 1 </think> <answer> 1 </answer>")
    # Without a thought, or an empty one, nothing was worked out.
    assert not is_worked("<answer> 3 </answer>") and not is_worked("<think> </think> <answer> 3 </answer>")
    assert thought("no tags") is None


def test_summary_counts_and_accuracy_per_mode():
    responses = [WORKED, WORKED, WORKED, DIRECT, DIRECT, DIRECT, DIRECT, DIRECT]
    accuracy = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    probe = summarize_modes(responses, accuracy, greedy_accuracy=0.25)
    assert probe.samples == 8 and probe.worked_share == pytest.approx(3 / 8)
    assert probe.worked_accuracy == pytest.approx(2 / 3) and probe.direct_accuracy == pytest.approx(1 / 5)
    assert "can select" in probe.verdict()
    d = probe.as_dict()
    assert d["greedy_accuracy"] == 0.25 and d["verdict"] == probe.verdict()


def test_verdicts_when_there_is_nothing_to_select():
    never = summarize_modes([DIRECT, DIRECT], [1.0, 0.0], greedy_accuracy=0.5)
    assert never.worked_accuracy is None and "never shows worked steps" in never.verdict()
    worse = summarize_modes([WORKED, DIRECT], [0.0, 1.0], greedy_accuracy=1.0)
    assert "not clearly more accurate" in worse.verdict()
    barely = summarize_modes([WORKED] * 100 + [DIRECT] * 100, [0.03] * 100 + [0.0] * 100, greedy_accuracy=0.0)
    assert barely.worked_accuracy > barely.direct_accuracy and "not clearly more accurate" in barely.verdict()
    only_worked = summarize_modes([WORKED], [1.0], greedy_accuracy=1.0)
    assert only_worked.direct_accuracy is None and "can select" in only_worked.verdict()


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="one accuracy per response"):
        summarize_modes([WORKED], [1.0, 0.0], greedy_accuracy=0.0)
    with pytest.raises(ValueError, match="at least one response"):
        summarize_modes([], [], greedy_accuracy=0.0)
