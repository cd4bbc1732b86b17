"""Megatron-Core layer specs: Transformer Engine on GPUs, Megatron's local modules + SDPA elsewhere.

Megatron builds every layer from a `ModuleSpec`, so swapping an implementation needs no fork.
Two swaps are made here, both without Transformer Engine only:

* the core attention becomes `SDPAttention` (`torch.nn.functional.scaled_dot_product_attention`),
  because Megatron's local `DotProductAttention` allocates its scores from a CUDA memory buffer.
  It serves both GQA (grouped key/value heads) and MLA (key and value head dims differ);
* the final norm of the decoder block and the MTP norms become `WrappedTorchNorm`. Megatron's
  local spec takes them from Apex's `FusedLayerNorm` whenever Apex imports (an NGC container
  whose TE is missing or broken), and that module supports LayerNorm only: our RMSNorm models
  would stop at its assertion. The torch norm does both.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """Causal core attention on [seq, batch, heads, dim] tensors via PyTorch SDPA.

    Batches are right-padded, so a causal mask alone keeps real tokens from seeing padding.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine's attention (GPU)")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale  # None: SDPA's default 1/sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention takes neither packed sequences nor an attention bias")
        seq, batch, heads, _ = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # -> [b, h, s, d]
        # Megatron masks mark positions to hide with True; SDPA boolean masks mark positions to keep.
        mask = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != heads,
        )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)


def decoder_block_spec(config: TransformerConfig, use_te: bool) -> TransformerBlockSubmodules:
    """Per-layer specs for this pipeline stage (dense and MoE layers as `moe_layer_freq` says)."""
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization=config.normalization)
    if use_te:
        return block
    block = copy.copy(block)
    block.layer_specs = [_with_sdpa(spec) for spec in block.layer_specs]
    block.layer_norm = WrappedTorchNorm
    return block


def mtp_block_spec(config: TransformerConfig, block: TransformerBlockSubmodules, use_te: bool):
    """Multi-token-prediction modules (DeepSeek-V3), or None when the config has none."""
    if not config.mtp_num_layers:
        return None
    spec = get_gpt_mtp_block_spec(config, block, use_transformer_engine=use_te)
    if spec is not None and not use_te:
        for layer in spec.layer_specs:
            layer.submodules.transformer_layer = _with_sdpa(layer.submodules.transformer_layer)
            layer.submodules.enorm = layer.submodules.hnorm = layer.submodules.layer_norm = WrappedTorchNorm
    return spec


def _with_sdpa(layer_spec):
    layer_spec = copy.deepcopy(layer_spec)
    layer_spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return layer_spec
