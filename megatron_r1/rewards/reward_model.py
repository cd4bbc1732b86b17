"""The scalar reward model as a reward inside the RL job (`reward.general_scorer=reward_model`).

Every rank builds its shard of the reward model in the trainer's layout (TP/PP/EP like the policy)
from `reward.model_path`, a sequence-classifier directory that `megatron-r1 reward-model` writes.
Scoring is collective: each data-parallel rank scores a share of the responses and the scores are
all-gathered, so every rank returns all of them. The question is wrapped in the template the reward
model was trained with (its `reward_model.json`), then the response (`encode_for_reward`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_r1.config import ConfigError, ParallelConfig
from megatron_r1.data.sft import encode_conversation, resolve_template
from megatron_r1.data.tokenizer import load_tokenizer
from megatron_r1.models.hf.base import load_hf, read_hf_config
from megatron_r1.models.reward_model import build_reward_model, last_token_index, reward_model_config
from megatron_r1.train.step import compute_values

log = logging.getLogger(__name__)

META_FILE = "reward_model.json"  # written beside the exported weights: how inputs were formed in training


def check_reward_model_dir(path: str | Path) -> dict:
    """config.json of a reward-model directory; ConfigError unless it is a one-label sequence classifier."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"reward.model_path={str(path)!r} has no config.json; train one with `megatron-r1 reward-model` (it writes <run_dir>/hf)")
    config = json.loads(config_path.read_text())
    arch = (config.get("architectures") or [""])[0]
    if not arch.endswith("ForSequenceClassification") or config.get("num_labels", 1) != 1:
        raise ConfigError(f"reward.model_path={str(path)!r} is a {arch or 'model without architectures'} "
                          f"with {config.get('num_labels', '?')} labels; a scalar reward model is a ...ForSequenceClassification with num_labels=1")
    return config


def encode_for_reward(question: str, response: str, tokenizer, template: str) -> tuple[list[int] | None, str]:
    """(token ids, "") of a question and response as the reward model reads them, or (None, reason):
    the prompt template, the response, and no end-of-sequence token. The reward is read at the last
    token, as transformers' sequence classifiers do (they take the last token that is not padding,
    and a tokenizer that pads with its end-of-sequence token would make an appended one invisible)."""
    example, reason = encode_conversation(
        [{"role": "user", "content": question}, {"role": "assistant", "content": response}], tokenizer, template
    )
    if example is None:
        return None, reason
    ids = list(example.ids)
    if len(ids) > 1 and ids[-1] == tokenizer.eos_token_id:
        ids.pop()
    return ids, ""


class RewardModelScorer:
    """`scorer(questions, responses) -> [N] float32` on every rank (collective over the whole job)."""

    def __init__(self, model_path: str | Path, parallel: ParallelConfig, micro_batch_size: int = 16):
        check_reward_model_dir(model_path)
        self.path = Path(model_path)
        self.micro_batch_size = micro_batch_size
        cfg = reward_model_config(read_hf_config(model_path))
        self.model = build_reward_model(cfg, parallel)
        load_hf(self.model, cfg, model_path, head="score")
        self.model.eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(model_path)
        meta_path = self.path / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.template = resolve_template(meta.get("template", "auto"), self.tokenizer)
        self.max_len = cfg.max_position_embeddings
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def encode(self, question: str, response: str) -> list[int]:
        """Token ids as in training; a sequence longer than the model's positions keeps its end
        (the token the score is read at)."""
        ids, reason = encode_for_reward(question, response if response.strip() else " ", self.tokenizer, self.template)
        if ids is None:
            raise ValueError(f"cannot encode a response for the reward model: {reason}")
        return ids[-self.max_len:]

    def __call__(self, questions: list[str], responses: list[str]) -> torch.Tensor:
        from megatron.core import parallel_state

        n = len(responses)
        if n == 0:
            return torch.zeros(0)
        sequences = [self.encode(q, r) for q, r in zip(questions, responses)]
        dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        if dp == 1 or n < dp:  # too few to share: every rank scores all (model-parallel peers must run together)
            return score_sequences(self.model, sequences, self.pad_id, self.micro_batch_size)
        from megatron_r1.distributed import even_bounds

        lo, hi = even_bounds(n, dp, rank)
        mine = score_sequences(self.model, sequences[lo:hi], self.pad_id, self.micro_batch_size).tolist()
        parts: list = [None] * dp
        dist.all_gather_object(parts, mine, group=parallel_state.get_data_parallel_group())
        return torch.tensor([s for part in parts for s in part], dtype=torch.float32)


def score_sequences(model, sequences: list[list[int]], pad_id: int, micro_batch_size: int) -> torch.Tensor:
    """The reward of each token sequence (prompt + response + eos): the value at its last token.
    Collective over the model-parallel group; every rank gets all scores."""
    width = max(2, max(len(s) for s in sequences))
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = torch.tensor(s)
    values = compute_values(model, tokens, micro_batch_size).cpu()
    return values.gather(1, last_token_index(torch.tensor([len(s) for s in sequences])).unsqueeze(1)).squeeze(1)
