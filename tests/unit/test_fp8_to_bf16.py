"""`megatron-r1 convert fp8-to-bf16`: DeepSeek-V3's published FP8 checkpoint -> the bf16 copy the
rollout engine runs, and the engine's refusal of FP8 directories.

The source is a tiny DeepseekV3ForCausalLM (`conf/models/tiny_moe.yaml`) stored the way DeepSeek
publishes V3: linear weights float8_e4m3fn with a float32 `weight_scale_inv` per 128x128 block
(kv_a_proj_with_mqa's 576 rows, q_b_proj's 64 columns and the experts' 64-wide sides end in partial
blocks), everything else bf16 except the router's float32 correction bias, a multi-token-prediction
layer after the last one, several shards with an index, and `quantization_config` in config.json.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_r1 import cli
from megatron_r1.config import ConfigError, RolloutConfig
from megatron_r1.convert import fp8_to_bf16
from megatron_r1.models.build import build_model
from megatron_r1.models.hf import export_hf_tensors, load_hf, read_hf_config
from megatron_r1.models.hf.deepseek_v3 import check_rollout_weights, dequantize_fp8
from tests.unit.test_hf_deepseek_v3 import PARALLEL, make_hf_checkpoint, megatron_logits, tiny

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 128
QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
MTP = "model.layers.2."  # tiny_moe has 2 layers; the published V3 keeps its MTP module as layer 61


def quantize_blockwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn weight and float32 `weight_scale_inv` (block amax / 448), as DeepSeek's FP8 checkpoints."""
    rows, cols = weight.shape
    tiles = (-(-rows // BLOCK), -(-cols // BLOCK))
    scale = torch.empty(tiles, dtype=torch.float32)
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(tiles[0]):
        for j in range(tiles[1]):
            block = weight[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK].float()
            scale[i, j] = block.abs().max().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
            quantized[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (block / scale[i, j]).to(torch.float8_e4m3fn)
    return quantized, scale


def is_quantized_in_v3(name: str, tensor: torch.Tensor) -> bool:
    """DeepSeek-V3 stores every attention/MLP projection in FP8; embeddings, head, norms and router stay bf16."""
    return tensor.dim() == 2 and name.endswith("_proj.weight")


def make_fp8_checkpoint(out: Path, seed: int = 0) -> Path:
    bf16_source = make_hf_checkpoint(tiny(), out.with_name(out.name + "_plain"), seed=seed)
    tensors = load_file(bf16_source / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    # A multi-token-prediction layer, as the published checkpoint carries one after the last layer.
    tensors[MTP + "eh_proj.weight"] = 0.02 * torch.randn(128, 256, generator=g)
    tensors[MTP + "enorm.weight"] = torch.ones(128)
    tensors[MTP + "self_attn.o_proj.weight"] = 0.02 * torch.randn(128, 128, generator=g)
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if is_quantized_in_v3(name, tensor):
            stored[name], stored[name + "_scale_inv"] = quantize_blockwise(tensor)
        elif name.endswith("e_score_correction_bias"):
            stored[name] = tensor.float()
        else:
            stored[name] = tensor.to(torch.bfloat16)
    # Three shards; layer 0's scales in the last one, away from their weights.
    names = sorted(stored)
    late = [n for n in names if n.startswith("model.layers.0.") and n.endswith("_scale_inv")]
    rest = [n for n in names if n not in late]
    shards = [rest[: len(rest) // 2], rest[len(rest) // 2 :], late]
    out.mkdir(parents=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: stored[n].contiguous() for n in shard}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((bf16_source / "config.json").read_text())
    config.update(quantization_config=QUANTIZATION, torch_dtype="bfloat16", dtype="bfloat16", num_nextn_predict_layers=1)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text((bf16_source / "generation_config.json").read_text())
    (out / "README.md").write_text("tiny FP8 DeepSeek-V3\n")
    (out / ".cache").mkdir()  # huggingface_hub's download metadata: not part of the model
    (out / ".cache" / "model.lock").write_text("")
    return out


def read_dir(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for file in sorted(set(index.values())):
        tensors.update(load_file(hf_dir / file))
    return tensors


def convert_cli(*args: str) -> subprocess.CompletedProcess:
    """The conversion as users run it (the tool script is the CLI's `convert` command)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "fp8-to-bf16", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory) -> Path:
    return make_fp8_checkpoint(tmp_path_factory.mktemp("dsv3") / "fp8")


@pytest.fixture(scope="module")
def converted(fp8_dir) -> Path:
    dst = fp8_dir.with_name("bf16")
    run = convert_cli(str(fp8_dir), str(dst), "--max-shard-gb", "0.0005")  # ~0.5 MB: several output shards
    assert run.returncode == 0, run.stderr
    return dst


# --------------------------------------------------------------------------------------------
# The converted directory.


def test_output_is_a_plain_bf16_model_for_transformers(fp8_dir, converted):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(converted)
    assert getattr(config, "quantization_config", None) is None
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    assert config.num_nextn_predict_layers == 1  # the MTP layer is still described
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert model.dtype == torch.bfloat16
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    # Sharded with an index; nothing half-written or hidden left behind.
    assert len(list(converted.glob("model-*-of-*.safetensors"))) > 3
    assert not fp8_dir.with_name("bf16.tmp").exists()
    assert sorted(p.name for p in converted.iterdir() if not p.name.endswith(".safetensors")) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors.index.json",
    ]
    assert (converted / "generation_config.json").read_bytes() == (fp8_dir / "generation_config.json").read_bytes()


def test_every_tensor_is_the_dequantized_source(fp8_dir, converted):
    source, out = read_dir(fp8_dir), read_dir(converted)
    weights = {n for n in source if not n.endswith("_scale_inv")}
    assert set(out) == weights  # scales dropped, everything else kept (MTP layer included)
    assert any(n.startswith(MTP) for n in out)
    dequantized = 0
    for name in weights:
        if source[name].dtype == torch.float8_e4m3fn:
            expected = dequantize_fp8(source[name], source[name + "_scale_inv"]).to(torch.bfloat16)
            dequantized += 1
        else:
            expected = source[name]  # bf16 norms/embeddings and the float32 correction bias, bit for bit
        assert out[name].dtype == expected.dtype, name
        assert torch.equal(out[name], expected), name
    assert dequantized == sum(1 for n in source if n.endswith("_scale_inv")) > 20


def test_engine_weights_equal_what_the_trainer_loads_from_fp8(fp8_dir, converted, one_rank):
    """The recipe trains in bf16 from the FP8 directory: its parameters are the converted tensors, bit for bit."""
    cfg = read_hf_config(fp8_dir)
    assert cfg.params_dtype == "bfloat16"
    model = build_model(cfg, PARALLEL)
    load_hf(model, cfg, fp8_dir)  # the trainer dequantizes FP8 itself
    out = read_dir(converted)
    trainer = dict(export_hf_tensors(model, cfg))
    assert trainer
    quantized = {n.removesuffix("_scale_inv") for n in read_dir(fp8_dir) if n.endswith("_scale_inv")}
    for name, tensor in trainer.items():
        if name in quantized:
            assert tensor.dtype == torch.bfloat16, name
        # Megatron's CPU norms and the router bias stay float32, holding the same values.
        assert torch.equal(tensor, out[name].to(tensor.dtype)), name
    assert quantized & set(trainer)


def test_converted_logits_equal_the_trainers(fp8_dir, tmp_path, one_rank):
    """transformers on the converted directory vs Megatron loaded from the FP8 one, both float32."""
    from transformers import AutoModelForCausalLM

    dst = tmp_path / "fp32"
    fp8_to_bf16(fp8_dir, dst, dtype="float32")
    cfg = dataclasses.replace(read_hf_config(fp8_dir), params_dtype="float32")
    megatron = build_model(cfg, PARALLEL).eval()
    load_hf(megatron, cfg, fp8_dir)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    hf = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(megatron_logits(megatron, ids), ref, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Errors: one line each, nothing written.


def without_one_scale(fp8_dir: Path, out: Path) -> Path:
    import shutil

    shutil.copytree(fp8_dir, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    victim = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    path = out / index[victim]
    kept = {n: t for n, t in load_file(path).items() if n != victim}
    save_file(kept, str(path), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing", "no such directory"),
        ("not_fp8", "nothing to convert"),
        ("no_scale", "model.layers.1.self_attn.o_proj.weight has no model.layers.1.self_attn.o_proj.weight_scale_inv"),
        ("dst_taken", "already exists and is not empty"),
    ],
)
def test_errors_are_one_line_and_write_nothing(case, needle, fp8_dir, tmp_path, capsys):
    src, dst = fp8_dir, tmp_path / "out"
    if case == "missing":
        src = tmp_path / "nowhere"
    elif case == "not_fp8":
        src = make_hf_checkpoint(tiny(), tmp_path / "plain")
    elif case == "no_scale":
        src = without_one_scale(fp8_dir, tmp_path / "broken")
    elif case == "dst_taken":
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    capsys.readouterr()  # setup's own output (transformers' save bar)
    code = cli.main(["convert", "fp8-to-bf16", str(src), str(dst)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out.tmp").exists()
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] if case == "dst_taken" else not dst.exists()


# --------------------------------------------------------------------------------------------
# The rollout engine's start-up check.


def test_engine_refuses_fp8_and_accepts_the_converted_copy(fp8_dir, converted):
    from megatron_r1.rollout.vllm_engine import VLLMEngine

    with pytest.raises(ConfigError, match=r"megatron-r1 convert fp8-to-bf16 .* DST` once and set checkpoint.load_hf=DST") as e:
        VLLMEngine(RolloutConfig(max_model_len=128), str(fp8_dir))  # refused before vLLM starts
    assert "\n" not in str(e.value)
    check_rollout_weights(converted)
