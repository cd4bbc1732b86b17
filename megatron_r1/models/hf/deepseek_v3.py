"""DeepSeek-V3 (`DeepseekV3ForCausalLM`) <-> Megatron-Core GPTModel with MLA and MoE.

Tensor layouts: Megatron's MLA and Hugging Face's DeepSeek-V3 agree, so every attention tensor
maps one to one, unpermuted:

* `linear_kv_down_proj` rows are `[kv_lora_rank latent | qk_pos_emb_head_dim rotary key]`, the
  same order as `kv_a_proj_with_mqa`;
* `linear_q_up_proj` (or `linear_q_proj`) rows are per head `[qk_head_dim nope | rope]`, and
  `linear_kv_up_proj` rows per head `[qk_head_dim k_nope | v_head_dim value]`, as in `q_b_proj`
  and `kv_b_proj`;
* RoPE: the checkpoint stores rotary dims as interleaved pairs (x0, x1), (x2, x3), ... HF rotates
  them with `rope_interleave=True` (its default, written into every exported config); Megatron,
  given `multi_latent_attention=True`, de-interleaves before `rotate_half`. Both produce the same
  de-interleaved rotated vector, so q.k is identical and no rows are permuted.

MLP tensors: Megatron's SwiGLU `linear_fc1` is `[gate; up]` stacked along rows; HF keeps
`gate_proj` and `up_proj` apart. Routed experts are written per expert
(`mlp.experts.J.{gate,up,down}_proj`), the layout of the published checkpoints that both
`transformers` (which packs them on load) and vLLM read.

Routing: both use sigmoid scores, pick groups with `expert_bias` added, then take the top-k
experts, and weight them by the *unbiased* scores, renormalised and multiplied by
`routed_scaling_factor`. Two differences constrain which configs map (`check_config`):

* HF ranks a group by the sum of its top-2 scores; Megatron by its top `topk // group_topk`
  scores, so with group-limited routing `topk // group_topk` must be 2 (DeepSeek-V3: 8 // 4);
* Megatron always renormalises sigmoid top-k weights when topk > 1 and never when topk == 1,
  so HF's `norm_topk_prob` must equal `topk > 1`.

Not carried: multi-token-prediction (MTP) modules. HF transformers' model has none (published
checkpoints keep them as `model.layers.<num_layers>.*`, which transformers and vLLM's main model
skip), so `to_hf` returns [] for `mtp.*`, `from_hf` returns None (keep the fresh init), exported
configs say `num_nextn_predict_layers: 0`, and `model_config` leaves `mtp_num_layers` at 0.

Published FP8 checkpoints (`weight` in float8 + `weight_scale_inv` per 128x128 block) are
dequantized on load. The rollout engine refuses them (`check_rollout_weights`): vLLM would build FP8
layers from their `quantization_config`, while the weight sync sends bf16 tensors without scales.
`megatron-r1 convert fp8-to-bf16` writes the bf16 copy that both trainer and engine start from.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_r1.config import ConfigError, ModelConfig
from megatron_r1.models.hf.base import WHOLE_MODEL_NAMES, HFAdapter

ARCHITECTURE = "DeepseekV3ForCausalLM"

log = logging.getLogger(__name__)


# Per-layer tensors that map one to one (suffix after `decoder.layers.L.` -> after `model.layers.L.`).
# The `layer_norm_weight` names are Transformer Engine's spec, where a norm is fused into the
# linear that follows it; the local (CPU) spec keeps the norm as its own module.
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.linear_q_proj.weight": "self_attn.q_proj.weight",
    "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
    "self_attention.linear_kv_down_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attn.kv_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias",
    "mlp.shared_experts.linear_fc2.weight": "mlp.shared_experts.down_proj.weight",
}

# SwiGLU input projections: one Megatron tensor [gate; up] -> HF `<prefix>.gate_proj` and `<prefix>.up_proj`.
_LAYER_GATED = {
    "mlp.linear_fc1.weight": "mlp",
    "mlp.shared_experts.linear_fc1.weight": "mlp.shared_experts",
}

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
# Routed experts: local spec `local_experts.J.linear_fcN.weight`, TE grouped GEMM `linear_fcN.weightJ`.
_EXPERT = re.compile(
    r"mlp\.experts\.(?:local_experts\.(?P<j>\d+)\.linear_(?P<fc>fc[12])\.weight"
    r"|linear_(?P<fc_g>fc[12])\.weight(?P<j_g>\d+))"
)

_FP8_BLOCK = 128  # DeepSeek-V3's published FP8 checkpoints scale weights per 128 x 128 block


def _is_skipped(name: str) -> bool:
    """Tensors HF does not store: TE's FP8 metadata and the MTP modules (see module docstring)."""
    return name.endswith("_extra_state") or name.startswith("mtp.")


def hf_names(name: str) -> list[str]:
    """The HF tensors one Megatron tensor becomes, in the order they are stacked in it."""
    if name in WHOLE_MODEL_NAMES:
        return [WHOLE_MODEL_NAMES[name]]
    match = _LAYER.fullmatch(name)
    if match is None:
        raise KeyError(f"no DeepSeek-V3 mapping for Megatron tensor {name!r}")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    if rest in _LAYER_RENAMES:
        return [prefix + _LAYER_RENAMES[rest]]
    if rest in _LAYER_GATED:
        base = prefix + _LAYER_GATED[rest]
        return [f"{base}.gate_proj.weight", f"{base}.up_proj.weight"]
    expert = _EXPERT.fullmatch(rest)
    if expert is not None:
        j = expert["j"] or expert["j_g"]
        fc = expert["fc"] or expert["fc_g"]
        base = f"{prefix}mlp.experts.{j}"
        if fc == "fc1":
            return [f"{base}.gate_proj.weight", f"{base}.up_proj.weight"]
        return [f"{base}.down_proj.weight"]
    raise KeyError(f"no DeepSeek-V3 mapping for Megatron tensor {name!r}")


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = _FP8_BLOCK) -> torch.Tensor:
    """float8 weight x per-block `weight_scale_inv` -> float32 (DeepSeek-V3's FP8 checkpoint format)."""
    rows, cols = weight.shape
    expected = (math.ceil(rows / block), math.ceil(cols / block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"FP8 scale of shape {tuple(scale_inv.shape)} does not tile {tuple(weight.shape)} in {block}-blocks"
        )
    scale = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return weight.float() * scale


def fp8_quantization(hf_config: dict) -> dict | None:
    """The `quantization_config` of a checkpoint stored as FP8 weights with block scales, else None."""
    quant = hf_config.get("quantization_config") or {}
    return quant if quant.get("quant_method") == "fp8" else None


def check_rollout_weights(model_dir: str | Path) -> None:
    """Raise ConfigError if `model_dir` is an FP8 checkpoint: vLLM would build FP8 layers for it, and
    the bf16 tensors the trainer syncs after each update (no `weight_scale_inv`) would not fit them."""
    config = Path(model_dir) / "config.json"
    if config.is_file() and fp8_quantization(json.loads(config.read_text())) is not None:
        raise ConfigError(
            f"{model_dir} holds FP8 weights (quantization_config in config.json), but the rollout engine runs "
            f"bf16: run `megatron-r1 convert fp8-to-bf16 {model_dir} DST` once and set checkpoint.load_hf=DST"
        )


def check_config(cfg: ModelConfig) -> None:
    """Raise ConfigError unless HF DeepSeek-V3 computes what Megatron does for `cfg` (routing above all)."""
    where = "model (arch=deepseek_v3)"
    if not cfg.multi_latent_attention:
        raise ConfigError(f"{where}: DeepSeek-V3 uses multi-latent attention; set model.multi_latent_attention=true")
    if not cfg.num_experts or not cfg.moe_ffn_hidden_size:
        raise ConfigError(f"{where}: set model.num_experts and model.moe_ffn_hidden_size (DeepSeek-V3 is MoE)")
    if cfg.moe_router_score_function != "sigmoid":
        raise ConfigError(
            f"{where}: DeepSeek-V3 routes with sigmoid scores; set model.moe_router_score_function=sigmoid"
        )
    shared = cfg.moe_shared_expert_intermediate_size
    if not shared or shared % cfg.moe_ffn_hidden_size:
        raise ConfigError(
            f"{where}: model.moe_shared_expert_intermediate_size must be a positive multiple of "
            f"model.moe_ffn_hidden_size (n_shared_experts x moe_intermediate_size in HF)"
        )
    if cfg.moe_norm_topk_prob != (cfg.moe_router_topk > 1):
        raise ConfigError(
            f"{where}: Megatron renormalises sigmoid top-k weights exactly when topk > 1; "
            f"set model.moe_norm_topk_prob={str(cfg.moe_router_topk > 1).lower()}"
        )
    groups, group_topk = _groups(cfg)
    if cfg.num_experts % groups or cfg.num_experts // groups < 2:
        raise ConfigError(f"{where}: model.num_experts must split into model.moe_router_num_groups groups of >= 2")
    if group_topk < groups and cfg.moe_router_topk // group_topk != 2:
        raise ConfigError(
            f"{where}: HF ranks expert groups by their top-2 scores, Megatron by top "
            f"(moe_router_topk // moe_router_group_topk) = {cfg.moe_router_topk // group_topk}; "
            f"choose moe_router_topk = 2 x moe_router_group_topk"
        )
    if cfg.rope_type == "rope" and cfg.rope_scaling_factor != 1.0:
        raise ConfigError(f"{where}: model.rope_scaling_factor applies to rope_type=yarn only; set it to 1.0")


def _groups(cfg: ModelConfig) -> tuple[int, int]:
    """(n_group, topk_group) in HF terms; no grouping is one group that every token uses."""
    groups = cfg.moe_router_num_groups or 1
    group_topk = cfg.moe_router_group_topk or groups
    return groups, group_topk


def _params_dtype(hf_config: dict) -> str:
    """The checkpoint's dtype as a ModelConfig dtype (FP8 checkpoints are dequantized to bf16 training)."""
    dtype = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32").replace("torch.", "")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "bfloat16"


def _rope_parameters(cfg: ModelConfig) -> dict:
    if cfg.rope_type == "rope":
        return {"rope_type": "default", "rope_theta": cfg.rotary_base}
    return {
        "rope_type": "yarn",
        "rope_theta": cfg.rotary_base,
        "factor": cfg.rope_scaling_factor,
        "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
        "beta_fast": cfg.rope_beta_fast,
        "beta_slow": cfg.rope_beta_slow,
        "mscale": cfg.rope_mscale,
        "mscale_all_dim": cfg.rope_mscale_all_dim,
    }


class DeepseekV3Adapter(HFAdapter):
    """Megatron MLA + MoE GPTModel <-> HF `DeepseekV3ForCausalLM` (see the module docstring)."""

    architecture = ARCHITECTURE

    def check_config(self, cfg: ModelConfig) -> None:
        check_config(cfg)

    def hf_config(self, cfg: ModelConfig) -> dict:
        """config.json contents for `cfg` (raises ConfigError if HF cannot express it)."""
        check_config(cfg)
        groups, group_topk = _groups(cfg)
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "deepseek_v3",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.ffn_hidden_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_attention_heads,  # MLA: every head has its own k/v
            "q_lora_rank": cfg.q_lora_rank,
            "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_head_dim,
            "qk_rope_head_dim": cfg.qk_pos_emb_head_dim,
            "v_head_dim": cfg.v_head_dim,
            "max_position_embeddings": cfg.max_position_embeddings,
            "rope_parameters": _rope_parameters(cfg),
            "rope_interleave": True,  # the layout Megatron's MLA rope assumes (module docstring)
            "rms_norm_eps": cfg.norm_epsilon,
            "hidden_act": "silu",
            "attention_bias": False,
            "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_method_std,
            "n_routed_experts": cfg.num_experts,
            "moe_intermediate_size": cfg.moe_ffn_hidden_size,
            "n_shared_experts": cfg.moe_shared_expert_intermediate_size // cfg.moe_ffn_hidden_size,
            "num_experts_per_tok": cfg.moe_router_topk,
            "n_group": groups,
            "topk_group": group_topk,
            "norm_topk_prob": cfg.moe_router_topk > 1,
            "routed_scaling_factor": cfg.moe_router_topk_scaling_factor or 1.0,
            "first_k_dense_replace": cfg.first_k_dense_layers,
            # vLLM reads these two to build the bias-corrected sigmoid router.
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "num_nextn_predict_layers": 0,  # MTP weights are not exported (module docstring)
            "dtype": cfg.params_dtype,
        }

    def model_config(self, hf_config: dict) -> ModelConfig:
        """ModelConfig for a DeepSeek-V3 config.json (`rope_parameters` or legacy `rope_scaling`)."""
        c = hf_config
        for key, expected in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            if c.get(key, expected) != expected:
                raise ConfigError(f"DeepSeek-V3 config has {key}={c[key]!r}; only {expected!r} is supported")
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ConfigError(f"DeepSeek-V3 config has rope type {rope_type!r}; only default and yarn are supported")
        heads = c.get("num_attention_heads", 128)
        n_experts = c.get("n_routed_experts", 256)
        moe_ffn = c.get("moe_intermediate_size", 2048)
        groups = c.get("n_group") or 1
        group_topk = c.get("topk_group") or groups
        topk = c.get("num_experts_per_tok", 8)
        cfg = ModelConfig(
            arch="deepseek_v3",
            vocab_size=c.get("vocab_size", 129280),
            hidden_size=c.get("hidden_size", 7168),
            ffn_hidden_size=c.get("intermediate_size", 18432),
            num_layers=c.get("num_hidden_layers", 61),
            num_attention_heads=heads,
            num_query_groups=heads,
            kv_channels=c.get("v_head_dim", 128),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            rotary_base=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            norm_epsilon=c.get("rms_norm_eps", 1e-6),
            add_qkv_bias=bool(c.get("attention_bias", False)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            init_method_std=c.get("initializer_range", 0.02),
            multi_latent_attention=True,
            q_lora_rank=c.get("q_lora_rank", 1536),
            kv_lora_rank=c.get("kv_lora_rank", 512),
            qk_head_dim=c.get("qk_nope_head_dim", 128),
            qk_pos_emb_head_dim=c.get("qk_rope_head_dim", 64),
            v_head_dim=c.get("v_head_dim", 128),
            num_experts=n_experts,
            moe_ffn_hidden_size=moe_ffn,
            moe_shared_expert_intermediate_size=moe_ffn * c.get("n_shared_experts", 1),
            moe_router_topk=topk,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_num_groups=groups if groups > 1 else None,
            moe_router_group_topk=group_topk if groups > 1 else None,
            moe_router_topk_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
            moe_norm_topk_prob=bool(c.get("norm_topk_prob", True)),
            first_k_dense_layers=c.get("first_k_dense_replace", 3),
            mtp_num_layers=0,
            params_dtype=_params_dtype(c),
        )
        if c.get("num_nextn_predict_layers"):
            log.info(
                "%d multi-token-prediction layer(s) in the checkpoint are not loaded: the policy is trained without "
                "MTP (Hugging Face transformers and vLLM's main model do not run them either)", c["num_nextn_predict_layers"]
            )
        if rope_type == "yarn":
            cfg.rope_type = "yarn"
            cfg.rope_scaling_factor = float(rope["factor"])
            cfg.rope_original_max_position_embeddings = int(rope["original_max_position_embeddings"])
            cfg.rope_beta_fast = float(rope.get("beta_fast") or 32.0)
            cfg.rope_beta_slow = float(rope.get("beta_slow") or 1.0)
            cfg.rope_mscale = float(rope.get("mscale") or 1.0)
            cfg.rope_mscale_all_dim = float(rope.get("mscale_all_dim") or 0.0)
        check_config(cfg)
        return cfg

    def to_hf(self, name: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
        """One full Megatron tensor (global name) -> its HF tensors; [] for what HF does not store."""
        if _is_skipped(name):
            return []
        names = hf_names(name)
        if name.endswith(".mlp.router.weight") and not cfg.moe_router_enable_expert_bias:
            # HF's router always has a correction bias; without Megatron's, it is zero.
            bias_name = names[0].replace(".gate.weight", ".gate.e_score_correction_bias")
            return [(names[0], tensor), (bias_name, torch.zeros(tensor.shape[0], dtype=torch.float32))]
        if len(names) == 1:
            return [(names[0], tensor)]
        return list(zip(names, torch.chunk(tensor, len(names), dim=0)))

    def from_hf(self, name: str, get: Callable[[str], torch.Tensor], cfg: ModelConfig) -> torch.Tensor | None:
        """The full Megatron tensor `name` from HF tensors read through `get`; None for MTP / TE metadata."""
        if _is_skipped(name):
            return None
        parts = [self._read(hf_name, get) for hf_name in hf_names(name)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    @staticmethod
    def _read(hf_name: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        tensor = get(hf_name)
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            tensor = dequantize_fp8(tensor, get(hf_name + "_scale_inv"))
        return tensor


ADAPTER = DeepseekV3Adapter()
