"""Activation memory of one micro-batch: what the forward keeps for backward, per layer and loss.

The method is Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(MLSys 2023, arXiv:2205.05198), section 4: count every tensor a layer saves for its backward, in
elements per token, then divide the tensor-parallel parts by t (and the sequence-parallel parts by t
when sequence parallelism is on). Their GPT layer keeps ``s b h (34 + 5 a s / h)`` bytes in 16-bit.
Our layers differ from their GPT, so the terms are re-derived for what this trainer builds (and
checked against `planner.measure` on the tiny configs, see tests/unit/test_planner.py):

* no dropout (the 34 loses its dropout masks);
* RMSNorm keeps its input and the normalised input, the next linear keeps the scaled output:
  ``3 w`` for a norm of width w followed by a linear;
* SwiGLU MLP of width F: fc1 output (2F), both gated halves (2F) and fc2's input (F): ``5 F``;
* attention: the fused q/k/v output, q and k after RoPE, the output (GQA: q = a d, kv = g d):
  ``qkv + (q + kv) + q``; multi-latent attention (DeepSeek-V3): the latent down-projection
  ``(kv_lora + rope)``, its norm (2 kv_lora), the q latent and its norm (3 q_lora), q and k
  ``a (d_nope + d_rope)`` each, v and the output ``a d_v`` each;
* MoE: the shared expert as an MLP, each token's top-k copies at ``h + 5 F_moe`` (balanced routing);
* flash attention stores no ``a s^2`` scores; the math path (CPU with unequal q/v head dims, as in
  MLA) stores them in fp32;
* the loss keeps an fp32 softmax over the vocabulary shard: ``4 V / t`` bytes per token.

Full recomputation (Megatron's uniform method, n layers per chunk) keeps only each chunk's input
(``s b h``, sharded by SP) and rebuilds one chunk at a time in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_r1.config import ModelConfig

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per element of a params_dtype


@dataclass(frozen=True)
class Shape:
    """One micro-batch on one rank."""

    seq_len: int  # tokens per sequence (after context parallelism)
    micro_batch: int  # sequences
    tp: int = 1  # tensor parallel
    sequence_parallel: bool = False
    flash_attention: bool = True  # False: the attention scores are stored (math path)


def _norm_linear(width: int) -> int:
    return 3 * width


def attention_elements(model: ModelConfig) -> tuple[int, int]:
    """(elements per token kept by the attention block, of which sequence-parallel: the norm part)."""
    h, a = model.hidden_size, model.num_attention_heads
    if model.multi_latent_attention:
        d_qk = model.qk_head_dim + model.qk_pos_emb_head_dim
        q_latent = 3 * model.q_lora_rank if model.q_lora_rank else 0
        kv_latent = (model.kv_lora_rank + model.qk_pos_emb_head_dim) + 2 * model.kv_lora_rank
        heads = a * d_qk * 2 + a * model.v_head_dim * 2
        return _norm_linear(h) + q_latent + kv_latent + heads, _norm_linear(h)
    q = a * model.kv_channels
    kv = model.num_query_groups * model.kv_channels
    return _norm_linear(h) + (q + 2 * kv) + (q + kv) + q, _norm_linear(h)


def mlp_elements(model: ModelConfig, moe: bool) -> tuple[int, int]:
    """(elements per token kept by the MLP block, of which sequence-parallel)."""
    h = model.hidden_size
    if not moe:
        return _norm_linear(h) + 5 * model.ffn_hidden_size, _norm_linear(h)
    shared = (h + 5 * model.moe_shared_expert_intermediate_size) if model.moe_shared_expert_intermediate_size else 0
    routed = model.moe_router_topk * (h + 5 * model.moe_ffn_hidden_size)
    return 2 * h + shared + routed, 2 * h


def rope_elements(model: ModelConfig) -> int:
    """Per sequence position (not per sequence): the cos/sin tables RoPE keeps, per layer."""
    return 4 * (model.qk_pos_emb_head_dim if model.multi_latent_attention else model.kv_channels)


def layer_bytes(model: ModelConfig, shape: Shape, moe: bool, dtype: str | None = None) -> int:
    """Bytes one decoder layer keeps for backward for one micro-batch on one rank."""
    size = BYTES[dtype or model.params_dtype]
    tokens = shape.seq_len * shape.micro_batch
    elements = 0.0
    for total, sp_part in (attention_elements(model), mlp_elements(model, moe)):
        sharded = total - sp_part
        elements += sharded / shape.tp + sp_part / (shape.tp if shape.sequence_parallel else 1)
    out = tokens * elements * size + shape.seq_len * rope_elements(model) * 4
    if not shape.flash_attention:  # scores kept in fp32: a/t heads x s x s per sequence
        out += 4 * (model.num_attention_heads // shape.tp) * shape.seq_len**2 * shape.micro_batch
    return int(out)


def loss_bytes(model: ModelConfig, shape: Shape, dtype: str | None = None) -> int:
    """The last stage beyond its layers: final norm + output layer input, and the fp32 softmax."""
    size = BYTES[dtype or model.params_dtype]
    tokens = shape.seq_len * shape.micro_batch
    norm = _norm_linear(model.hidden_size) / (shape.tp if shape.sequence_parallel else 1)
    return int(tokens * (norm * size + 4 * model.vocab_size / shape.tp))


def recompute_kept_bytes(model: ModelConfig, shape: Shape, chunks: int, dtype: str | None = None) -> int:
    """What full recomputation keeps for one micro-batch: each chunk's input hidden states (sharded
    by SP), and the fp32 rotary table every chunk receives (one shared tensor)."""
    size = BYTES[dtype or model.params_dtype]
    hidden = shape.seq_len * shape.micro_batch * model.hidden_size * size / (shape.tp if shape.sequence_parallel else 1)
    rope = shape.seq_len * (model.qk_pos_emb_head_dim if model.multi_latent_attention else model.kv_channels) * 4
    return int(chunks * hidden + rope)
