"""Megatron-Core `GPTModel` from a `ModelConfig` (dense Llama/Qwen2 or DeepSeek-V3 MLA + MoE).

Call after `distributed.init_distributed`: the model is built for this rank's tensor, pipeline and
expert parallel shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.router_replay import RouterReplay
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_r1 import platform
from megatron_r1.config import ConfigError, MemoryConfig, ModelConfig, ParallelConfig
from megatron_r1.models.hf.base import check_model_config
from megatron_r1.models.spec import decoder_block_spec, mtp_block_spec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def moe_layers(model: ModelConfig) -> list[bool]:
    """True for each MoE decoder layer: the first `first_k_dense_layers` are dense (Megatron's moe_layer_freq)."""
    if not model.num_experts:
        return [False] * model.num_layers
    return [i >= model.first_k_dense_layers for i in range(model.num_layers)]


def transformer_config(
    model: ModelConfig, parallel: ParallelConfig, memory: MemoryConfig | None = None, *, check_fp8: bool = True,
    gpu: bool | None = None,
) -> TransformerConfig:
    """Translate our config into Megatron's TransformerConfig (MLATransformerConfig for MLA).

    `check_fp8=False` lets the layout planner describe an FP8 model on a machine without Transformer
    Engine (it builds the model on the meta device to count parameters, never runs it).
    `gpu=True` describes the config a GPU node with Transformer Engine gets (FP8 flags, fused
    kernels, alltoall dispatcher) on any machine, so Megatron's own validation of it runs in CPU
    tests; None: this machine's."""
    use_te = platform.has_transformer_engine() if gpu is None else gpu
    on_cuda = platform.has_cuda() if gpu is None else gpu
    memory = memory or MemoryConfig()
    parallel.layers_per_stage(model.num_layers)  # one clear line before Megatron's assert
    if model.fp8_recipe and not use_te and check_fp8:
        raise ConfigError(f"model.fp8_recipe={model.fp8_recipe!r} needs Transformer Engine on a GPU; unset it here")
    dtype = _DTYPES[model.params_dtype]
    common = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        hidden_dropout=0.0,  # RL and SFT on reasoning traces run without dropout
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel and parallel.tensor_model_parallel_size > 1,
        use_cpu_initialization=not on_cuda,
        # Fused kernels exist only on GPU builds; the unfused paths are numerically the reference.
        bias_activation_fusion=use_te,
        bias_dropout_fusion=use_te,
        masked_softmax_fusion=use_te,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        mtp_num_layers=model.mtp_num_layers or None,
        mtp_loss_scaling_factor=model.mtp_loss_scaling_factor,
    )
    if memory.recompute == "full":
        # Keep only each chunk's input; the chunk's forward runs again inside backward.
        common.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=memory.recompute_num_layers)
    if model.fp8_recipe and use_te:
        common.update(fp8="hybrid", fp8_recipe=model.fp8_recipe)
    if model.num_experts:
        common.update(
            num_moe_experts=model.num_experts,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
            moe_router_topk=model.moe_router_topk,
            moe_router_score_function=model.moe_router_score_function,
            moe_router_enable_expert_bias=model.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=model.moe_router_bias_update_rate,
            moe_router_num_groups=model.moe_router_num_groups,
            moe_router_group_topk=model.moe_router_group_topk,
            moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
            moe_router_dtype="fp32",
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_router_load_balancing_type="seq_aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
            moe_layer_freq=[int(moe) for moe in moe_layers(model)],
            # alltoall needs CUDA events; allgather is exact and runs over gloo.
            moe_token_dispatcher_type="alltoall" if on_cuda else "allgather",
            moe_grouped_gemm=use_te,
            moe_permute_fusion=False,
            # A routing-replay slot in every router (idle until R2/R3 set an action: train/moe_routing.py).
            moe_enable_routing_replay=True,
        )
    if not model.multi_latent_attention:
        return TransformerConfig(**common)
    return MLATransformerConfig(
        **common,
        q_lora_rank=model.q_lora_rank,
        kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_head_dim,
        qk_pos_emb_head_dim=model.qk_pos_emb_head_dim,
        v_head_dim=model.v_head_dim,
        qk_layernorm=True,  # the q/kv latent RMSNorms of DeepSeek-V2/V3
        rope_type=model.rope_type,
        rotary_base=model.rotary_base,
        rotary_scaling_factor=model.rope_scaling_factor,
        original_max_position_embeddings=model.rope_original_max_position_embeddings,
        beta_fast=model.rope_beta_fast,
        beta_slow=model.rope_beta_slow,
        mscale=model.rope_mscale,
        mscale_all_dim=model.rope_mscale_all_dim,
    )


def build_model(model: ModelConfig, parallel: ParallelConfig, memory: MemoryConfig | None = None) -> GPTModel:
    """Build this rank's shard of the model (pipeline stage, TP/EP partition)."""
    check_model_config(model)
    gpt = gpt_model(transformer_config(model, parallel, memory), model)
    # Megatron also lists every replay slot process-wide; train/moe_routing.py addresses each
    # model's routers itself, so that list would only keep old models' slots alive.
    RouterReplay.clear_global_router_replay_instances()
    if platform.has_cuda():
        gpt = gpt.cuda()
    return gpt


def gpt_model(config: TransformerConfig, model: ModelConfig) -> GPTModel:
    """The GPTModel for `config` on the current device (the planner builds it on the meta device)."""
    block = decoder_block_spec(config, platform.has_transformer_engine())
    return GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        parallel_output=True,  # logits stay vocab-parallel; losses use vocab-parallel cross entropy
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",  # MLA layers apply their own (decoupled) rotary embedding
        rotary_base=int(model.rotary_base),
        mtp_block_spec=mtp_block_spec(config, block, platform.has_transformer_engine()),
    )


def num_parameters(model: torch.nn.Module) -> int:
    """Parameters held by this rank."""
    return sum(p.numel() for p in model.parameters())
