"""What the tiny base model can already do: the latent ability that R1-Zero selects.

GRPO raises behaviour the base model already shows now and then; it does not invent it. For the
tiny chain_sum base this is measured right after pretraining: sample k responses per held-out
prompt, split them into worked-steps responses (anything inside ``<think>`` other than the direct
"this is easy") and direct answers, and score each mode. R1-Zero can climb only when the worked mode
exists and is more accurate than answering directly; `BaseProbe.verdict` says which case a base is.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_r1.config import StageConfig
from megatron_r1.data.phrasebook import PHRASES
from megatron_r1.data.tiny_corpus import DIRECT_THOUGHT

# The direct thought in every language the corpus writes ("this is easy", "这很简单").
DIRECT_THOUGHTS = frozenset({DIRECT_THOUGHT, *(p["direct"] for p in PHRASES.values())})

log = logging.getLogger(__name__)

_THOUGHT = re.compile(r"<think>(.*?)</think>", re.DOTALL)
# Worked steps must beat direct answers by this much to count as something GRPO can select: a
# smaller gap is within the noise of a few hundred samples and gives the advantages little to climb.
MIN_MARGIN = 0.05


def thought(response: str) -> str | None:
    """The text inside the first <think>...</think>, stripped; None when there is none."""
    m = _THOUGHT.search(response)
    return m.group(1).strip() if m else None


def is_worked(response: str) -> bool:
    """A response that reasons inside <think> rather than giving the direct thought (or none)."""
    t = thought(response)
    return bool(t) and t not in DIRECT_THOUGHTS


@dataclass
class BaseProbe:
    greedy_accuracy: float  # held-out pass@1, greedy: what `base_accuracy` of the RL run reports
    samples: int  # sampled responses scored
    worked_share: float  # share of sampled responses that show worked steps
    worked_accuracy: float | None  # accuracy among them (None: there were none)
    direct_accuracy: float | None  # accuracy among the other responses

    def verdict(self) -> str:
        if not self.worked_share:
            return "the base never shows worked steps: GRPO has nothing better to select"
        if self.direct_accuracy is not None and (self.worked_accuracy or 0.0) < self.direct_accuracy + MIN_MARGIN:
            return "worked steps are not clearly more accurate than direct answers: GRPO has nothing better to select"
        return "worked steps are rarer and more accurate than direct answers: GRPO can select them"

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict()}


def summarize_modes(responses: list[str], accuracy: list[float], greedy_accuracy: float) -> BaseProbe:
    """Split sampled `responses` (with their 0/1 `accuracy`) into worked and direct answers."""
    if len(responses) != len(accuracy) or not responses:
        raise ValueError(f"need one accuracy per response and at least one response, got {len(responses)} and {len(accuracy)}")
    worked = [a for r, a in zip(responses, accuracy) if is_worked(r)]
    direct = [a for r, a in zip(responses, accuracy) if not is_worked(r)]
    return BaseProbe(
        greedy_accuracy=greedy_accuracy,
        samples=len(responses),
        worked_share=len(worked) / len(responses),
        worked_accuracy=sum(worked) / len(worked) if worked else None,
        direct_accuracy=sum(direct) / len(direct) if direct else None,
    )


def probe_base_model(hf_dir: str | Path, cfg: StageConfig, k: int = 8) -> BaseProbe:
    """Sample `k` responses per held-out prompt of `cfg.data` from the model in `hf_dir` with vLLM.
    Collective: every rank of the job runs it (each engine samples its share of the prompts)."""
    import torch

    from megatron_r1.data.prompts import load_prompts
    from megatron_r1.data.tokenizer import decode_response, load_tokenizer, stop_conditions
    from megatron_r1.rewards.reward_fn import RewardFn, score_split
    from megatron_r1.rollout.vllm_engine import VLLMEngine
    from megatron_r1.rollout.evaluation import evaluate

    tokenizer = load_tokenizer(hf_dir)
    prompts = load_prompts(cfg.data, "eval", tokenizer).items
    reward_fn = RewardFn(cfg.reward)
    engine = VLLMEngine(cfg.rollout, str(hf_dir))
    try:
        budget = cfg.rollout.max_response_tokens
        greedy = evaluate(engine, tokenizer, prompts, reward_fn, budget, k=1, stop=cfg.rollout.stop)  # the RL run's base_accuracy
        mine = engine.layout.shard(prompts)
        torch.manual_seed(cfg.seed * 1_000_003 + engine.layout.engine_index)
        stop_ids, stop_strings = stop_conditions(tokenizer, cfg.rollout.stop)
        sampled = engine.generate(
            [p.prompt_ids for p in mine], n=k, temperature=1.0, top_p=1.0, max_tokens=budget,
            stop_token_ids=stop_ids, stop=stop_strings,
        )
        items = [mine[i // k] for i in range(len(sampled))]
        texts = [decode_response(tokenizer, r.response_ids) for r in sampled]
        accuracy = score_split(reward_fn, [p.prompt for p in items], texts, [p.as_reward_item() for p in items], engine.groups.split_work)
        rows = engine.groups.gather(list(zip(texts, accuracy.components["accuracy"].tolist())))
    finally:
        engine.shutdown()
    return summarize_modes([t for t, _ in rows], [a for _, a in rows], greedy.accuracy)


def describe(probe: BaseProbe) -> str:
    """One log line: "greedy 5.9 %; sampled: 4.9 % worked steps (83 % right), 95.1 % direct (6 % right): ..."."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f} %"

    return (
        f"held-out accuracy {100 * probe.greedy_accuracy:.1f} % greedy; of {probe.samples} samples "
        f"{100 * probe.worked_share:.1f} % show worked steps ({pct(probe.worked_accuracy)} right), "
        f"{100 * (1 - probe.worked_share):.1f} % answer directly ({pct(probe.direct_accuracy)} right): {probe.verdict()}"
    )
