"""`megatron-r1 prepare-data` as users run it, on local copies in the Hub's formats (no network here):
a GSM8K parquet split, a MATH-style jsonl, a DeepScaleR-style directory; the files it writes load
as the recipes load them and their answers score as math-verify scores the policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_r1.config import ConfigError, load_config
from megatron_r1.data.prompts import load_prompts
from megatron_r1.rewards.accuracy import math_accuracy
from megatron_r1.stages.prepare_data import convert_row, last_boxed, normalise_answer, prepare

ROOT = Path(__file__).resolve().parents[2]

GSM8K = [  # the rows of openai/gsm8k (subset "main"): a worked solution ending in "#### <number>"
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell altogether?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72"},
    {"question": "A company pays $1,200 a month. How much in a year?", "answer": "12 * 1200 = 14400\n#### 14,400"},
    {"question": "Broken row without a final answer", "answer": "no marker here"},
]
MATH = [  # hendrycks MATH / competition_math: the answer is the solution's last \boxed{}
    {"problem": "What is $\\frac{1}{2}+\\frac{1}{3}$?", "solution": "We get $\\frac{3}{6}+\\frac{2}{6}=\\boxed{\\frac{5}{6}}$.", "level": "Level 1"},
    {"problem": "Simplify $\\sqrt{8}$.", "solution": "$\\sqrt{8} = \\boxed{2\\sqrt{2}}$", "level": "Level 2"},
    {"problem": "No boxed answer.", "solution": "It is 3.", "level": "Level 1"},
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # no network here: a Hub name fails at once
    return subprocess.run([sys.executable, "-m", "megatron_r1.cli", "prepare-data", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _as_recipe_reads(train: Path, eval_: Path):
    """The prompts the GPU recipes read from these files (`data.source: jsonl`)."""
    cfg = load_config("conf/stages/r1_zero_qwen2.5_7b.yaml", [f"data.train_path={train}", f"data.eval_path={eval_}"])
    return load_prompts(cfg.data, "train"), load_prompts(cfg.data, "eval")


def test_answers_are_normalised_for_math_verify():
    assert last_boxed("a \\boxed{\\frac{1}{2}} then \\boxed{x^{2}}") == "x^{2}"
    assert normalise_answer("$\\boxed{14,400}$") == "14400"
    assert normalise_answer("  $  3.5 $ ") == "3.5"
    assert normalise_answer("(1, 2)") == "(1, 2)"  # a tuple keeps its comma
    assert convert_row({"question": "q", "answer": "work\n#### 1,234"}, "gsm8k") == ({"question": "q", "answer": "1234"}, "")
    assert convert_row({"question": "q", "answer": "no final answer"}, "gsm8k") == (None, "no_final_answer")
    assert convert_row({"problem": "p", "solution": "x = \\boxed{\\frac{5}{6}}"}, "math") == ({"question": "p", "answer": "\\frac{5}{6}"}, "")
    assert convert_row({"problem": "p", "answer": "\\frac{5}{6}"}, "qa")[0]["answer"] == "\\frac{5}{6}"
    assert convert_row({"answer": "3"}, "qa") == (None, "missing_question")
    assert convert_row({"question": "q", "answer": "}}{{\\"}, "qa") == (None, "unparseable_answer")


def test_gsm8k_parquet_and_its_test_split_become_the_recipe_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    snapshot = tmp_path / "gsm8k/main"  # as `huggingface-cli download openai/gsm8k --repo-type dataset` lays it out
    snapshot.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(GSM8K), snapshot / "train-00000-of-00001.parquet")
    test = [{"question": "Tom has 3 apples and buys 4 more. How many now?", "answer": "3 + 4 = 7\n#### 7"}]
    pq.write_table(pa.Table.from_pylist(test), snapshot / "test-00000-of-00001.parquet")
    train, eval_ = tmp_path / "data/math_train.jsonl", tmp_path / "data/math_eval.jsonl"
    out = _cli(str(tmp_path / "gsm8k"), "--out", str(train))
    assert out.returncode == 0, out.stderr
    assert "3 rows -> 2 in" in out.stdout and "no_final_answer 1" in out.stdout
    assert _cli(str(tmp_path / "gsm8k"), "--split", "test", "--out", str(eval_)).returncode == 0
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["72", "14400"]
    # What the recipe reads, and a right answer scores 1 (a wrong one 0) against it.
    train_set, eval_set = _as_recipe_reads(train, eval_)
    assert [p.answer for p in train_set.items] == ["72", "14400"] and [p.answer for p in eval_set.items] == ["7"]
    assert math_accuracy("<think>...</think> <answer>14400</answer>", train_set.items[1].answer) == 1.0
    assert math_accuracy("<think>...</think> <answer>14,401</answer>", train_set.items[1].answer) == 0.0


def test_math_jsonl_with_a_held_out_split(tmp_path):
    src = _write_jsonl(tmp_path / "math.jsonl", MATH * 4)  # 12 rows, 8 usable
    train, eval_ = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    stats = prepare(str(src), train, eval_out=eval_, eval_size=2, seed=3)
    assert stats["format"] == "math" and stats["skipped"] == {"no_boxed_answer": 4}
    assert stats["written"] == 6 and stats["held_out"] == 2
    assert math_accuracy("<answer>\\frac{10}{12}</answer>", "\\frac{5}{6}") == 1.0  # the kept form verifies as math
    assert {json.loads(line)["answer"] for line in eval_.read_text().splitlines()} <= {"\\frac{5}{6}", "2\\sqrt{2}"}


def test_deepscaler_style_directory_and_reasoning_gym(tmp_path):
    rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i), "solution": "..."} for i in range(10)]
    _write_jsonl(tmp_path / "deepscaler/train.jsonl", rows)  # a Hub snapshot with one jsonl split
    stats = prepare(str(tmp_path / "deepscaler"), tmp_path / "ds.jsonl", limit=5)
    assert stats["format"] == "qa" and stats["written"] == 5
    stats = prepare("reasoning-gym:chain_sum", tmp_path / "gym.jsonl", size=20, seed=1, task_options={"min_terms": 2, "max_terms": 3})
    gym = [json.loads(line) for line in (tmp_path / "gym.jsonl").read_text().splitlines()]
    assert stats["written"] == 20 and all(set(r) == {"question", "answer"} for r in gym)


@pytest.mark.parametrize("args, message", [
    (["nope/does-not-exist-here", "--out", "{tmp}/x.jsonl"], "cannot load 'nope/does-not-exist-here'"),
    (["{tmp}/cols.jsonl", "--out", "{tmp}/x.jsonl"], "cannot tell the layout"),
    (["{tmp}/cols.jsonl", "--out", "{tmp}"], "is a directory"),
    (["reasoning-gym:chain_sum", "--out", "{tmp}/x.jsonl", "--eval-size", "5"], "--eval-out and --eval-size go together"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    _write_jsonl(tmp_path / "cols.jsonl", [{"text": "a", "label": 1}])
    before = sorted(p.name for p in tmp_path.iterdir())
    out = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_prepare_refuses_what_it_cannot_hold_out():
    with pytest.raises(ConfigError, match="leaves no training rows"):
        prepare("reasoning-gym:chain_sum", Path("/tmp/never_written.jsonl"), size=3, eval_out=Path("/tmp/never_e.jsonl"), eval_size=3)
    assert not Path("/tmp/never_written.jsonl").exists()


def test_preference_pairs_and_general_prompts_for_the_reward_model_and_final_rl(tmp_path):
    """UltraFeedback-style chat lists, HH-RLHF transcripts, and chat prompts without answers."""
    ultra = [{"prompt": "Name a prime.", "chosen": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}],
              "rejected": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "8"}]},
             {"prompt": "Same?", "chosen": "yes", "rejected": "yes"}]
    stats = prepare(str(_write_jsonl(tmp_path / "ultra.jsonl", ultra)), tmp_path / "pairs.jsonl")
    assert stats["format"] == "preferences" and stats["skipped"] == {"identical_responses": 1}
    hh = [{"chosen": "\n\nHuman: Hello?\n\nAssistant: Hi, how can I help?", "rejected": "\n\nHuman: Hello?\n\nAssistant: What."}]
    prepare(str(_write_jsonl(tmp_path / "hh.jsonl", hh)), tmp_path / "hh_pairs.jsonl")
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines() + (tmp_path / "hh_pairs.jsonl").read_text().splitlines()]
    assert pairs == [{"prompt": "Name a prime.", "chosen": "7", "rejected": "8"}, {"prompt": "Hello?", "chosen": "Hi, how can I help?", "rejected": "What."}]
    # The reward-model stage reads them as they are written.
    from megatron_r1.data.preferences import load_preferences

    loaded, skipped = load_preferences(tmp_path / "pairs.jsonl")
    assert [(p.prompt, p.chosen, p.rejected) for p in loaded] == [("Name a prime.", "7", "8")] and not skipped

    chats = [{"messages": [{"role": "user", "content": "Write a haiku about rain."}, {"role": "assistant", "content": "..."}]}]
    stats = prepare(str(_write_jsonl(tmp_path / "chats.jsonl", chats)), tmp_path / "general.jsonl")
    assert stats["format"] == "prompts"
    cfg = load_config("conf/stages/final_rl_qwen2.5_7b.yaml", [f"data.general_path={tmp_path / 'general.jsonl'}"])
    from megatron_r1.data.prompts import load_general_prompts

    assert [p.question for p in load_general_prompts(cfg.data).items] == ["Write a haiku about rain."]
