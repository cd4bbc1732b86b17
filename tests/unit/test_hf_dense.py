"""Dense HF adapters (Qwen2, Llama) against real transformers and Megatron-Core, single process:
logits parity, bit-exact round trip, `save_hf` directories that transformers and vLLM load.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_r1.config import ConfigError, ModelConfig, ParallelConfig, load_config
from megatron_r1.models.build import build_model
from megatron_r1.models.hf import (
    export_hf_tensors,
    get_adapter,
    iter_full_state,
    load_full_state,
    load_hf,
    read_hf_config,
    save_hf,
)

pytestmark = pytest.mark.usefixtures("one_rank")


def tiny(arch: str, tied: bool) -> ModelConfig:
    """GQA (4 heads, 2 key/value heads). Llama gets a head_dim unlike hidden/heads (96 / 4 != 32).
    `llama+bias`: Llama with q/k/v biases (HF `attention_bias`, a zero o_proj bias), as the tiny model."""
    bias = arch == "qwen2" or arch.endswith("+bias")
    arch = arch.removesuffix("+bias")
    return ModelConfig(
        arch=arch,
        vocab_size=256,
        hidden_size=128 if arch == "qwen2" else 96,
        ffn_hidden_size=192,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=32,
        max_position_embeddings=64,
        rotary_base=10000.0 if arch == "qwen2" else 500000.0,
        norm_epsilon=1e-5,
        add_qkv_bias=bias,
        tie_embeddings=tied,
    )


CASES = [("qwen2", True), ("qwen2", False), ("llama", True), ("llama", False), ("llama+bias", True)]
CASE_IDS = [f"{a}-{'tied' if t else 'untied'}" for a, t in CASES]


def make_hf_checkpoint(cfg: ModelConfig, out: Path, seed: int = 0) -> Path:
    """A random HF model of `cfg` saved with `save_pretrained`. Every tensor is randomised (HF
    initialises biases to 0 and norms to 1, which would hide a wrongly mapped bias or norm)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    hf_cfg = dict(get_adapter(cfg.arch).hf_config(cfg))
    model_type = hf_cfg.pop("model_type")
    hf_cfg.pop("architectures")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf_cfg), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
            if name.endswith("o_proj.bias"):  # Llama's attention_bias: Megatron has none on o_proj
                p.zero_()
    model.save_pretrained(out)
    return out


def hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(ids).logits


def megatron_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, attention_mask=None)


def tokens(cfg: ModelConfig, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def case(request, one_rank, tmp_path_factory):
    """(cfg, HF directory, Megatron model loaded from it) for one architecture / tying."""
    arch, tied = request.param
    cfg = tiny(arch, tied)
    hf_dir = make_hf_checkpoint(cfg, tmp_path_factory.mktemp(f"{arch}_{tied}"))
    model = build_model(cfg, ParallelConfig()).eval()
    load_hf(model, cfg, hf_dir)
    return cfg, hf_dir, model


# --------------------------------------------------------------------------------------------
# Tensors.


def test_logits_match_transformers(case):
    cfg, hf_dir, model = case
    ids = tokens(cfg)
    expected = hf_logits(hf_dir, ids)
    got = megatron_logits(model, ids)
    assert got.shape == expected.shape == (2, 24, cfg.vocab_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_round_trip_is_bit_exact(case):
    cfg, hf_dir, model = case
    original = load_file(hf_dir / "model.safetensors")
    exported = dict(export_hf_tensors(model, cfg))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name


def test_saved_directory_loads_in_transformers(case, tmp_path):
    cfg, hf_dir, model = case
    out = save_hf(model, cfg, tmp_path / "out")
    assert read_hf_config(out) == cfg
    ids = tokens(cfg, seed=2)
    torch.testing.assert_close(hf_logits(out, ids), hf_logits(hf_dir, ids), rtol=0, atol=0)


def test_sharded_save_loads_back(one_rank, tmp_path):
    """A small shard limit gives numbered shards + index; transformers and load_hf both read them."""
    cfg = tiny("qwen2", tied=False)
    hf_dir = make_hf_checkpoint(cfg, tmp_path / "hf", seed=3)
    model = build_model(cfg, ParallelConfig()).eval()
    load_hf(model, cfg, hf_dir)
    out = save_hf(model, cfg, tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"

    fresh = build_model(cfg, ParallelConfig()).eval()
    load_hf(fresh, cfg, out)
    for (name, a), (_, b) in zip(iter_full_state(model), iter_full_state(fresh)):
        assert torch.equal(a, b), name
    ids = tokens(cfg, seed=4)
    torch.testing.assert_close(hf_logits(out, ids), hf_logits(hf_dir, ids), rtol=0, atol=0)


def small_tokenizer(out: Path):
    from megatron_r1.data.tokenizer import train_tokenizer

    return train_tokenizer(["1 + 2 = 3", "<think>a b</think><answer>4</answer>"] * 20, 300, out)


def test_bfloat16_save_and_tokenizer_files(one_rank, tmp_path):
    """dtype= casts; tokenizer files are copied and their special ids reach the configs."""
    from transformers import AutoModelForCausalLM

    from megatron_r1.data.tokenizer import EOS_TOKEN

    tokenizer = small_tokenizer(tmp_path / "tok")
    cfg = dataclasses.replace(tiny("llama", tied=True), vocab_size=320)  # room for the tokenizer's 270 tokens
    model = build_model(cfg, ParallelConfig()).eval()
    out = save_hf(model, cfg, tmp_path / "bf16", tokenizer_dir=tmp_path / "tok", dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos
    assert config["eos_token_id"] == config["pad_token_id"] == eos
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert read_hf_config(out).params_dtype == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16 and hf.generation_config.eos_token_id == eos


def test_transformer_engine_names_map_like_local_ones():
    """The GPU (TE) spec fuses each norm into the next linear; both names land on the same HF tensor."""
    adapter, cfg = get_adapter("qwen2"), tiny("qwen2", tied=True)
    w = torch.arange(4.0)
    assert adapter.to_hf("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", w, cfg) == [
        ("model.layers.1.input_layernorm.weight", w)
    ]
    assert adapter.to_hf("decoder.layers.1.mlp.linear_fc1.layer_norm_weight", w, cfg) == [
        ("model.layers.1.post_attention_layernorm.weight", w)
    ]
    assert adapter.to_hf("decoder.layers.0.mlp.linear_fc1._extra_state", w, cfg) == []
    assert adapter.to_hf("output_layer.weight", w, cfg) == []  # tied: HF stores only the embedding
    hf = {"model.embed_tokens.weight": w}
    assert adapter.from_hf("output_layer.weight", hf.__getitem__, cfg) is w


def test_qkv_layout_groups_query_heads_with_their_kv_head():
    """Rows of Megatron's fused qkv: per group [q heads of the group; k; v]."""
    from megatron_r1.models.hf.llama import fuse_qkv, split_qkv

    cfg = dataclasses.replace(tiny("llama", tied=True), num_attention_heads=4, num_query_groups=2, kv_channels=1)
    q, k, v = torch.tensor([0.0, 1, 2, 3]), torch.tensor([10.0, 11]), torch.tensor([20.0, 21])
    fused = fuse_qkv(q, k, v, cfg)
    assert fused.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, cfg), (q, k, v)))


# --------------------------------------------------------------------------------------------
# Errors a user can cause.


def test_unknown_arch_names_the_supported_ones():
    with pytest.raises(ValueError, match="deepseek_v3, llama, qwen2"):
        get_adapter("gpt2")


def test_missing_checkpoint_is_one_clear_error(one_rank, tmp_path):
    cfg = tiny("qwen2", tied=True)
    model = build_model(cfg, ParallelConfig())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf(model, cfg, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_hf_config(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(one_rank):
    cfg = tiny("qwen2", tied=True)
    model = build_model(cfg, ParallelConfig())
    with pytest.raises(ValueError, match=r"embedding.word_embeddings.weight.*\(10, 128\).*\(256, 128\)"):
        load_full_state(model, lambda name: torch.zeros(10, 128) if name.startswith("embedding") else None)


@pytest.mark.parametrize(
    "arch, override, needle",
    [
        ("qwen2", {"add_qkv_bias": False}, "add_qkv_bias=true"),
        ("qwen2", {"kv_channels": 16}, "hidden_size"),
        ("llama", {"num_experts": 4}, "deepseek_v3"),
    ],
)
def test_configs_hf_cannot_express_fail_with_the_fix(arch, override, needle):
    cfg = dataclasses.replace(tiny(arch, tied=True), **override)
    with pytest.raises(ConfigError, match=needle):
        get_adapter(arch).hf_config(cfg)


# --------------------------------------------------------------------------------------------
# Configs.


@pytest.mark.parametrize("preset", ["tiny_dense", "qwen2.5_7b"])
def test_presets_round_trip_through_hf_config(preset):
    cfg = load_config(None, [f"model={preset}"]).model
    adapter = get_adapter(cfg.arch)
    back = adapter.model_config(adapter.hf_config(cfg))
    assert back == dataclasses.replace(cfg, fp8_recipe=None)


def test_tiny_dense_preset_is_the_default_model():
    assert load_config(None, ["model=tiny_dense"]).model == ModelConfig()


def test_published_qwen2_5_7b_config_gives_the_preset():
    published = {  # config.json of Qwen/Qwen2.5-7B
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
        "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True, "use_mrope": False,
        "use_sliding_window": False, "vocab_size": 152064,
    }
    cfg = get_adapter("qwen2").model_config(published)
    preset = load_config(None, ["model=qwen2.5_7b"]).model
    # The base model's config.json advertises 131072 positions; the preset trains at 32768.
    assert cfg == dataclasses.replace(preset, max_position_embeddings=131072)


def test_scaled_rope_is_refused():
    c = get_adapter("llama").hf_config(tiny("llama", tied=False))
    c["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(ConfigError, match="llama3"):
        get_adapter("llama").model_config(c)


# --------------------------------------------------------------------------------------------
# vLLM.


def test_vllm_greedy_generation_equals_transformers(one_rank, in_process_vllm, tmp_path):
    """The tiny default model exported by save_hf runs in vLLM (CPU) and decodes like transformers."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    from vllm import LLM, SamplingParams

    cfg = ModelConfig()  # head_dim 64: a size vLLM's CPU attention supports
    hf_dir = make_hf_checkpoint(cfg, tmp_path / "hf", seed=5)
    model = build_model(cfg, ParallelConfig()).eval()
    load_hf(model, cfg, hf_dir)
    small_tokenizer(tmp_path / "tok")  # the export carries tokenizer files and generation_config.json
    out = save_hf(model, cfg, tmp_path / "export", tokenizer_dir=tmp_path / "tok")

    prompts, n = [[5, 17, 300, 42, 9], [100, 200, 300, 400, 500, 60, 7]], 16
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    gen = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = [hf.generate(torch.tensor([p]), generation_config=gen)[0, len(p) :].tolist() for p in prompts]

    threads = torch.get_num_threads()
    llm = LLM(model=str(out), skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=128)
    torch.set_num_threads(threads)  # starting the engine drops torch to one thread
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
        use_tqdm=False,
    )
    del llm
    assert [list(o.outputs[0].token_ids) for o in outs] == expected


def test_llama_with_a_nonzero_o_proj_bias_is_refused(tmp_path):
    from safetensors.torch import save_file

    from megatron_r1.distributed import init_distributed

    init_distributed(ParallelConfig())  # the raw vllm.LLM above may have torn the process group down

    cfg = tiny("llama+bias", tied=True)
    hf_dir = make_hf_checkpoint(cfg, tmp_path)
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.bias"] += 0.5
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model.layers.1.self_attn.o_proj.bias is not zero"):
        load_hf(build_model(cfg, ParallelConfig()), cfg, hf_dir)


def test_exported_tiny_model_loads_its_tokenizer_with_autotokenizer(tmp_path):
    """A tiny-model export with the tiny tokenizer: AutoTokenizer (what vLLM uses) and
    PreTrainedTokenizerFast give the training ids, special tags included."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from megatron_r1.distributed import init_distributed

    init_distributed(ParallelConfig())

    from megatron_r1.data.tiny_corpus import tokenizer_training_texts
    from megatron_r1.data.tokenizer import train_tokenizer

    tok_dir = tmp_path / "tok"
    trained = train_tokenizer(tokenizer_training_texts(300, seed=1), vocab_size=512, out_dir=tok_dir)
    cfg = load_config(None, ["model=tiny_dense"]).model
    out = save_hf(build_model(cfg, ParallelConfig()), cfg, tmp_path / "hf", tokenizer_dir=tok_dir)
    text = "A conversation between User and Assistant. 5 + 3 - 7 = <think> 5 + 3 = 8, - 7 = 1 </think> <answer> 1 </answer>"
    expected = trained(text)["input_ids"]
    for loader in (AutoTokenizer, PreTrainedTokenizerFast):
        tok = loader.from_pretrained(out)
        assert tok(text)["input_ids"] == expected, loader.__name__
        assert tok.decode(expected) == text
