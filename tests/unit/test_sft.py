"""SFT data and packing: response-only masks, chat templates, malformed rows, and packed rows that
train exactly like the same conversations one per row (loss, gradients, per-token logprobs)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_r1.config import ConfigError, ModelConfig, OptimizerConfig, ParallelConfig, load_config
from megatron_r1.data.sft import (
    Example,
    SFTDataError,
    encode_conversation,
    epoch_rows,
    load_sft_dataset,
    pack,
    resolve_template,
)
from megatron_r1.data.templates import render_prompt
from megatron_r1.data.tiny_corpus import tokenizer_training_texts
from megatron_r1.data.tokenizer import load_tokenizer, train_tokenizer
from megatron_r1.distributed import init_distributed
from megatron_r1.models.build import build_model
from megatron_r1.train.optim import build_optimizer
from megatron_r1.stages.sft import collate, schedule
from megatron_r1.train.step import forward_backward, lm_loss_fn, packed_attention

PARALLEL = ParallelConfig()
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(tokenizer_training_texts(400, seed=5), 512, out)
    return load_tokenizer(out)


@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = load_tokenizer(tokenizer.name_or_path)
    tok.chat_template = CHATML
    return tok


def _jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_prompt_template_masks_the_response_and_eos_only(tokenizer):
    ex, reason = encode_conversation(
        [{"role": "user", "content": "3 + 4 ="}, {"role": "assistant", "content": "<think> 3 + 4 = 7 </think> <answer> 7 </answer>"}],
        tokenizer, "r1_zero")
    assert reason == ""
    prompt_ids = tokenizer.encode(render_prompt("r1_zero", "3 + 4 ="))
    assert ex.ids[: len(prompt_ids)] == prompt_ids and ex.ids[-1] == tokenizer.eos_token_id
    assert ex.loss_mask == [0] * len(prompt_ids) + [1] * (len(ex.ids) - len(prompt_ids))
    trained = [i for i, m in zip(ex.ids, ex.loss_mask) if m]
    assert tokenizer.decode(trained) == " <think> 3 + 4 = 7 </think> <answer> 7 </answer><|endoftext|>"


def test_chat_template_trains_every_assistant_turn_and_nothing_else(chat_tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "1 + 1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2 + 2"},
        {"role": "assistant", "content": "4"},
    ]
    assert resolve_template("auto", chat_tokenizer) == "chat"
    ex, reason = encode_conversation(messages, chat_tokenizer, "chat")
    assert reason == ""
    assert ex.ids == list(chat_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    # The trained spans: exactly the assistant contents and their end-of-turn markup.
    spans, current = [], []
    for i, m in zip(ex.ids, ex.loss_mask):
        if m:
            current.append(i)
        elif current:
            spans.append(chat_tokenizer.decode(current))
            current = []
    spans.append(chat_tokenizer.decode(current))
    assert [s.strip() for s in spans if s] == ["2<|im_end|>", "4<|im_end|>"]


def test_malformed_rows_are_skipped_and_counted(tokenizer, tmp_path):
    good = {"prompt": "1 + 2 =", "response": "<think> 3 </think> <answer> 3 </answer>"}
    path = _jsonl(tmp_path / "d.jsonl", [
        good,
        "{not json",
        {"prompt": "x"},  # no response
        {"prompt": "x", "response": "   "},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
        {"prompt": "1 + 2 = " * 200, "response": "3"},
        ["a list"],
    ])
    data = load_sft_dataset(path, tokenizer, "auto", max_seq_len=256)
    assert len(data.examples) == 1 and data.rows == 8
    assert data.skipped == {
        "not_json": 1, "missing_prompt_or_response": 1, "empty_response": 1, "bad_messages": 1,
        "multi_turn_needs_chat_template": 1, "longer_than_max_seq_len": 1, "not_an_object": 1,
    }


def test_unusable_datasets_are_one_line_errors(tokenizer, tmp_path):
    with pytest.raises(SFTDataError, match="not found.*sft.train_path"):
        load_sft_dataset(tmp_path / "missing.jsonl", tokenizer, "auto", 64)
    with pytest.raises(SFTDataError, match="no usable conversation.*empty_response: 1"):
        load_sft_dataset(_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "response": ""}]), tokenizer, "auto", 64)
    with pytest.raises(SFTDataError, match="no chat template"):
        resolve_template("chat", tokenizer)


def test_pack_first_fit_keeps_documents_whole():
    examples = [Example([i] * n, [1] * n) for i, n in enumerate([5, 4, 3, 6, 2])]
    rows = pack(examples, max_seq_len=8)
    # First fit: 5 opens row 0, 4 opens row 1, 3 fills row 0, 6 opens row 2, 2 joins row 1.
    assert [r.ids for r in rows] == [[0] * 5 + [2] * 3, [1] * 4 + [4] * 2, [3] * 6]
    assert rows[0].segments == [1] * 5 + [2] * 3 and rows[2].segments == [1] * 6
    assert sorted(sum((r.ids for r in rows), [])) == sorted(sum((e.ids for e in examples), []))
    for r in rows:
        assert len(r.ids) <= 8 and len(r.ids) == len(r.loss_mask) == len(r.segments)
    # Every epoch reshuffles, deterministically.
    many = [Example([i], [1]) for i in range(20)]
    first = epoch_rows(many, 0, seed=1, max_seq_len=4, packing=True)
    assert first == epoch_rows(many, 0, seed=1, max_seq_len=4, packing=True)
    assert first != epoch_rows(many, 1, seed=1, max_seq_len=4, packing=True)


def test_packed_attention_positions_and_mask():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0]])
    pos, hide = packed_attention(seg)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0]]
    keep = ~hide[0, 0]
    assert keep[4].tolist() == [False, False, False, True, True, False]  # doc 2 sees itself only, causally
    assert keep[2].tolist() == [True, True, True, False, False, False]
    assert keep[1].tolist() == [True, True, False, False, False, False]


def _examples(tokenizer, n: int) -> list[Example]:
    out = []
    for i in range(n):
        q = " + ".join(str((i * 7 + k) % 10) for k in range(2 + i % 4)) + " ="
        ex, _ = encode_conversation([{"role": "user", "content": q}, {"role": "assistant", "content": f"<think> {'step ' * (i % 3)}</think> <answer> {i} </answer>"}], tokenizer, "r1_zero")
        out.append(ex)
    return out


def _loss_and_grads(batch):
    init_distributed(PARALLEL, seed=7)  # same initial weights every call
    model = build_model(ModelConfig(), PARALLEL)
    ddp, _, _ = build_optimizer(model, OptimizerConfig(lr=1e-3), PARALLEL, 10)
    ddp.zero_grad_buffer()
    out = forward_backward(ddp, batch, lm_loss_fn, micro_batch_size=3)
    return out["loss"], [p.main_grad.detach().clone() for p in ddp.parameters()]


def test_packed_rows_train_like_one_conversation_per_row(tokenizer):
    """The acceptance test: same conversations, packed vs one per row -> same loss and gradients."""
    examples = _examples(tokenizer, 7)
    packed_rows = pack(examples, max_seq_len=300)
    assert len(packed_rows) < len(examples)  # really packed
    loss_packed, g_packed = _loss_and_grads(collate(packed_rows, tokenizer.pad_token_id, packed=True))
    loss_plain, g_plain = _loss_and_grads(collate(epoch_rows(examples, 0, 0, 300, packing=False), tokenizer.pad_token_id, packed=False))
    assert loss_packed == pytest.approx(loss_plain, rel=1e-5)
    for a, b in zip(g_packed, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Without the per-document mask the documents would see each other: the loss differs.
    unmasked = collate(packed_rows, tokenizer.pad_token_id, packed=False)
    loss_leaky, _ = _loss_and_grads(unmasked)
    assert abs(loss_leaky - loss_plain) > 1e-3


def test_loss_is_the_response_token_mean(tokenizer):
    from megatron_r1.train.step import compute_logprobs

    examples = _examples(tokenizer, 4)
    batch = collate(epoch_rows(examples, 0, 0, 300, packing=False), tokenizer.pad_token_id, packed=False)
    init_distributed(PARALLEL, seed=7)
    model = build_model(ModelConfig(), PARALLEL)
    ddp, _, _ = build_optimizer(model, OptimizerConfig(lr=1e-3), PARALLEL, 10)
    lp = compute_logprobs(model, batch.tokens, micro_batch_size=4)
    mask = batch.loss_mask[:, 1:]
    expected = float(-(lp * mask).sum() / mask.sum())
    ddp.zero_grad_buffer()
    assert forward_backward(ddp, batch, lm_loss_fn, 2, forward_only=True)["loss"] == pytest.approx(expected, rel=1e-5)
    # ... and that mean runs over response tokens only: no prompt position carries weight.
    for ex in examples:
        first = ex.loss_mask.index(1)
        assert not any(ex.loss_mask[:first]) and all(ex.loss_mask[first:])


def test_schedule_covers_every_epoch_and_respects_max_steps(tokenizer, tmp_path):
    from megatron_r1.data.sft import SFTDataset

    data = SFTDataset(examples=_examples(tokenizer, 10))
    cfg = load_config(None, ["sft.batch_size=4", "sft.epochs=3", "sft.packing=false"])
    plan = schedule(data, cfg, data_parallel_size=1)
    assert [len(b) for b in plan] == [4, 4, 2] * 3
    cfg = load_config(None, ["sft.batch_size=4", "sft.epochs=3", "sft.packing=false", "sft.max_steps=4"])
    assert len(schedule(data, cfg, data_parallel_size=1)) == 4
    cfg = load_config(None, ["sft.batch_size=4", "sft.epochs=1", "sft.packing=false"])
    assert [len(b) for b in schedule(data, cfg, data_parallel_size=3)] == [4, 4]  # a tail of 2 cannot feed 3 ranks
    with pytest.raises(ConfigError, match="no batch"):
        schedule(SFTDataset(examples=_examples(tokenizer, 1)), cfg, data_parallel_size=2)


def test_retired_extra_section_names_the_new_home():
    with pytest.raises(ConfigError, match="pretrain.corpus_seed.*checkpoint.base_stage"):
        load_config(None, ["extra.corpus_seed=5"])


def test_rejection_drop_reasons_in_order():
    from megatron_r1.stages.rejection_sampling import drop_reason

    cfg = load_config(None, [])
    good = {"accuracy": 1.0, "format": 1.0}
    assert drop_reason("x", "length", good, [], "en", cfg) == "truncated"
    assert drop_reason("x", "stop", {"accuracy": 0.0, "format": 0.0}, [], "en", cfg) == "incorrect"
    assert drop_reason("x", "stop", {"accuracy": 1.0, "format": 0.0}, [], "en", cfg) == "bad_format"
    assert drop_reason("x", "stop", good, ["en", "en", "fr"], "en", cfg) == "mixed_language"
    assert drop_reason("x", "stop", good, ["en", None], "en", cfg) is None  # unidentified words do not count
    assert drop_reason("x", "stop", good, [], "en", cfg) is None  # "3 + 4 = 7": no words, nothing mixed
    relaxed = load_config(None, ["rejection.min_language_consistency=0.6", "rejection.require_correct=false"])
    assert drop_reason("x", "stop", {"accuracy": 0.0, "format": 1.0}, ["en", "en", "fr"], "en", relaxed) is None


def test_readable_rewrite_adds_a_summary_in_the_prompts_language():
    """The cold-start pattern: the thought, then a summary line, in strict R1 tags, one language."""
    from megatron_r1.rewards.format import extract_think, format_reward
    from megatron_r1.rewards.language import language_consistency
    from megatron_r1.stages.rejection_sampling import readable

    en = readable(" <think> 5 plus 3 makes 8,   minus 7 makes 1 </think>  <answer> 1 </answer>", "en")
    assert en == "<think> 5 plus 3 makes 8, minus 7 makes 1, the final answer: 1 </think> <answer> 1 </answer>"
    zh = readable(" <think> 5 加 3 得 8，减 7 得 1 </think> <answer> 1 </answer>", "zh")
    assert zh == "<think> 5 加 3 得 8，减 7 得 1，最终结果：1 </think> <answer> 1 </answer>"
    for text, lang in ((en, "en"), (zh, "zh")):
        assert format_reward(text) == 1.0
        assert language_consistency(extract_think(text), lang, ("en", "zh")) == 1.0
    assert readable(" <think> 5 + 3 = 8 </think>", "en") is None  # no answer to summarise
    assert readable(" <think> 5 + 3 = 8 </think> <answer> 8 </answer>", "fr") is None  # no summary line for French


def test_general_responses_are_picked_by_reward_model_score():
    from megatron_r1.data.prompts import PromptItem
    from megatron_r1.stages.rejection_sampling import select_general

    a = PromptItem(prompt="A", question="qa", answer="", entry=None, index=0, source="general")
    b = PromptItem(prompt="B", question="qb", answer="", entry=None, index=1, source="general")

    def cand(prompt, sample, text, finish="stop"):
        return {"prompt": prompt, "sample": sample, "text": text, "finish_reason": finish, "tokens": 3}

    candidates = [cand(a, 0, "ok"), cand(a, 1, "best", "length"), cand(a, 2, "good"), cand(a, 3, " good "),
                  cand(b, 0, "meh"), cand(b, 1, "fine")]
    scores = [0.5, 9.0, 2.0, 2.0, -3.0, 1.0]
    rows, counts = select_general(candidates, scores, keep_per_prompt=1, min_score=0.0, model="m")
    # a: the truncated best is dropped, "good" wins, its whitespace twin is a duplicate, "ok" is over the cap;
    # b: "fine" kept, "meh" under the minimum score.
    assert [(r["prompt"], r["response"], r["provenance"]["reward_model_score"]) for r in rows] == [("qa", "good", 2.0), ("qb", "fine", 1.0)]
    assert all(r["source"] == "general" for r in rows)
    assert counts == {"kept": 2, "truncated": 1, "duplicate": 1, "over_cap": 1, "low_score": 1}
    rows, _ = select_general(candidates, scores, keep_per_prompt=0, min_score=None, model="m")
    assert [r["response"] for r in rows] == ["good", "ok", "fine", "meh"]
