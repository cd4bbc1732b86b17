"""Rule rewards: answer extraction, verifiers, format, language, and the guarded RewardFn."""

import logging
import math
import signal
import threading
import time

import pytest
import reasoning_gym
import torch

from megatron_r1.config import ConfigError, RewardConfig
from megatron_r1.rewards import (
    RewardFn,
    RewardTimeout,
    call_with_timeout,
    detect_language,
    extract_answer,
    extract_think,
    format_reward,
    gym_accuracy,
    language_consistency,
    load_reward_function,
    math_accuracy,
    word_languages,
)

HERE = "tests.unit.test_rewards"

# --------------------------------------------------------------------------------------------
# plug-in reward functions referenced by import path below


def length_bonus(prompt: str, response: str, item: dict) -> float:
    return min(len(response) / 100.0, 1.0)


def explodes_on_boom(prompt: str, response: str, item: dict) -> float:
    if "boom" in response:
        raise RuntimeError("kaboom")
    return 1.0


def sleeps_on_slow(prompt: str, response: str, item: dict) -> float:
    if "slow" in response:
        time.sleep(5)
    return 1.0


def returns_nan(prompt: str, response: str, item: dict) -> float:
    return float("nan")


NOT_CALLABLE = 3


# --------------------------------------------------------------------------------------------
# extraction


def test_extract_answer():
    assert extract_answer("<think>x</think> <answer>  42 \n</answer>") == "42"
    # the last block wins: models draft answers while thinking
    assert extract_answer("<think><answer>1</answer> hmm</think><answer>2</answer>") == "2"
    assert extract_answer("<answer>draft <answer>final</answer>") == "final"
    assert extract_answer("<answer></answer>") == ""
    assert extract_answer("the answer is 42") is None
    assert extract_answer("<answer>42") is None
    assert extract_answer("42</answer>") is None


def test_extract_think():
    assert extract_think("<think> a b </think><answer>1</answer>") == "a b"
    assert extract_think("pre-filled tag a b </think><answer>1</answer>") == "pre-filled tag a b"
    assert extract_think("<think> never closed") is None


# --------------------------------------------------------------------------------------------
# format

GOOD = [
    "<think>a</think><answer>1</answer>",
    "\n<think>\nlet me think\n</think>\n\n<answer> 6 </answer>\n",
]
BAD_STRICT = {
    "no think": "<answer>1</answer>",
    "text after": "<think>a</think><answer>1</answer> done",
    "text between": "<think>a</think> so <answer>1</answer>",
    "text before": "Sure! <think>a</think><answer>1</answer>",
    "two answers": "<think>a</think><answer>1</answer><answer>2</answer>",
    "empty answer": "<think>a</think><answer>  </answer>",
    "swapped": "<answer>1</answer><think>a</think>",
    "unclosed": "<think>a<answer>1</answer>",
    "no tags": "the answer is 1",
}


@pytest.mark.parametrize("text", GOOD)
def test_format_good(text):
    assert format_reward(text, "strict") == 1.0
    assert format_reward(text, "soft") == 1.0


@pytest.mark.parametrize("name", list(BAD_STRICT))
def test_format_strict_rejects(name):
    assert format_reward(BAD_STRICT[name], "strict") == 0.0
    assert format_reward(BAD_STRICT[name], "soft") < 1.0  # soft is 1.0 exactly when strict is


@pytest.mark.parametrize(
    "name, expected",
    [
        ("no think", 0.25),  # answer
        ("text after", 0.75),  # think, answer, order
        ("text between", 0.75),
        ("text before", 0.75),
        ("two answers", 0.75),  # think, order, clean (first </think> .. first <answer> is clean)
        ("empty answer", 0.75),  # think, order, clean
        ("swapped", 0.5),  # think, answer
        ("unclosed", 0.25),  # answer
        ("no tags", 0.0),
    ],
)
def test_format_soft_partial_credit(name, expected):
    assert format_reward(BAD_STRICT[name], "soft") == expected


def test_format_bad_mode():
    with pytest.raises(ValueError, match="format mode"):
        format_reward("x", "loose")


# --------------------------------------------------------------------------------------------
# accuracy


def answer(text: str) -> str:
    return f"<think>work</think><answer>{text}</answer>"


@pytest.mark.parametrize("gold", ["\\frac{1}{2}", "0.5", "1/2"])
@pytest.mark.parametrize("pred", ["1/2", "0.5", "\\frac{1}{2}", "$\\frac{1}{2}$", "\\boxed{\\frac{1}{2}}"])
def test_math_equivalent_forms(gold, pred):
    assert math_accuracy(answer(pred), gold) == 1.0


def test_math_wrong_and_missing():
    assert math_accuracy(answer("1/3"), "1/2") == 0.0
    assert math_accuracy("<think>the answer is 1/2</think>", "1/2") == 0.0  # no answer block
    assert math_accuracy(answer(""), "1/2") == 0.0
    # read as LaTeX, not as text that happens to start with the right number
    assert math_accuracy(answer("2^{1/2}"), "2") == 0.0
    assert math_accuracy(answer("2^{1/2}"), "\\sqrt{2}") == 1.0
    assert math_accuracy(answer("(1, 2)"), "2") == 0.0


def test_math_answers_with_words_and_non_math_gold():
    assert math_accuracy(answer("10 dollars"), "10") == 1.0
    assert math_accuracy(answer("x = 6"), "6") == 1.0
    # a reference math_verify cannot read is compared as normalised text
    assert math_accuracy(answer(" paris "), "Paris") == 1.0
    assert math_accuracy(answer("London"), "Paris") == 0.0


@pytest.fixture(scope="module")
def chain_sum_entry():
    ds = reasoning_gym.create_dataset(
        "chain_sum", seed=1, size=5, min_terms=5, max_terms=8, min_digits=1, max_digits=1, allow_negation=False
    )
    return ds[0]


def test_gym_accuracy(chain_sum_entry):
    gold = chain_sum_entry["answer"]
    wrong = str(int(gold) + 1)
    assert gym_accuracy(answer(gold), chain_sum_entry) == 1.0
    assert gym_accuracy(answer(f" {gold} "), chain_sum_entry) == 1.0
    assert gym_accuracy(answer(wrong), chain_sum_entry) == 0.0
    assert gym_accuracy(f"<think>{gold}</think>", chain_sum_entry) == 0.0  # no answer block
    with pytest.raises(ValueError, match="source_dataset"):
        gym_accuracy(answer(gold), {"answer": gold})


# --------------------------------------------------------------------------------------------
# language


# Real chains of thought, one language each (same-script pairs included: en/fr/de/es share Latin).
COT = {
    "en": "First I add the two numbers, then I subtract seven from the result, so the total is five.",
    "fr": "D'abord j'additionne les deux nombres, puis je soustrais sept du résultat, donc le total est cinq.",
    "de": "Zuerst addiere ich die beiden Zahlen, dann ziehe ich sieben vom Ergebnis ab, also ist die Summe fünf.",
    "es": "Primero sumo los dos números, luego resto siete del resultado, así que el total es cinco.",
    "zh": "首先把两个数相加，然后从结果中减去七，所以总数是五。",
    "ru": "Сначала я складываю два числа, затем вычитаю семь из результата, итого пять.",
}


@pytest.mark.parametrize("lang", sorted(COT))
def test_single_language_chains_score_one_in_their_language_only(lang):
    assert language_consistency(COT[lang], lang) == 1.0
    for other in COT:
        if other != lang:
            assert language_consistency(COT[lang], other) == 0.0, other


def test_mixed_chains_score_lower_than_pure_ones():
    # Code-switching at clause boundaries, as R1-Zero does: 2 English clauses, 1 French, 1 Chinese.
    mixed = ("First I add the two numbers, then I subtract seven from the result. "
             "Donc le total est cinq, 所以答案是五。")
    en = language_consistency(mixed, "en")
    assert 0.4 < en < 0.9
    assert language_consistency(mixed, "fr") > 0.1 and language_consistency(mixed, "zh") > 0.1
    assert en + language_consistency(mixed, "fr") + language_consistency(mixed, "zh") == pytest.approx(1.0)
    # French vs English mixing, same script: a Unicode-script rule would call this 100 % English.
    franglais = "I add the numbers carefully. Ensuite je vérifie le résultat avec soin."
    assert 0.3 < language_consistency(franglais, "en") < 0.7
    # Chinese characters are one word each; a Latin run inside the same letters is split off.
    assert word_languages("我们compute the sum这个") == ["zh", "zh", "en", "en", "en", "zh", "zh"]


def test_math_and_empty_chains_are_neutral():
    assert language_consistency("3 + 4 = 7, - 2 = 5", "en") == 0.0  # no words at all earns nothing
    assert language_consistency("3 + 4 = 7, so the answer is 7", "en") == 1.0  # digits neither help nor hurt
    with pytest.raises(ValueError, match="not among reward.languages"):
        language_consistency("x", "xx")


def test_detect_language_of_questions():
    assert detect_language("What is the sum of 3 and 4?") == "en"
    assert detect_language("Quelle est la somme de 3 et de 4 ?") == "fr"
    assert detect_language("Wie viel ist drei plus vier?") == "de"
    assert detect_language("计算 3 + 4 的和 (sum)") == "zh"
    assert detect_language("3 + 4") is None


def test_language_sets_are_configurable_and_checked():
    from megatron_r1.rewards.language import LanguageIdentifier

    nl_en = LanguageIdentifier(["en", "nl"])
    assert nl_en.consistency("Eerst tel ik de twee getallen op, dan trek ik zeven af.", "nl") == 1.0
    with pytest.raises(ValueError, match="not known to lingua"):
        LanguageIdentifier(["en", "klingon"])
    with pytest.raises(ValueError, match="at least two"):
        LanguageIdentifier(["en"])
    with pytest.raises(ConfigError, match="reward.languages"):
        RewardFn(RewardConfig(languages=["en", "xx"]))


# --------------------------------------------------------------------------------------------
# RewardFn


def test_reward_fn_weighted_components(chain_sum_entry):
    cfg = RewardConfig(
        accuracy_weight=1.0, format_weight=0.1, language_weight=0.5, custom={f"{HERE}:length_bonus": 2.0}
    )
    fn = RewardFn(cfg)
    gold = chain_sum_entry["answer"]
    prompts = ["p1", "p2", "p3", "p4"]
    responses = [
        answer("0.5"),  # math item, correct, strict format
        "the answer is <answer>1/3</answer>",  # math item, wrong, bad format
        answer(gold),  # gym item, correct
        f"<think>我们 think</think><answer>{gold}</answer> trailing",  # gym item, correct, bad format
    ]
    items = [
        {"question": "What is 1/2?", "answer": "\\frac{1}{2}", "entry": None},
        {"question": "What is 1/2?", "answer": "1/2", "entry": None},
        {"question": chain_sum_entry["question"], "answer": gold, "entry": chain_sum_entry},
        {"question": chain_sum_entry["question"], "answer": gold, "entry": chain_sum_entry},
    ]
    out = fn(prompts, responses, items)
    assert out.failures == 0
    assert out.components["accuracy"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert out.components["format"].tolist() == [1.0, 0.0, 1.0, 0.0]
    torch.testing.assert_close(out.components["language"], torch.tensor([1.0, 0.0, 1.0, 1 / 3]))
    bonus = torch.tensor([min(len(r) / 100, 1.0) for r in responses])
    torch.testing.assert_close(out.components[f"{HERE}:length_bonus"], bonus)
    c = out.components
    expected = c["accuracy"] + 0.1 * c["format"] + 0.5 * c["language"] + 2.0 * bonus
    torch.testing.assert_close(out.total, expected)
    assert out.total.shape == (4,) and out.total.dtype == torch.float32


def test_reward_fn_items_without_reference_score_zero_without_failure():
    out = RewardFn(RewardConfig())(["p"], [answer("5")], [{"question": "hi", "answer": None, "entry": None}])
    assert out.components["accuracy"].tolist() == [0.0] and out.failures == 0


def test_raising_custom_reward_scores_zero_and_training_goes_on(caplog):
    fn = RewardFn(RewardConfig(format_weight=0.0, custom={f"{HERE}:explodes_on_boom": 1.0}))
    responses = [answer("1"), answer("boom"), answer("boom boom"), answer("2")]
    items = [{"question": "q", "answer": "1", "entry": None}] * 4
    with caplog.at_level(logging.WARNING, logger="megatron_r1.rewards.reward_fn"):
        out = fn(["q"] * 4, responses, items)
    assert out.components[f"{HERE}:explodes_on_boom"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out.components["accuracy"].tolist() == [1.0, 0.0, 0.0, 0.0]  # other rewards still scored
    assert out.failures == 2
    assert out.total.tolist() == [2.0, 0.0, 0.0, 1.0]
    warnings = [r for r in caplog.records if "explodes_on_boom" in r.getMessage()]
    assert len(warnings) == 1 and "RuntimeError" in warnings[0].getMessage()  # once per error type


def test_slow_custom_reward_times_out():
    math_accuracy(answer("1"), "1")  # warm math_verify up so only the sleeper can be slow
    # 1.5 s: math-verify alone can take over 0.5 s on a loaded 2-core machine; the sleeper sleeps 5 s.
    fn = RewardFn(RewardConfig(timeout_s=1.5, custom={f"{HERE}:sleeps_on_slow": 1.0}))
    items = [{"question": "q", "answer": "1", "entry": None}] * 2
    # pytest-timeout may run its own SIGALRM timer: it must survive ours
    handler_before, (delay_before, _) = signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()
    out = fn(["q", "q"], [answer("slow"), answer("1")], items)
    assert time.monotonic() - start < 4.5  # interrupted, not slept for 5 s
    assert out.components[f"{HERE}:sleeps_on_slow"].tolist() == [0.0, 1.0]
    assert out.failures == 1
    assert signal.getsignal(signal.SIGALRM) is handler_before
    delay_after, _ = signal.getitimer(signal.ITIMER_REAL)
    if delay_before == 0:
        assert delay_after == 0
    else:
        assert delay_before - 5.0 < delay_after < delay_before


def test_non_finite_custom_reward_is_a_failure():
    out = RewardFn(RewardConfig(custom={f"{HERE}:returns_nan": 1.0}))(["q"], [answer("1")], [{"answer": "1"}])
    assert out.components[f"{HERE}:returns_nan"].tolist() == [0.0] and out.failures == 1
    assert math.isfinite(out.total.item())


@pytest.mark.parametrize(
    "path, fragment",
    [
        ("tests.unit.test_rewards.length_bonus", "package.module:function"),
        ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'"),
        (f"{HERE}:missing_fn", "has no attribute 'missing_fn'"),
        (f"{HERE}:NOT_CALLABLE", "not callable"),
    ],
)
def test_bad_custom_path_is_one_clear_line(path, fragment):
    with pytest.raises(ValueError) as info:
        RewardFn(RewardConfig(custom={path: 1.0}))
    message = str(info.value)
    assert fragment in message and path in message and "\n" not in message


def test_load_reward_function_by_path():
    assert load_reward_function(f"{HERE}:length_bonus") is length_bonus


# --------------------------------------------------------------------------------------------
# the time limit itself


def test_timeout_detects_a_function_that_swallows_it():
    def swallow():
        try:
            time.sleep(5)
        except Exception:
            return 1.0

    start = time.monotonic()
    with pytest.raises(RewardTimeout):
        call_with_timeout(swallow, timeout_s=0.2)
    assert time.monotonic() - start < 3.0


def test_timeout_restores_an_outer_timer():
    fired = []

    def outer_handler(signum, frame):
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, outer_handler)
    previous_timer = signal.getitimer(signal.ITIMER_REAL)  # pytest-timeout's, if any
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert call_with_timeout(lambda x: x + 1, 1, timeout_s=1.0) == 2
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0
        assert signal.getsignal(signal.SIGALRM) is outer_handler and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if previous_timer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, *previous_timer)


def test_timeout_off_the_main_thread_measures_instead():
    results = {}

    def worker():
        results["fast"] = call_with_timeout(lambda: 7, timeout_s=1.0)
        try:
            call_with_timeout(time.sleep, 0.3, timeout_s=0.05)
        except RewardTimeout as e:
            results["slow"] = str(e)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert results["fast"] == 7
    assert "measured" in results["slow"]


def test_score_split_equals_one_call_and_counts_every_failure():
    from megatron_r1.rewards.reward_fn import score_split

    fn = RewardFn(RewardConfig(format_weight=0.5, custom={f"{HERE}:explodes_on_boom": 1.0}))
    responses = [answer("1"), answer("boom"), answer("2"), answer("boom boom"), answer("1")]
    items = [{"question": "q", "answer": "1", "entry": None}] * 5
    whole = fn(["q"] * 5, responses, items)
    calls = []

    def two_workers(indices, work):  # like the two ranks of one engine: every other sample each
        parts = [work(indices[0::2]), work(indices[1::2])]
        calls.append([len(p) for p in parts])
        out = [None] * len(indices)
        out[0::2], out[1::2] = parts
        return out

    split = score_split(fn, ["q"] * 5, responses, items, two_workers)
    assert calls == [[3, 2]]
    assert split.total.tolist() == whole.total.tolist()
    assert {k: v.tolist() for k, v in split.components.items()} == {k: v.tolist() for k, v in whole.components.items()}
    assert split.failures == whole.failures == 2
