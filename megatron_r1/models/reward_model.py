"""Scalar reward model: the policy's architecture with a value head in place of the language-model head.

`build_reward_model` builds the usual Megatron-Core `GPTModel` (any TP/PP/EP layout) with untied
embeddings and swaps `output_layer` (hidden -> vocabulary) for a `ValueHead` (hidden -> 1): the
forward then returns one scalar per token, `[b, S, 1]`, and a response's reward is the scalar at its
last token (`rewards.reward_model.encode_for_reward`). Trained with the Bradley-Terry loss on
preference pairs (`stages/reward_model.py`), scored with `train.step.compute_values`.

On disk it is a Hugging Face sequence classifier (`LlamaForSequenceClassification` and friends,
`num_labels=1`): the decoder's tensors under the usual names and the head as `score.weight`, which
transformers scores at the last non-padding token as we do (`models.hf.base.save_hf(head="score")`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megatron_r1.config import ModelConfig, ParallelConfig
from megatron_r1.models.build import build_model


class ValueHead(torch.nn.Module):
    """hidden `[s, b, h]` -> `([s, b, 1], None)`, called as GPTModel calls its output layer.

    The weight is replicated on every tensor-parallel rank (one output column cannot be split).
    Under sequence parallelism the hidden states arrive cut along the sequence; they are gathered
    with a backward that keeps this rank's slice of the gradient (every rank computes the same
    loss from the same full tensor, so summing would count it TP times).
    """

    def __init__(self, hidden_size: int, sequence_parallel: bool, init_std: float, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(1, hidden_size, dtype=dtype, device=device))
        torch.nn.init.normal_(self.weight, std=init_std)
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: bool | None = None):
        if self.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return F.linear(hidden, self.weight), None


def reward_model_config(policy_cfg: ModelConfig) -> ModelConfig:
    """The reward model's ModelConfig for a policy's: untied (the head is not the embedding), no MTP."""
    return dataclasses.replace(policy_cfg, tie_embeddings=False, mtp_num_layers=0)


def build_reward_model(model_cfg: ModelConfig, parallel: ParallelConfig) -> GPTModel:
    """This rank's shard of the reward model for `model_cfg` (see `reward_model_config`)."""
    cfg = reward_model_config(model_cfg)
    gpt = build_model(cfg, parallel)
    if gpt.post_process:
        # The vocabulary projection GPTModel built is replaced before any optimizer sees it.
        old = gpt.output_layer
        gpt.output_layer = ValueHead(
            cfg.hidden_size,
            sequence_parallel=bool(getattr(old, "sequence_parallel", False)),
            init_std=cfg.init_method_std,
            dtype=old.weight.dtype,
            device=old.weight.device,
        )
        del old
    return gpt


def last_token_index(lengths: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (rows right-padded to their `lengths`)."""
    return (lengths.long() - 1).clamp(min=0)
