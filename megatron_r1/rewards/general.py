"""Rewards for general prompts (final RL stage): the scalar reward model or the generative judge.

`reward.general_scorer` picks one:

* ``reward_model``: `RewardModelScorer` on `reward.model_path`, run by the trainer ranks (collective:
  call it on every rank with the whole step's general responses);
* ``judge``: `Judge` on the policy's own vLLM engine (local: each engine judges the responses it
  sampled, every rank of the engine with the same inputs).

A general response's reward is `reward.model_weight` x the score; reasoning prompts keep their rule
rewards. The verifier's accuracy of general responses (when the prompt has a reference) is still
computed and logged, never rewarded: it shows whether the learned reward agrees with the truth.
"""

from __future__ import annotations

import torch

from megatron_r1.config import ConfigError, RewardConfig, StageConfig, choices
from megatron_r1.rewards.judge import Judge

SCORERS = choices(RewardConfig, "general_scorer")


class GeneralReward:
    """Scores of general prompts' responses in [0, 1] (judge) or unbounded (reward model)."""

    def __init__(self, cfg: StageConfig, engine, tokenizer):
        kind = cfg.reward.general_scorer
        self.kind = kind
        self.weight = cfg.reward.model_weight
        self.collective = kind == "reward_model"  # run on every rank with the whole batch (else per engine)
        if kind == "reward_model":
            if not cfg.reward.model_path:
                raise ConfigError("reward.general_scorer=reward_model needs reward.model_path (a `megatron-r1 reward-model` run's hf/ directory)")
            from megatron_r1.rewards.reward_model import RewardModelScorer

            self.model = RewardModelScorer(cfg.reward.model_path, cfg.parallel, cfg.grpo.micro_batch_size)
        else:
            self.engine, self.tokenizer = engine, tokenizer
            self.max_tokens = cfg.reward.judge_max_tokens
            self.max_prompt = cfg.rollout.max_model_len - self.max_tokens
            if self.max_prompt < 16:
                raise ConfigError(f"rollout.max_model_len={cfg.rollout.max_model_len} leaves no room for judge prompts after reward.judge_max_tokens={self.max_tokens}")
            self.judge = Judge(self._generate)

    def _generate(self, prompts: list[str]) -> list[str]:
        ids = self.tokenizer(prompts)["input_ids"]
        # A rubric prompt longer than the engine allows keeps its end: the response and "Score:".
        ids = [list(x)[-self.max_prompt:] for x in ids]
        out = self.engine.generate(ids, n=1, temperature=0.0, top_p=1.0, max_tokens=self.max_tokens,
                                   stop_token_ids=[self.tokenizer.eos_token_id])
        return [self.tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in out]

    def __call__(self, questions: list[str], responses: list[str]) -> tuple[torch.Tensor, int]:
        """(scores [N] float32, malformed judge verdicts)."""
        if self.kind == "reward_model":
            return self.model(questions, responses), 0
        scores, malformed = self.judge(questions, responses)
        return torch.tensor(scores, dtype=torch.float32), malformed
