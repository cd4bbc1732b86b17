"""Data layer: templates, prompt loading and sampling, the tokenizer, the tiny pretraining corpus."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest

from megatron_r1.config import DataConfig
from megatron_r1.data import prompts as prompts_mod
from megatron_r1.data.gym import gym_seed, make_gym_dataset
from megatron_r1.data.prompts import PromptSampler, PromptSet, load_prompts
from megatron_r1.data.templates import TEMPLATES, render_prompt
from megatron_r1.data.tiny_corpus import (
    PRETRAIN_SEED,
    CorpusStream,
    completion,
    parse_chain,
    tokenizer_training_texts,
    worked_solution,
)

SMALL = DataConfig(train_size=400, eval_size=100)


# ---------------------------------------------------------------------------------------------
# templates


def test_r1_zero_template_is_the_papers():
    prompt = render_prompt("r1_zero", "What is 2 + 2?")
    assert prompt.startswith("A conversation between User and Assistant. The user asks a question, and the Assistant")
    assert "<think> reasoning process here </think> <answer> answer here </answer>." in prompt
    assert prompt.endswith("User: What is 2 + 2?. Assistant:")


def test_plain_template_and_braces_in_questions():
    assert render_prompt("plain", "x") == "x"
    assert render_prompt("plain", "is {1, 2} a set?") == "is {1, 2} a set?"
    assert set(TEMPLATES) == {"r1_zero", "plain"}


def test_unknown_template_lists_valid_names():
    with pytest.raises(ValueError, match=r"'chatml'.*plain, r1_zero"):
        render_prompt("chatml", "x")


# ---------------------------------------------------------------------------------------------
# prompts from reasoning-gym


def test_reasoning_gym_prompts():
    ps = load_prompts(SMALL, "train")
    assert isinstance(ps, PromptSet) and len(ps) == 400 and ps.skipped == 0
    item = ps[0]
    assert item.index == 0 and item.entry is not None and item.prompt_ids is None
    assert item.question == item.entry["question"] and item.answer == item.entry["answer"]
    assert item.prompt == render_prompt("r1_zero", item.question)
    assert item.as_reward_item() == {"question": item.question, "answer": item.answer, "entry": item.entry, "language": None}
    # The entry is what reasoning-gym's own scorer needs.
    import reasoning_gym

    score = reasoning_gym.get_score_answer_fn(item.entry["metadata"]["source_dataset"])
    assert score(item.answer, item.entry) == 1.0
    assert [p.question for p in load_prompts(SMALL, "train")] == [p.question for p in ps]  # deterministic


def test_default_train_and_eval_are_disjoint():
    cfg = DataConfig()
    train = {p.question for p in load_prompts(cfg, "train")}
    ev = load_prompts(cfg, "eval")
    assert len(train) > 19_000
    assert not train & {p.question for p in ev}
    assert len(ev) + ev.skip_reasons["in_train"] == cfg.eval_size
    # Why stream seeds map to blocks: reasoning-gym seeds items with seed + index, so its own seeds
    # 1000 (size 20000) and 2000 would share every eval item.
    import reasoning_gym

    lit_train = reasoning_gym.create_dataset("chain_sum", seed=1000, size=2000, **cfg.task_options)
    lit_eval = reasoning_gym.create_dataset("chain_sum", seed=2000, size=10, **cfg.task_options)
    assert lit_eval[0]["question"] == lit_train[1000]["question"]
    assert gym_seed(2000) - gym_seed(1000) >= 2**32


def test_eval_questions_seen_in_train_are_dropped_and_counted(monkeypatch, caplog):
    ev = load_prompts(SMALL, "eval")
    leaked = {ev[3].question, ev[7].question}
    monkeypatch.setattr(prompts_mod, "_train_questions", lambda cfg: leaked)
    with caplog.at_level(logging.WARNING):
        ev2 = load_prompts(SMALL, "eval")
    assert len(ev2) == len(ev) - 2 and ev2.skip_reasons == {"in_train": 2}
    assert not leaked & {p.question for p in ev2}
    assert len([r for r in caplog.records if "skipped 2" in r.getMessage()]) == 1


def test_reasoning_gym_config_errors_are_one_line():
    with pytest.raises(ValueError, match="did you mean chain_sum"):
        load_prompts(dataclasses.replace(SMALL, task="chain_sums"), "train")
    with pytest.raises(ValueError, match="max_term.*valid: min_terms"):
        load_prompts(dataclasses.replace(SMALL, task_options={"max_term": 3}), "train")
    with pytest.raises(ValueError, match="must differ"):
        load_prompts(dataclasses.replace(SMALL, eval_seed=SMALL.train_seed), "eval")
    with pytest.raises(ValueError, match="split"):
        load_prompts(SMALL, "test")


# ---------------------------------------------------------------------------------------------
# prompts from jsonl


def _jsonl_cfg(tmp_path, train_lines, eval_lines=None) -> DataConfig:
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(train_lines) + "\n")
    ev = ""
    if eval_lines is not None:
        ev = tmp_path / "eval.jsonl"
        ev.write_text("\n".join(eval_lines) + "\n")
    return DataConfig(source="jsonl", train_path=str(train), eval_path=str(ev))


def test_jsonl_skips_and_counts_malformed_rows(tmp_path, caplog):
    lines = [
        json.dumps({"question": "1 + 1 =", "answer": "2"}),
        json.dumps({"prompt": "2 + 2 =", "answer": 4}),  # "prompt" key, numeric answer: fine
        "{not json",
        json.dumps({"answer": "3"}),
        json.dumps({"question": 5, "answer": "5"}),
        json.dumps({"question": "no answer"}),
        json.dumps({"question": "list answer", "answer": [1]}),
        json.dumps(["not", "an", "object"]),
        "",
        json.dumps({"question": "3 + 3 =", "answer": "6", "extra": True}),
    ]
    with caplog.at_level(logging.WARNING):
        ps = load_prompts(_jsonl_cfg(tmp_path, lines), "train")
    assert [p.question for p in ps] == ["1 + 1 =", "2 + 2 =", "3 + 3 ="]
    assert [p.answer for p in ps] == ["2", "4", "6"]
    assert [p.index for p in ps] == [0, 1, 9] and all(p.entry is None for p in ps)
    assert ps.skipped == 6
    assert ps.skip_reasons == {
        "bad_json": 1,
        "missing_question": 1,
        "bad_question": 1,
        "missing_answer": 1,
        "bad_answer": 1,
        "not_an_object": 1,
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 6" in warnings[0]


def test_jsonl_eval_drops_train_questions(tmp_path):
    row = lambda q, a: json.dumps({"question": q, "answer": a})  # noqa: E731
    cfg = _jsonl_cfg(tmp_path, [row("a", "1"), row("b", "2")], [row("b", "2"), row("c", "3")])
    ev = load_prompts(cfg, "eval")
    assert [p.question for p in ev] == ["c"] and ev.skip_reasons == {"in_train": 1}


def test_jsonl_missing_file_is_one_clear_error(tmp_path):
    cfg = DataConfig(source="jsonl", train_path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"data.train_path: no such file .*nope.jsonl") as e:
        load_prompts(cfg, "train")
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="data.eval_path is empty"):
        load_prompts(cfg, "eval")


def test_jsonl_with_no_usable_rows_fails(tmp_path):
    with pytest.raises(ValueError, match="no usable train prompts"):
        load_prompts(_jsonl_cfg(tmp_path, ["{bad", "[]"]), "train")


# ---------------------------------------------------------------------------------------------
# sampling


def test_sampler_epochs_cover_every_prompt_once():
    ps = load_prompts(dataclasses.replace(SMALL, train_size=10), "train")
    sampler = PromptSampler(ps, batch_size=4, seed=3)
    drawn = [p.index for _ in range(5) for p in next(sampler)]  # 20 draws = 2 epochs, batches straddle them
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert drawn[:10] != drawn[10:]  # reshuffled per epoch
    assert sampler.state_dict() == {"epoch": 2, "position": 0, "seed": 3, "num_prompts": 10}
    first_other = [p.index for p in next(PromptSampler(ps, batch_size=10, seed=4))]
    assert first_other != drawn[:10]


def test_sampler_resume_continues_with_the_same_batches():
    ps = load_prompts(dataclasses.replace(SMALL, train_size=37), "train")
    run = PromptSampler(ps, batch_size=8, seed=11)
    for _ in range(6):  # 48 draws: into the second epoch, mid-epoch
        next(run)
    state = json.loads(json.dumps(run.state_dict()))  # as a checkpoint would store it
    expected = [[p.index for p in run.next_batch()] for _ in range(10)]

    resumed = PromptSampler(ps, batch_size=8, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert [[p.index for p in next(resumed)] for _ in range(10)] == expected

    with pytest.raises(ValueError, match="same data config"):
        PromptSampler(ps.items[:5], batch_size=2).load_state_dict(state)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        PromptSampler([], batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(load_prompts(dataclasses.replace(SMALL, train_size=3), "train"), batch_size=0)


# ---------------------------------------------------------------------------------------------
# tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from megatron_r1.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(tokenizer_training_texts(1500, seed=77), vocab_size=600, out_dir=out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from megatron_r1.data.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


def test_special_tokens_are_single_ids(tok):
    from megatron_r1.data.tokenizer import SPECIAL_TOKENS

    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 and tok.pad_token_id == 0
    for t in SPECIAL_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1
        assert len(tok.encode(f"x {t} y", add_special_tokens=False)) == 5  # x, space, tag, space, y
    assert tok.encode("abc", add_special_tokens=True) == tok.encode("abc", add_special_tokens=False)  # no bos/eos


def test_round_trip_and_digits(tok):
    texts = tokenizer_training_texts(20, seed=5) + ["Ünïcödé ✓ 3.14\n\ttabs  and  spaces", "-17 + 0 = -17"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text
    ids = tok.encode("1234567890 + 42", add_special_tokens=False)
    digit_tokens = [t for t in tok.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t)]
    assert digit_tokens == list("123456789042")


def test_standard_decoding_keeps_the_reasoning_tags(tok, tok_dir):
    """Evaluation harnesses decode with skip_special_tokens=True: the tags must survive it (they are
    plain added tokens, as in DeepSeek-R1's tokenizer); only the end-of-text token is special."""
    from transformers import AutoTokenizer

    text = " <think> 5 + 3 = 8 </think> <answer> 8 </answer>"
    for loaded in (tok, AutoTokenizer.from_pretrained(tok_dir)):
        ids = loaded.encode(text + "<|endoftext|>", add_special_tokens=False)
        assert loaded.decode(ids, skip_special_tokens=False) == text + "<|endoftext|>"
        assert loaded.decode(ids, skip_special_tokens=True) == text
        assert loaded.all_special_tokens == ["<|endoftext|>"]


def test_export_makes_special_tags_plain(tok_dir, tmp_path):
    """A tokenizer that lists the tags as special (trained before this rule, or a third party's) is
    exported with them plain: same ids, same tokenization, kept by standard decoding."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from megatron_r1.data.tokenizer import REASONING_TAGS, export_tokenizer

    old = tmp_path / "old"
    shutil.copytree(tok_dir, old)
    data = json.loads((old / "tokenizer.json").read_text())
    for entry in data["added_tokens"]:
        entry["special"] = True
    (old / "tokenizer.json").write_text(json.dumps(data))
    cfg = json.loads((old / "tokenizer_config.json").read_text())
    for entry in cfg.get("added_tokens_decoder", {}).values():
        entry["special"] = True
    cfg["extra_special_tokens"] = list(REASONING_TAGS)
    (old / "tokenizer_config.json").write_text(json.dumps(cfg))
    text = " <think> 5 + 3 = 8 </think> <answer> 8 </answer>"
    before = AutoTokenizer.from_pretrained(old)
    assert "<answer>" not in before.decode(before.encode(text), skip_special_tokens=True)  # the defect

    out = tmp_path / "export"
    out.mkdir()
    assert "tokenizer.json" in export_tokenizer(old, out, ["tokenizer.json", "tokenizer_config.json", "missing.json"])
    after = AutoTokenizer.from_pretrained(out)
    assert after.encode(text) == before.encode(text)
    assert after.decode(after.encode(text), skip_special_tokens=True) == text
    assert [after.convert_tokens_to_ids(t) for t in REASONING_TAGS] == [1, 2, 3, 4]


def test_reload_gives_identical_ids(tok, tok_dir, tmp_path):
    from transformers import AutoTokenizer

    from megatron_r1.data.tokenizer import load_tokenizer

    text = "".join(tokenizer_training_texts(3, seed=9))
    ids = tok.encode(text, add_special_tokens=False)
    assert json.loads((tok_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert AutoTokenizer.from_pretrained(str(tok_dir)).encode(text, add_special_tokens=False) == ids
    # Beside a Qwen2 model config, AutoTokenizer swaps the pre-tokenizer; load_tokenizer must not.
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_text((tok_dir / f).read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.encode(text, add_special_tokens=False) == ids
    assert str(reloaded.backend_tokenizer.pre_tokenizer) == str(tok.backend_tokenizer.pre_tokenizer)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


def test_prompt_and_completion_tokenize_independently(tok):
    # The trainer concatenates prompt ids and completion ids; that must equal tokenizing the whole text.
    stream = CorpusStream(seed=123, worked_share_start=0.5, worked_share_end=0.5, total_examples=50)
    for prompt, comp in stream:
        whole = tok.encode(prompt + comp, add_special_tokens=False)
        assert tok.encode(prompt, add_special_tokens=False) + tok.encode(comp, add_special_tokens=False) == whole


def test_prompts_with_tokenizer_get_ids_and_length_filter(tok):
    ps = load_prompts(dataclasses.replace(SMALL, train_size=50), "train", tokenizer=tok)
    assert len(ps) == 50 and all(p.prompt_ids == tok.encode(p.prompt, add_special_tokens=False) for p in ps)
    lengths = sorted(len(p.prompt_ids) for p in ps)
    assert lengths[-1] <= DataConfig().max_prompt_tokens
    cut = lengths[len(lengths) // 2]
    short = load_prompts(dataclasses.replace(SMALL, train_size=50, max_prompt_tokens=cut), "train", tokenizer=tok)
    assert all(len(p.prompt_ids) <= cut for p in short)
    assert len(short) + short.skip_reasons["too_long"] == 50 and short.skip_reasons["too_long"] > 0


def test_tokenizer_vocab_too_small(tmp_path):
    from megatron_r1.data.tokenizer import train_tokenizer

    with pytest.raises(ValueError, match="at least 261"):
        train_tokenizer(["a"], vocab_size=100, out_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# tiny corpus


def test_parse_chain():
    assert parse_chain("5 + 3 - 7") == (5, [("+", 3), ("-", 7)])
    assert parse_chain("5-3") == (5, [("-", 3)])
    assert parse_chain("-5 + -3 - -2") == (-5, [("+", -3), ("-", -2)])
    assert parse_chain(" 12 ") == (12, [])
    for bad in ("", "5 +", "5 * 3", "5 3", "+"):
        with pytest.raises(ValueError):
            parse_chain(bad)


@pytest.mark.parametrize(
    "options",
    [
        DataConfig().task_options,
        {"min_terms": 2, "max_terms": 9, "min_digits": 1, "max_digits": 3, "allow_negation": True},
    ],
)
def test_worked_solution_arithmetic(options):
    ds = make_gym_dataset("chain_sum", options, seed=PRETRAIN_SEED, size=1000)
    first = re.compile(r"^(-?\d+) ([+-]) (-?\d+) = (-?\d+)$")
    later = re.compile(r"^([+-]) (-?\d+) = (-?\d+)$")  # continues from the last result
    for i in range(1000):
        entry = ds[i]
        steps = worked_solution(entry).split(", ")
        a, op, b, c = first.match(steps[0]).groups()
        assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        running = int(c)
        for s in steps[1:]:
            op, b, c = later.match(s).groups()
            assert int(c) == (running + int(b) if op == "+" else running - int(b))
            running = int(c)
        assert running == int(entry["answer"])
        assert len(steps) == entry["metadata"]["num_terms"] - 1


def test_worked_solution_rejects_a_wrong_answer():
    entry = dict(make_gym_dataset("chain_sum", DataConfig().task_options, seed=1, size=1)[0])
    entry["answer"] = str(int(entry["answer"]) + 1)
    with pytest.raises(ValueError, match="entry answer"):
        worked_solution(entry)


def test_completion_format():
    entry = {"question": "State the final answer to the following arithmetic problem: 5 + 3 - 7 =", "answer": "1"}
    assert completion(entry, worked=True) == " <think> 5 + 3 = 8, - 7 = 1 </think> <answer> 1 </answer>"
    assert completion(entry, worked=False) == " <think> this is easy </think> <answer> 1 </answer>"


def test_annealing_schedule():
    stream = CorpusStream(seed=PRETRAIN_SEED, worked_share_start=0.5, worked_share_end=0.05, total_examples=4001)
    assert stream.worked_share(0) == 0.5
    assert stream.worked_share(4000) == pytest.approx(0.05)
    assert stream.worked_share(2000) == pytest.approx(0.275)
    first = sum(stream.is_worked(i) for i in range(400)) / 400  # mean share 0.478
    last = sum(stream.is_worked(i) for i in range(3601, 4001)) / 400  # mean share 0.072
    assert 0.40 < first < 0.56 and 0.03 < last < 0.12
    worked = [" = " in comp.split("</think>")[0] for _, comp in stream.examples(3900)]
    assert worked == [stream.is_worked(i) for i in range(3900, 4001)]


def test_annealing_schedule_with_a_hold():
    stream = CorpusStream(worked_share_start=1.0, worked_share_end=0.05, worked_share_hold=0.4, total_examples=1001)
    assert stream.worked_share(0) == stream.worked_share(400) == 1.0  # held for the first 40 %
    assert stream.worked_share(700) == pytest.approx(0.525) and stream.worked_share(1000) == pytest.approx(0.05)
    assert all(stream.is_worked(i) for i in range(400))
    with pytest.raises(ValueError, match="worked_share_hold"):
        CorpusStream(worked_share_hold=1.0)


def test_corpus_is_deterministic_and_resumable():
    a = list(CorpusStream(seed=5, total_examples=300))
    assert a == list(CorpusStream(seed=5, total_examples=300))
    assert a != list(CorpusStream(seed=6, total_examples=300))
    assert list(CorpusStream(seed=5, total_examples=300).examples(start=120)) == a[120:]
    prompt, comp = a[0]
    assert prompt.startswith("A conversation between User and Assistant") and prompt.endswith("=. Assistant:")
    assert comp.startswith(" <think> ") and comp.endswith(" </answer>") and "<|endoftext|>" not in comp


def test_pretraining_questions_stay_out_of_the_default_eval_set():
    ev = {p.question for p in load_prompts(DataConfig(), "eval")}
    stream = CorpusStream(total_examples=5000)  # default pretraining seed
    pretrain = {stream.entry(i)["question"] for i in range(5000)}
    assert not pretrain & ev
    # Chance collisions between different items are ruled out by excluding the eval questions.
    some = set(list(pretrain)[:25])
    filtered = CorpusStream(total_examples=5000, exclude_questions=some)
    kept = list(filtered)
    assert len(kept) == 5000 - filtered.excluded and filtered.excluded >= 25
    assert not {render_prompt("r1_zero", q) for q in some} & {p for p, _ in kept}


def test_tokenizer_training_texts():
    texts = tokenizer_training_texts(200, seed=3)
    assert len(texts) == 200 and texts == tokenizer_training_texts(200, seed=3)
    assert all("<think>" in t and "</answer>" in t for t in texts)
    assert 50 < sum(" = " in t.split("<think>")[-1] for t in texts) < 150  # about half worked


def test_worked_shares_need_a_worked_task():
    with pytest.raises(ValueError, match="worked solutions exist for chain_sum"):
        CorpusStream(task="basic_arithmetic", total_examples=10)
    with pytest.raises(ValueError, match="worked_share_start"):
        CorpusStream(worked_share_start=1.5)


# ---------------------------------------------------------------------------------------------
# two languages (data/phrasebook.py): prompts, worked steps, the corpus


def test_phrasebook_poses_questions_and_steps_in_each_language():
    from megatron_r1.data.phrasebook import localize_question, pick_language, worked_in_words

    q = "State the final answer to the following arithmetic problem: 5 + 3 - 7 ="
    assert localize_question(q, "en") == q
    assert localize_question(q, "zh") == "请给出下面算式的最终结果：5 + 3 - 7 ="
    assert localize_question(localize_question(q, "zh"), "zh") == "请给出下面算式的最终结果：5 + 3 - 7 ="
    assert worked_in_words(5, [("+", 3), ("-", 7)], [8, 1], "en") == "5 plus 3 makes 8, minus 7 makes 1"
    assert worked_in_words(5, [("+", 3), ("-", 7)], [8, 1], "zh") == "5 加 3 得 8，减 7 得 1"
    picks = [pick_language(("en", "zh"), "prompt", 7, i) for i in range(400)]
    assert picks == [pick_language(("en", "zh"), "prompt", 7, i) for i in range(400)]
    assert 150 < picks.count("zh") < 250


def test_bilingual_prompts_carry_their_language_to_the_reward():
    data = dataclasses.replace(SMALL, languages=["en", "zh"])
    prompts = load_prompts(data, "eval")
    langs = {p.language for p in prompts}
    assert langs == {"en", "zh"}
    for p in prompts:
        assert ("请给出" in p.question) == (p.language == "zh")
        assert p.as_reward_item()["language"] == p.language
        assert p.prompt.endswith(f"User: {p.question}. Assistant:")
    # Same items as the English set, posed differently: the answers are unchanged.
    english = load_prompts(SMALL, "eval")
    assert [p.answer for p in prompts] == [p.answer for p in english]


def test_languages_need_phrases_and_a_localizable_task():
    with pytest.raises(ValueError, match="no phrases for fr"):
        load_prompts(dataclasses.replace(SMALL, languages=["en", "fr"]), "eval")
    with pytest.raises(ValueError, match="English only"):
        load_prompts(dataclasses.replace(SMALL, task="basic_arithmetic", task_options={}, languages=["en", "zh"]), "eval")


def test_bilingual_corpus_thinks_in_a_language_drawn_apart_from_the_question():
    """Worked steps in words of either language, independent of the question's: the mixing that
    R1-Zero inherits and the language reward corrects."""
    from megatron_r1.rewards.format import extract_think
    from megatron_r1.rewards.language import language_identifier

    stream = CorpusStream(seed=3, worked_share_start=1.0, worked_share_end=1.0, total_examples=300,
                          languages=["en", "zh"], cot_languages=["en", "zh"])
    ident = language_identifier(("en", "zh"))
    same = 0
    for prompt, comp in stream:
        question_zh = "请给出" in prompt
        cot = extract_think(comp)
        cot_lang = ident.detect(cot)
        assert ident.consistency(cot, cot_lang) == 1.0  # one language per chain of thought
        assert re.search(r"\d+ (plus|minus|加|减) \d+ (makes|得) -?\d+", cot), cot
        same += (cot_lang == "zh") == question_zh
    assert 100 < same < 200  # about half the thoughts match their question's language


def test_symbol_corpus_is_unchanged_by_the_language_options():
    plain = list(CorpusStream(seed=3, total_examples=20))
    assert plain == list(CorpusStream(seed=3, total_examples=20, languages=[], cot_languages=[]))
    assert all("plus" not in c and "加" not in c for _, c in plain)


def test_mixed_sampler_draws_a_fixed_share_of_general_prompts_and_resumes():
    from megatron_r1.data.prompts import MixedSampler, load_general_prompts

    data = dataclasses.replace(SMALL, general_task="chain_sum", general_task_options=SMALL.task_options, general_size=50, general_share=0.25)
    reasoning, general = load_prompts(data, "train"), load_general_prompts(data)
    assert {p.source for p in general} == {"general"} and {p.source for p in reasoning} == {"reasoning"}
    assert not {p.question for p in general} & {p.question for p in reasoning}
    sampler = MixedSampler(reasoning, general, batch_size=8, share=0.25, seed=1)
    first = [sampler.next_batch() for _ in range(3)]
    assert all([p.source for p in b] == ["reasoning"] * 6 + ["general"] * 2 for b in first)
    state = sampler.state_dict()
    later = [sampler.next_batch() for _ in range(30)]  # past a general epoch (50 prompts)
    again = MixedSampler(reasoning, general, batch_size=8, share=0.25, seed=1)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert [[p.question for p in b] for b in later] == [[p.question for p in again.next_batch()] for _ in range(30)]
    with pytest.raises(ValueError, match="rounds to 0 general prompts"):
        MixedSampler(reasoning, general, batch_size=2, share=0.2)
    with pytest.raises(ValueError, match="data.general_path"):
        load_general_prompts(SMALL)
    alone = MixedSampler(reasoning, None, batch_size=8, share=0.0)
    assert "general" not in alone.state_dict()
    with pytest.raises(ValueError, match="disagree on general prompts"):
        alone.load_state_dict(state)


def test_general_prompts_from_jsonl_need_no_answer(tmp_path):
    from megatron_r1.data.prompts import load_general_prompts

    path = tmp_path / "general.jsonl"
    path.write_text('{"prompt": "Write a haiku about GPUs."}\n{"question": "Explain RL.", "answer": "", "language": "en"}\n{"answer": 3}\n')
    general = load_general_prompts(dataclasses.replace(SMALL, general_path=str(path)))
    assert [(p.question, p.answer, p.language) for p in general] == [("Write a haiku about GPUs.", "", None), ("Explain RL.", "", "en")]
    assert general.skip_reasons == {"missing_question": 1}


def test_held_out_general_prompts_never_reach_training():
    from megatron_r1.config import ConfigError
    from megatron_r1.data.prompts import hold_out_general, load_general_prompts

    data = dataclasses.replace(SMALL, general_task="chain_sum", general_task_options=SMALL.task_options, general_size=50, general_share=0.25)
    general = load_general_prompts(data)
    train, held_out = hold_out_general(general, 8)
    assert len(held_out.items) == 8 and len(train.items) == 42
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert hold_out_general(general, 0) == (general, None)
    with pytest.raises(ConfigError, match="lower it or add general prompts"):
        hold_out_general(general, 50)
    with pytest.raises(ConfigError, match="must be >= 0"):
        hold_out_general(general, -1)
