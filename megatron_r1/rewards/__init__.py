"""Rule rewards for R1-style responses: accuracy, format, language consistency, code (sandboxed), plug-ins."""

from megatron_r1.rewards.accuracy import extract_answer, gym_accuracy, math_accuracy
from megatron_r1.rewards.code import extract_program, is_code_item, run_programs, score_programs
from megatron_r1.rewards.format import FORMAT_MODES, extract_think, format_properties, format_reward
from megatron_r1.rewards.language import (
    DEFAULT_LANGUAGES,
    LanguageIdentifier,
    detect_language,
    language_consistency,
    language_identifier,
    word_languages,
)
from megatron_r1.rewards.reward_fn import (
    RewardBatch,
    RewardFn,
    RewardTimeout,
    call_with_timeout,
    load_reward_function,
)

__all__ = [
    "DEFAULT_LANGUAGES",
    "FORMAT_MODES",
    "LanguageIdentifier",
    "RewardBatch",
    "RewardFn",
    "RewardTimeout",
    "call_with_timeout",
    "detect_language",
    "extract_answer",
    "extract_program",
    "extract_think",
    "format_properties",
    "format_reward",
    "gym_accuracy",
    "is_code_item",
    "language_consistency",
    "language_identifier",
    "load_reward_function",
    "math_accuracy",
    "run_programs",
    "score_programs",
    "word_languages",
]
