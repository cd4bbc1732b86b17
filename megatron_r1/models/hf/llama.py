"""Llama (`LlamaForCausalLM`) <-> Megatron-Core GPTModel; the dense GQA + SwiGLU mapping Qwen2 reuses.

Layouts that differ between the two:

* attention input projection: Megatron fuses q, k and v into `linear_qkv`, grouped by key/value
  head: for each query group g, `[q heads of g (heads/groups x head_dim rows); k_g; v_g]`. HF keeps
  `q_proj`, `k_proj`, `v_proj`; query head h of HF uses key/value head h // (heads/groups), which
  is the same grouping, so only the rows are regrouped (biases alike);
* SwiGLU input projection: Megatron's `linear_fc1` is `[gate; up]` stacked along rows; HF keeps
  `gate_proj` and `up_proj`;
* norms: Megatron's local spec (CPU) has `input_layernorm` / `pre_mlp_layernorm` modules;
  Transformer Engine's spec (GPU) fuses them into the next linear as `layer_norm_weight`. Both
  map to HF's `input_layernorm` / `post_attention_layernorm`.

RoPE is the same rotate-half (non-interleaved) form on both sides, so no rows are permuted.

q/k/v biases (Megatron's `add_qkv_bias`) are Llama's `attention_bias=true`, which also gives
`o_proj` a bias: exported as zeros, and required to be zero on import. The tiny CPU model exports
this way because standard loaders (`AutoTokenizer`, and through it vLLM) keep a custom tokenizer of
a `llama` directory as it was saved, while for `qwen2` they substitute Qwen's own pre-tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from megatron_r1.config import ConfigError, ModelConfig
from megatron_r1.models.hf.base import WHOLE_MODEL_NAMES, HFAdapter

_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def split_qkv(qkv: Tensor, cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Megatron's grouped `linear_qkv` weight [rows, hidden] or bias [rows] -> HF (q, k, v)."""
    groups, d = cfg.num_query_groups, cfg.kv_channels
    per_group = cfg.num_attention_heads // groups
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, (per_group + 2) * d, *rest).split([per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: ModelConfig) -> Tensor:
    """HF (q, k, v) -> Megatron's grouped `linear_qkv` layout (the inverse of `split_qkv`)."""
    groups, d = cfg.num_query_groups, cfg.kv_channels
    rest = q.shape[1:]
    parts = [q.reshape(groups, -1, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def hf_params_dtype(hf_config: dict) -> str:
    """The checkpoint's dtype as a ModelConfig dtype (`dtype`, or `torch_dtype` of older configs)."""
    dtype = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32").replace("torch.", "")
    return dtype if dtype in _DTYPE_NAMES else "bfloat16"


def rope_theta(hf_config: dict, default: float) -> float:
    """RoPE theta from `rope_parameters` (transformers 5) or top-level `rope_theta` (older configs);
    ConfigError for scaled rope variants, which the Megatron side here does not build."""
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"{hf_config.get('model_type')} config uses rope type {kind!r}; only plain RoPE is supported")
    return float(rope.get("rope_theta", hf_config.get("rope_theta", default)))


class LlamaAdapter(HFAdapter):
    """Dense Megatron GPTModel (GQA, SwiGLU, RMSNorm, RoPE) <-> HF `LlamaForCausalLM`."""

    architecture = "LlamaForCausalLM"
    model_type = "llama"
    default_max_positions = 2048  # HF's defaults, for configs that leave a key out
    default_rope_theta = 10000.0

    # ---- config ------------------------------------------------------------------------------

    def check_config(self, cfg: ModelConfig) -> None:
        """ConfigError unless this HF architecture computes what Megatron does for `cfg`."""
        where = f"model (arch={cfg.arch})"
        if cfg.multi_latent_attention or cfg.num_experts:
            raise ConfigError(f"{where}: {self.architecture} is dense GQA; use arch=deepseek_v3 for MLA / MoE")
        if cfg.num_attention_heads % cfg.num_query_groups:
            raise ConfigError(f"{where}: num_attention_heads must be a multiple of num_query_groups")
        self._check_variant(cfg, where)

    def _check_variant(self, cfg: ModelConfig, where: str) -> None:
        """What only this architecture requires (Qwen2 overrides it). Llama expresses q/k/v biases
        with `attention_bias`, which also gives o_proj a bias: exported as zeros, required to be
        zero on import (Megatron's attention has none there)."""

    def hf_config(self, cfg: ModelConfig) -> dict:
        """config.json contents for `cfg` (raises ConfigError if HF cannot express it)."""
        self.check_config(cfg)
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.ffn_hidden_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_query_groups,
            "head_dim": cfg.kv_channels,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.norm_epsilon,
            # Both spellings: transformers 5 reads rope_parameters, older readers rope_theta.
            "rope_theta": cfg.rotary_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
            "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_method_std,
            "attention_dropout": 0.0,
            "use_cache": True,
            **self._extra_hf_config(cfg),
            "torch_dtype": cfg.params_dtype,
            "dtype": cfg.params_dtype,
        }

    def _extra_hf_config(self, cfg: ModelConfig) -> dict:
        return {"attention_bias": cfg.add_qkv_bias, "mlp_bias": False}

    def model_config(self, hf_config: dict) -> ModelConfig:
        """ModelConfig for a config.json of this architecture (ConfigError for what is not supported)."""
        c = hf_config
        self._check_hf_config(c)
        heads = c.get("num_attention_heads", 32)
        hidden = c.get("hidden_size", 4096)
        cfg = ModelConfig(
            arch=self.model_type,
            vocab_size=c.get("vocab_size", 32000),
            hidden_size=hidden,
            ffn_hidden_size=c.get("intermediate_size", 11008),
            num_layers=c.get("num_hidden_layers", 32),
            num_attention_heads=heads,
            num_query_groups=c.get("num_key_value_heads") or heads,
            kv_channels=c.get("head_dim") or hidden // heads,
            max_position_embeddings=c.get("max_position_embeddings", self.default_max_positions),
            rotary_base=rope_theta(c, self.default_rope_theta),
            norm_epsilon=c.get("rms_norm_eps", 1e-6),
            add_qkv_bias=self._has_qkv_bias(c),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            init_method_std=c.get("initializer_range", 0.02),
            params_dtype=hf_params_dtype(c),
        )
        self.check_config(cfg)
        return cfg

    def _check_hf_config(self, c: dict) -> None:
        """ConfigError for config.json features the Megatron side does not build."""
        if c.get("hidden_act", "silu") != "silu":
            act = c["hidden_act"]
            raise ConfigError(f"{self.model_type} config has hidden_act={act!r}; only silu (SwiGLU) is supported")
        self._check_hf_variant(c)

    def _check_hf_variant(self, c: dict) -> None:
        if c.get("mlp_bias"):
            raise ConfigError("llama config has mlp_bias=true; Megatron's dense MLP here has no biases")

    def _has_qkv_bias(self, c: dict) -> bool:
        return bool(c.get("attention_bias"))

    def _o_proj_bias(self, cfg: ModelConfig) -> bool:
        """True when the HF layout has an o_proj bias that Megatron lacks (Llama's attention_bias)."""
        return cfg.add_qkv_bias

    # ---- tensors -----------------------------------------------------------------------------

    def to_hf(self, name: str, tensor: Tensor, cfg: ModelConfig) -> list[tuple[str, Tensor]]:
        """One full Megatron tensor (global name) -> its HF tensors; [] for what HF does not store."""
        if name.endswith("_extra_state") or (name == "output_layer.weight" and cfg.tie_embeddings):
            return []
        if name in WHOLE_MODEL_NAMES:
            return [(WHOLE_MODEL_NAMES[name], tensor)]
        prefix, rest = self._layer(name)
        if rest == "self_attention.linear_proj.weight" and self._o_proj_bias(cfg):
            zeros = torch.zeros(tensor.shape[0], dtype=tensor.dtype, device=tensor.device)
            return [(prefix + "self_attn.o_proj.weight", tensor), (prefix + "self_attn.o_proj.bias", zeros)]
        if rest in _LAYER_RENAMES:
            return [(prefix + _LAYER_RENAMES[rest], tensor)]
        if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = split_qkv(tensor, cfg)
            return [(f"{prefix}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v))]
        if rest == "mlp.linear_fc1.weight":
            gate, up = torch.chunk(tensor, 2, dim=0)
            return [(prefix + "mlp.gate_proj.weight", gate), (prefix + "mlp.up_proj.weight", up)]
        raise KeyError(f"no {self.architecture} mapping for Megatron tensor {name!r}")

    def from_hf(self, name: str, get: Callable[[str], Tensor], cfg: ModelConfig) -> Tensor | None:
        """The full Megatron tensor `name` from HF tensors read through `get`; None for TE metadata."""
        if name.endswith("_extra_state"):
            return None
        if name == "output_layer.weight" and cfg.tie_embeddings:  # tied checkpoints store no lm_head
            return get(WHOLE_MODEL_NAMES["embedding.word_embeddings.weight"])
        if name in WHOLE_MODEL_NAMES:
            return get(WHOLE_MODEL_NAMES[name])
        prefix, rest = self._layer(name)
        if rest == "self_attention.linear_proj.weight" and self._o_proj_bias(cfg):
            bias = get(prefix + "self_attn.o_proj.bias")
            if bias.count_nonzero():
                raise ConfigError(
                    f"{prefix}self_attn.o_proj.bias is not zero: Megatron's attention here has q/k/v biases only, "
                    "so this checkpoint cannot be loaded exactly"
                )
        if rest in _LAYER_RENAMES:
            return get(prefix + _LAYER_RENAMES[rest])
        if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = (get(f"{prefix}self_attn.{p}_proj.{kind}") for p in "qkv")
            return fuse_qkv(q, k, v, cfg)
        if rest == "mlp.linear_fc1.weight":
            return torch.cat([get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight")], dim=0)
        raise KeyError(f"no {self.architecture} mapping for Megatron tensor {name!r}")

    def _layer(self, name: str) -> tuple[str, str]:
        """`decoder.layers.L.rest` -> (`model.layers.L.`, rest)."""
        match = _LAYER.fullmatch(name)
        if match is None:
            raise KeyError(f"no {self.architecture} mapping for Megatron tensor {name!r}")
        return f"model.layers.{match[1]}.", match[2]


ADAPTER = LlamaAdapter()
