"""Language consistency of the chain of thought (DeepSeek-R1 stage 2): the share of its words written
in the prompt's language, word by word, with the `lingua` language identifier.

Why lingua (`lingua-language-detector`): it is built for short and mixed-language text, runs
offline from compiled n-gram models, and tells apart languages that share a script (French from
English, German from Dutch), which a Unicode-script rule cannot.

How a text is read:

1. Words are runs of letters (apostrophes inside a word kept: "d'abord"). Digits, math and
   punctuation are neutral: "3 + 4 = 7" neither helps nor hurts. Chinese and Japanese characters
   are one word each (those scripts have no spaces).
2. The text is cut into clauses at punctuation, line breaks and script changes. A single word is
   too short to identify ("plus" is English and French); a clause is the shortest context that is
   reliable, and code-switching happens at clause boundaries far more often than inside one.
3. Each clause's words get the clause's language: a script that only one configured language
   writes decides it (Han -> zh, Hangul -> ko, kana -> ja); otherwise lingua, restricted to the
   configured languages (`reward.languages`), picks one. A clause lingua cannot place is neutral.

Languages are ISO 639-1 codes (en, zh, fr, ...), any of the 75 lingua supports.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

DEFAULT_LANGUAGES = ("en", "zh", "fr", "de", "es", "ru")

_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
# Sentence and clause punctuation (not math operators: "plus 4 = 5" keeps its context).
_CLAUSE_BREAK = re.compile(r"[.,;:!?()\[\]{}\"\n\r\t。，、；：！？（）「」『』《》]+")
# Scripts that one language owns (among those configured), and are written without spaces or not.
_SCRIPT_LANGUAGE = {"han": "zh", "kana": "ja", "hangul": "ko"}
_PER_CHARACTER = frozenset({"han", "kana"})


@functools.lru_cache(maxsize=1 << 16)
def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    if name.startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH")):
        return "han"
    if name.startswith(("HIRAGANA", "KATAKANA")):
        return "kana"
    if name.startswith("HANGUL"):
        return "hangul"
    return "alphabetic"  # Latin, Cyrillic, Greek, Arabic, ...: lingua tells the languages apart


def _clauses(text: str) -> list[tuple[str, list[str]]]:
    """(script, words) per clause, in order."""
    out: list[tuple[str, list[str]]] = []
    for piece in _CLAUSE_BREAK.split(text):
        current: tuple[str, list[str]] | None = None
        for match in _WORD.finditer(piece):
            word = match.group()
            # A letter run may mix scripts ("我们compute"): split it where the script changes.
            runs: list[tuple[str, str]] = []
            for ch in word:
                s = _script(ch) if ch.isalpha() else (runs[-1][0] if runs else "alphabetic")
                if runs and runs[-1][0] == s and s not in _PER_CHARACTER:
                    runs[-1] = (s, runs[-1][1] + ch)
                else:
                    runs.append((s, ch))
            for s, w in runs:
                if current is None or current[0] != s:
                    current = (s, [])
                    out.append(current)
                current[1].append(w)
    return out


class LanguageIdentifier:
    """Per-word languages of a text among `languages` (see the module docstring)."""

    def __init__(self, languages: Iterable[str] = DEFAULT_LANGUAGES):
        from lingua import Language, LanguageDetectorBuilder

        codes = tuple(dict.fromkeys(c.strip().lower() for c in languages))
        known = {lang.iso_code_639_1.name.lower(): lang for lang in Language.all()}
        unknown = [c for c in codes if c not in known]
        if unknown:
            raise ValueError(f"language code(s) {', '.join(unknown)} not known to lingua; use ISO 639-1 codes such as {', '.join(sorted(known)[:12])}, ...")
        if len(codes) < 2:
            raise ValueError(f"reward.languages needs at least two languages to tell apart, got {list(codes)}")
        self.languages = codes
        self._detector = LanguageDetectorBuilder.from_languages(*(known[c] for c in codes)).build()
        # Scripts that exactly one configured language writes decide on their own.
        self._by_script = {s: lang for s, lang in _SCRIPT_LANGUAGE.items() if lang in codes}
        self._clause_language = functools.lru_cache(maxsize=1 << 16)(self._identify)

    def _identify(self, script: str, clause: str) -> str | None:
        if script in self._by_script:
            return self._by_script[script]
        lang = self._detector.detect_language_of(clause)
        return None if lang is None else lang.iso_code_639_1.name.lower()

    def word_languages(self, text: str) -> list[str | None]:
        """The language of each word of `text`, in order (None: not identified)."""
        out: list[str | None] = []
        for script, words in _clauses(text):
            lang = self._clause_language(script, " ".join(words))
            out.extend([lang] * len(words))
        return out

    def consistency(self, cot_text: str, target: str) -> float:
        """Share of the chain-of-thought words written in `target` (0.0 for no words at all, so an
        empty CoT earns nothing)."""
        if target not in self.languages:
            raise ValueError(f"language {target!r} is not among reward.languages: {', '.join(self.languages)}")
        words = self.word_languages(cot_text)
        return sum(w == target for w in words) / len(words) if words else 0.0

    def detect(self, text: str) -> str | None:
        """The language with the most words in `text` (ties: the one seen first); None if none.

        Meant for the user's question: a whole prompt also holds the template's instructions
        (English in the R1-Zero template), which would outvote a short question in another language.
        """
        counts = Counter(w for w in self.word_languages(text) if w is not None)
        return counts.most_common(1)[0][0] if counts else None


@functools.lru_cache(maxsize=8)
def language_identifier(languages: tuple[str, ...] = DEFAULT_LANGUAGES) -> LanguageIdentifier:
    """One shared identifier per language set (lingua loads its models once)."""
    return LanguageIdentifier(languages)


def word_languages(text: str, languages: Iterable[str] = DEFAULT_LANGUAGES) -> list[str | None]:
    return language_identifier(tuple(languages)).word_languages(text)


def language_consistency(cot_text: str, target_lang: str, languages: Iterable[str] = DEFAULT_LANGUAGES) -> float:
    return language_identifier(tuple(languages)).consistency(cot_text, target_lang)


def detect_language(text: str, languages: Iterable[str] = DEFAULT_LANGUAGES) -> str | None:
    return language_identifier(tuple(languages)).detect(text)
