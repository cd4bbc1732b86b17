"""A small byte-level BPE tokenizer for the tiny models, trained on our own corpus.

Design choices, and why:
- byte-level: any text encodes (no unknown token), and decoding gives the text back exactly;
- every digit is its own token: arithmetic is then learnable digit by digit, instead of through
  an arbitrary set of merged numbers ("23" one token, "24" two);
- merges may cross spaces: text that repeats in every example (the R1 prompt template, " + ",
  " = ") becomes a few long tokens, so a 110-word template costs ~30 tokens instead of ~110 and
  the tiny model spends its compute on the question and the reasoning, not on boilerplate;
- `<|endoftext|>` (end of sequence and padding), `<think>`, `</think>`, `<answer>`, `</answer>` are
  added tokens with one id each, so rewards and stop conditions can work on ids. Only the first is
  *special*: the reasoning tags are plain added tokens, as in DeepSeek-R1's own tokenizer, because
  every standard decode (vLLM's default `SamplingParams`, `decode(skip_special_tokens=True)` in
  evaluation harnesses) drops special tokens, and an evaluator looking for `<answer>` would find none.
  `export_tokenizer` applies the same to any tokenizer written beside an exported model.

Reload with `load_tokenizer` (a `PreTrainedTokenizerFast`). `AutoTokenizer` on a model directory
whose config.json says qwen2 builds a Qwen2 tokenizer that swaps in Qwen's pre-tokenizer, which
splits text differently from the one trained here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
SPECIAL_TOKENS = (EOS_TOKEN, *REASONING_TAGS)  # ids 0..4 in a tokenizer trained here, in this order


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` tokens on `texts`, save it to `out_dir`, return it."""
    min_size = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} for a byte-level BPE, got {vocab_size}")

    tok = Tokenizer(models.BPE())
    # Digits are isolated so no merge can glue one to anything; the byte-level step then maps bytes
    # to symbols without splitting words (use_regex=False), so merges may cross spaces. Whitespace
    # at the end of a piece (before a special token) stays alone, so "...Assistant:" + " <think>"
    # tokenizes the same apart as together: the trainer concatenates prompt and completion ids.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s+\z"), "isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_without_special_tokens(texts), trainer)
    # The trainer registers its tokens as special; the tags keep their ids and become plain.
    tok = Tokenizer.from_str(json.dumps(_tags_plain_in_tokenizer_json(json.loads(tok.to_str()))))

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,  # padding is masked out, so sharing the eos id costs nothing
        clean_up_tokenization_spaces=False,  # keep decode(encode(text)) == text
    )
    save_tokenizer(hf, out_dir)
    return hf


def _without_special_tokens(texts: Iterable[str]) -> Iterator[str]:
    # The tags are whole tokens already; leaving them in would spend merges on "<", "think", ">".
    for text in texts:
        for special in SPECIAL_TOKENS:
            text = text.replace(special, " ")
        yield text


def _tags_plain_in_tokenizer_json(data: dict) -> dict:
    for entry in data.get("added_tokens", []):
        if entry.get("content") in REASONING_TAGS:
            entry["special"] = False
    return data


def _tags_plain_in_tokenizer_config(data: dict) -> dict:
    """tokenizer_config.json / special_tokens_map.json: the tags neither special nor listed as such."""
    for entry in (data.get("added_tokens_decoder") or {}).values():
        if isinstance(entry, dict) and entry.get("content") in REASONING_TAGS:
            entry["special"] = False
    for key in ("extra_special_tokens", "additional_special_tokens"):
        listed = data.get(key)
        if isinstance(listed, list):
            kept = [t for t in listed if (t.get("content") if isinstance(t, dict) else t) not in REASONING_TAGS]
            if kept:
                data[key] = kept
            else:
                del data[key]
    return data


_REWRITES = {
    "tokenizer.json": _tags_plain_in_tokenizer_json,
    "tokenizer_config.json": _tags_plain_in_tokenizer_config,
    "special_tokens_map.json": _tags_plain_in_tokenizer_config,
}


def export_tokenizer(src_dir: str | Path, out_dir: str | Path, files: Iterable[str]) -> list[str]:
    """Copy the tokenizer `files` present in `src_dir` to `out_dir` (a model export), with the reasoning
    tags made plain added tokens wherever they were special (tokenizers trained before this rule, or a
    third party's): ids and tokenization unchanged, only `skip_special_tokens` now keeps them.
    Returns the names copied."""
    src, out = Path(src_dir), Path(out_dir)
    copied = []
    for name in files:
        path = src / name
        if not path.is_file():
            continue
        rewrite = _REWRITES.get(name)
        if rewrite is None:
            if path.resolve() != (out / name).resolve():
                shutil.copyfile(path, out / name)
        else:
            text = json.dumps(rewrite(json.loads(path.read_text())), indent=2, ensure_ascii=False) + "\n"
            (out / name).write_text(text)
        copied.append(name)
    return copied


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """`save_pretrained`, with the tokenizer class named so `AutoTokenizer` (without a model config) agrees."""
    out = Path(out_dir)
    tokenizer.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # transformers 5 writes "TokenizersBackend", which transformers 4 cannot resolve; this name works in both.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by `train_tokenizer` (or any tokenizer.json directory) as it was trained."""
    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {str(p)!r}; train one with train_tokenizer or fix the path")
    return PreTrainedTokenizerFast.from_pretrained(str(p))


def stop_conditions(tokenizer, stop: Sequence[str] = ()) -> tuple[list[int], list[str]]:
    """(stop token ids, stop strings) for generation: EOS, plus each stop string that is one token
    of `tokenizer` as its id (exact, no detokenization); longer ones stay strings for vLLM."""
    ids, strings = [tokenizer.eos_token_id], []
    for text in stop:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1:
            ids.append(encoded[0])
        else:
            strings.append(text)
    return ids, strings


def decode_response(tokenizer, ids: list[int]) -> str:
    """A sampled response as the rewards read it: every token kept (the tags are plain added tokens,
    but a tokenizer may mark others special), the end-of-sequence text removed."""
    return tokenizer.decode(ids, skip_special_tokens=False).replace(tokenizer.eos_token, "")
