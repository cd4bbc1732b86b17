"""A small byte-level BPE tokenizer for the tiny models, trained on our own corpus.

Design choices, and why:
- byte-level: any text encodes (no unknown token), and decoding gives the text back exactly;
- every digit is its own token: arithmetic is then learnable digit by digit, instead of through
  an arbitrary set of merged numbers ("23" one token, "24" two);
- merges may cross spaces: text that repeats in every example (the R1 prompt template, " + ",
  " = ") becomes a few long tokens, so a 110-word template costs ~30 tokens instead of ~110 and
  the tiny model spends its compute on the question and the reasoning, not on boilerplate;
- `<|endoftext|>` (end of sequence and padding), `<think>`, `</think>`, `<answer>`, `</answer>` are
  special tokens with one id each, so rewards and stop conditions can work on ids.

Reload with `load_tokenizer` (a `PreTrainedTokenizerFast`). `AutoTokenizer` on a model directory
whose config.json says qwen2 builds a Qwen2 tokenizer that swaps in Qwen's pre-tokenizer, which
splits text differently from the one trained here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
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

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,  # padding is masked out, so sharing the eos id costs nothing
        extra_special_tokens=list(REASONING_TAGS),
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
