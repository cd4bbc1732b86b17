"""Language consistency of the chain of thought (DeepSeek-R1 stage 2), by Unicode script.

A language is identified with its script, which is all the reward needs: R1's problem was CoTs
that drift between English and Chinese mid-thought, not French versus English.

=====  =========================  ====================================
code   script                     what counts as one word
=====  =========================  ====================================
en     Latin                      a run of Latin letters
zh     Han (CJK ideographs)       each character (Chinese has no spaces)
ru     Cyrillic                   a run of Cyrillic letters
ko     Hangul                     a run of Hangul syllables / jamo
=====  =========================  ====================================

Digits, punctuation, math symbols and other scripts are neutral: they are neither in nor out of
the target language, so "3 + 4 = 7" neither helps nor hurts.
"""

from __future__ import annotations

import functools
import unicodedata
from collections import Counter

# Unicode character-name prefixes of each supported script.
_SCRIPT_PREFIXES = {
    "en": ("LATIN ", "FULLWIDTH LATIN "),
    "zh": ("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH"),
    "ru": ("CYRILLIC ",),
    "ko": ("HANGUL ",),
}
LANGUAGES = tuple(_SCRIPT_PREFIXES)
# Scripts written without spaces: every character is a word.
_PER_CHARACTER = frozenset({"zh"})


@functools.lru_cache(maxsize=1 << 16)
def _script(ch: str) -> str | None:
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    for lang, prefixes in _SCRIPT_PREFIXES.items():
        if name.startswith(prefixes):
            return lang
    return None


def word_languages(text: str) -> list[str]:
    """The language of each word of ``text`` (neutral characters skipped), in order."""
    words: list[str] = []
    current: str | None = None  # language of the word being read, None between words
    for ch in text:
        lang = _script(ch)
        if lang is not None and lang in _PER_CHARACTER:
            words.append(lang)
            current = None
        elif lang is not None and lang != current:
            words.append(lang)
            current = lang
        elif lang is None:
            current = None
    return words


def language_consistency(cot_text: str, target_lang: str) -> float:
    """Share of the chain-of-thought words written in ``target_lang`` (0.0 for no words at all,
    so an empty CoT earns nothing)."""
    if target_lang not in _SCRIPT_PREFIXES:
        raise ValueError(f"language {target_lang!r} is not one of: {', '.join(LANGUAGES)}")
    words = word_languages(cot_text)
    if not words:
        return 0.0
    return sum(w == target_lang for w in words) / len(words)


def detect_language(text: str) -> str | None:
    """The language with the most words in ``text`` (ties: the one seen first); ``None`` if none.

    Meant for the user's question. A whole prompt also contains the template's instructions
    (English in the R1-Zero template), which would outvote a short question in another language.
    """
    counts = Counter(word_languages(text))
    if not counts:
        return None
    return counts.most_common(1)[0][0]
