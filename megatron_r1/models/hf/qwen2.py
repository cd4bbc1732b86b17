"""Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`) <-> Megatron-Core GPTModel.

Qwen2 is the Llama layout (see `llama.py`) plus a bias on q, k and v (and none on o_proj), which
is exactly Megatron's `add_qkv_bias`. Two constraints come from the consumers of the export:
HF's Qwen2 attention always has those biases, and vLLM's Qwen2 computes head_dim as
hidden_size / num_attention_heads (it ignores a `head_dim` key), so both must hold.
"""

from __future__ import annotations

from megatron_r1.config import ConfigError, ModelConfig
from megatron_r1.models.hf.llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    """Dense Megatron GPTModel with q/k/v biases <-> HF `Qwen2ForCausalLM`."""

    architecture = "Qwen2ForCausalLM"
    model_type = "qwen2"
    default_max_positions = 32768
    default_rope_theta = 10000.0

    def _check_variant(self, cfg: ModelConfig, where: str) -> None:
        if not cfg.add_qkv_bias:
            raise ConfigError(f"{where}: Qwen2 always has q/k/v biases; set model.add_qkv_bias=true or use arch=llama")
        if cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size:
            raise ConfigError(
                f"{where}: Qwen2 (in vLLM) needs kv_channels x num_attention_heads == hidden_size "
                f"({cfg.kv_channels} x {cfg.num_attention_heads} != {cfg.hidden_size}); "
                "use arch=llama for other head sizes"
            )

    def _extra_hf_config(self, cfg: ModelConfig) -> dict:
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers}

    def _check_hf_variant(self, c: dict) -> None:
        if c.get("use_sliding_window"):
            raise ConfigError("qwen2 config has use_sliding_window=true; sliding-window attention is not supported")

    def _has_qkv_bias(self, c: dict) -> bool:
        return True

    def _o_proj_bias(self, cfg: ModelConfig) -> bool:
        return False


ADAPTER = Qwen2Adapter()
