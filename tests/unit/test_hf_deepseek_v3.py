"""DeepSeek-V3 adapter: HF transformers <-> Megatron (MLA + MoE) logits parity, bit-exact round trip,
and greedy generation in vLLM (CPU) from the exported directory equal to HF's.

Real transformers, Megatron-Core and vLLM throughout; the model is `conf/models/tiny_moe.yaml`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_r1.config import ConfigError, ModelConfig, ParallelConfig, load_config
from megatron_r1.distributed import init_distributed
from megatron_r1.models.build import build_model
from megatron_r1.models.hf import export_hf_tensors, get_adapter, load_hf, read_hf_config, save_hf
from megatron_r1.models.hf.deepseek_v3 import ADAPTER, dequantize_fp8

PARALLEL = ParallelConfig()
PROMPTS = [[5, 17, 300, 42, 9], [100, 200, 300, 400, 500, 600, 7], [3] * 12]


def tiny() -> ModelConfig:
    return load_config(None, ["model=tiny_moe"]).model


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    init_distributed(PARALLEL)


def make_hf_checkpoint(cfg: ModelConfig, out: Path, seed: int = 0) -> Path:
    """A randomly initialised DeepseekV3ForCausalLM saved as a HF directory.

    The router's correction bias is set to random non-zero values: it is zero at init, and then
    neither the biased group/expert choice nor its export would be tested.
    """
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    hf_cfg = {k: v for k, v in ADAPTER.hf_config(cfg).items() if k not in ("architectures", "model_type")}
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_cfg))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))
    model.save_pretrained(out)
    return out


def load_megatron(cfg: ModelConfig, hf_dir: Path) -> torch.nn.Module:
    """A single-process Megatron model holding the HF directory's weights."""
    init_distributed(PARALLEL)
    model = build_model(cfg, PARALLEL).eval()
    load_hf(model, cfg, hf_dir)
    return model


def megatron_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, None)


def hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tiny(), tmp_path_factory.mktemp("dsv3_hf"))


@pytest.fixture(scope="module")
def megatron(hf_dir) -> torch.nn.Module:
    return load_megatron(tiny(), hf_dir)


# --------------------------------------------------------------------------------------------
# Config mapping.


def test_registry_and_directory_config(hf_dir):
    assert get_adapter("deepseek_v3") is ADAPTER
    assert read_hf_config(hf_dir) == tiny()


@pytest.mark.parametrize("preset", ["tiny_moe", "deepseek_v3_671b"])
def test_hf_config_maps_back_to_the_same_architecture(preset):
    cfg = load_config(None, [f"model={preset}"]).model
    back = ADAPTER.model_config(ADAPTER.hf_config(cfg))
    # Run choices that a HF config does not carry: FP8 training recipe, aux-loss weight, MTP (not exported).
    not_in_hf = {
        "fp8_recipe", "moe_aux_loss_coeff", "mtp_num_layers", "mtp_loss_scaling_factor", "moe_router_bias_update_rate"
    }
    for f in dataclasses.fields(ModelConfig):
        if f.name not in not_in_hf:
            assert getattr(back, f.name) == getattr(cfg, f.name), f.name


def test_published_config_json_is_understood():
    """The legacy `rope_scaling` form of DeepSeek-V3's own config.json."""
    published = {
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
        "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
        "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "max_position_embeddings": 163840, "rope_theta": 10000, "torch_dtype": "bfloat16",
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
    }
    cfg = ADAPTER.model_config(published)
    expected = load_config(None, ["model=deepseek_v3_671b"]).model
    for name in ("num_layers", "hidden_size", "num_experts", "moe_router_group_topk", "rope_type",
                 "rope_scaling_factor", "rope_mscale_all_dim", "q_lora_rank", "first_k_dense_layers", "params_dtype"):
        assert getattr(cfg, name) == getattr(expected, name), name


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"moe_router_topk": 4}, "top-2"),  # 4 // 1 = 4 experts per group, HF scores groups by 2
        ({"moe_norm_topk_prob": False}, "moe_norm_topk_prob=true"),
        ({"moe_router_score_function": "softmax"}, "sigmoid"),
        ({"moe_shared_expert_intermediate_size": 96}, "multiple"),
        ({"multi_latent_attention": False}, "multi-latent"),
    ],
)
def test_configs_hf_cannot_express_fail_with_the_fix(override, needle):
    cfg = dataclasses.replace(tiny(), **override)
    with pytest.raises(ConfigError, match=needle):
        ADAPTER.hf_config(cfg)


# --------------------------------------------------------------------------------------------
# Tensors.


def test_logits_match_hf(hf_dir, megatron):
    ids = torch.randint(0, tiny().vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(hf_dir, ids)
    got = megatron_logits(megatron, ids)
    assert ref.shape == got.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_yarn_logits_match_hf(tmp_path):
    """Yarn scaling (rotary frequencies, attention factor and mscale^2 softmax scale) past the original length."""
    cfg = dataclasses.replace(
        tiny(), rope_type="yarn", rope_scaling_factor=4.0, rope_original_max_position_embeddings=16,
        rope_mscale=1.0, rope_mscale_all_dim=1.0,
    )
    hf_dir = make_hf_checkpoint(cfg, tmp_path, seed=1)
    model = load_megatron(cfg, hf_dir)  # Megatron's YarnRotaryEmbedding enters `torch.device(cuda ordinal)`
    ids = torch.randint(0, cfg.vocab_size, (1, 48), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(megatron_logits(model, ids), hf_logits(hf_dir, ids), rtol=0, atol=1e-4)


def test_round_trip_is_bit_exact(hf_dir, megatron):
    original = load_file(hf_dir / "model.safetensors")
    exported = dict(export_hf_tensors(megatron, tiny()))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name


def test_mtp_and_te_metadata_are_not_exported():
    cfg = tiny()
    assert ADAPTER.to_hf("mtp.layers.0.eh_proj.weight", torch.zeros(2, 2), cfg) == []
    assert ADAPTER.to_hf("decoder.layers.0.mlp.linear_fc1._extra_state", torch.zeros(1), cfg) == []
    assert ADAPTER.from_hf("mtp.layers.0.enorm.weight", lambda n: torch.zeros(1), cfg) is None


def test_transformer_engine_names_map_like_local_ones():
    """GPU specs fuse norms into the next linear and group experts; they land on the same HF tensors."""
    cfg = tiny()
    w = torch.arange(8.0)
    assert ADAPTER.to_hf("decoder.layers.1.self_attention.linear_kv_up_proj.layer_norm_weight", w, cfg) == [
        ("model.layers.1.self_attn.kv_a_layernorm.weight", w)
    ]
    assert ADAPTER.to_hf("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", w, cfg)[0][0] == (
        "model.layers.0.post_attention_layernorm.weight"
    )
    fc1 = torch.randn(2 * cfg.moe_ffn_hidden_size, cfg.hidden_size)
    grouped = ADAPTER.to_hf("decoder.layers.1.mlp.experts.linear_fc1.weight5", fc1, cfg)
    local = ADAPTER.to_hf("decoder.layers.1.mlp.experts.local_experts.5.linear_fc1.weight", fc1, cfg)
    assert [n for n, _ in grouped] == [n for n, _ in local] == [
        "model.layers.1.mlp.experts.5.gate_proj.weight",
        "model.layers.1.mlp.experts.5.up_proj.weight",
    ]


def test_fp8_checkpoint_weights_are_dequantized():
    """Published DeepSeek-V3 weights: float8_e4m3fn with one float32 `weight_scale_inv` per 128x128 block."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 130, generator=g).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 2, generator=g) + 0.5
    expected = weight.float().clone()
    for i in range(2):
        for j in range(2):
            expected[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] *= scale[i, j]
    torch.testing.assert_close(dequantize_fp8(weight, scale), expected, rtol=0, atol=0)
    name = "model.layers.0.self_attn.o_proj.weight"
    store = {name: weight, name + "_scale_inv": scale}
    got = ADAPTER.from_hf("decoder.layers.0.self_attention.linear_proj.weight", store.__getitem__, tiny())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# vLLM.
#
# vLLM 0.32's CPU rotary kernel (`ops.rotary_embedding`, behind `RotaryEmbedding.forward_cpu`)
# rotates [tokens, heads, head_dim] inputs with more than one head wrongly; flattened
# [tokens, heads * head_dim] inputs, which its GQA models pass, are right. Its DeepSeek MLA layer
# passes the 3-D query with plain RoPE (yarn uses a PyTorch implementation instead), so with plain
# RoPE the engine needs the PyTorch path. `test_vllm_cpu_rotary_kernel_*` flags when that changes.


# torch globals that vLLM's CPU worker replaces when imported (vllm/v1/worker/cpu/shm.py); they are
# put back after each test so that later tests see platform.py's stand-ins again.
_VLLM_OVERWRITES = [
    (torch, "Event"), (torch.cuda, "Event"), (torch.cuda, "Stream"), (torch.cuda, "set_stream"),
    (torch.cuda, "current_stream"), (torch.cuda, "stream"), (torch.accelerator, "synchronize"),
    (torch.accelerator, "empty_cache"), (torch.Tensor, "pin_memory"), (torch.Tensor, "record_stream"),
]


@pytest.fixture
def torch_globals_restored(monkeypatch):
    for owner, attr in _VLLM_OVERWRITES:
        if hasattr(owner, attr):
            monkeypatch.setattr(owner, attr, getattr(owner, attr))


@pytest.fixture
def vllm_in_process(monkeypatch, torch_globals_restored):
    """vLLM in this process, as the colocated engine runs, leaving no global state behind."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    threads = torch.get_num_threads()
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    monkeypatch.setattr(RotaryEmbedding, "forward_cpu", RotaryEmbedding.forward_native)
    yield
    torch.set_num_threads(threads)  # starting an engine drops torch to one thread


def test_vllm_cpu_rotary_kernel_still_mishandles_multi_head_3d_inputs(torch_globals_restored):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(64, max_position=64, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                        is_neox_style=False, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    positions, query, key = torch.arange(5), torch.randn(5, 2, 64, generator=g), torch.randn(5, 1, 64, generator=g)
    expected, _ = rope.forward_native(positions, query.clone(), key.clone())
    got, _ = rope.forward_cpu(positions, query.clone(), key.clone())
    if torch.allclose(got, expected, atol=1e-5):
        pytest.fail("vLLM's CPU rotary kernel is fixed: drop the forward_native workaround for DeepSeek MLA")


def hf_greedy(hf_dir: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    from transformers import DeepseekV3ForCausalLM, GenerationConfig

    model = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    gen = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    outs = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), generation_config=gen)
        outs.append(ids[0, len(p) :].tolist())
    return outs


def test_vllm_greedy_generation_equals_hf(hf_dir, megatron, tmp_path, vllm_in_process):
    from vllm import LLM, SamplingParams

    exported = save_hf(megatron, tiny(), tmp_path / "export")
    n = 24
    expected = hf_greedy(exported, PROMPTS, n)
    # CPU_MLA is vLLM's portable CPU MLA backend; the AMX one it prefers where present is bf16-only.
    llm = LLM(
        model=str(exported), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
        max_model_len=256, attention_config={"backend": "CPU_MLA"},
    )
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS],
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
        use_tqdm=False,
    )
    got = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    assert got == expected
