"""Checkpoint conversion: Megatron `dist_checkpointing` checkpoints <-> Hugging Face directories.

    megatron-r1 convert to-hf --checkpoint runs/r1_zero_tiny/checkpoints [--step N] --out /tmp/hf
    megatron-r1 convert from-hf --hf assets/tiny_base --stage conf/stages/r1_zero_tiny.yaml \
        [parallel.tensor_model_parallel_size=2 ...] --out /tmp/ckpt
    megatron-r1 convert fp8-to-bf16 checkpoints/DeepSeek-V3-Base checkpoints/DeepSeek-V3-Base-bf16

`to-hf` loads the weights of a checkpoint of any TP/PP/EP layout into a model of this job's layout
(one process by default; run it under torchrun for a model that needs several), then streams it
tensor by tensor into safetensors files (sharded with an index above 5 GB), with config.json and
the tokenizer of the model the run started from. `from-hf` builds the stage's model in the stage's
layout from a Hugging Face directory and saves it as a step-0 checkpoint that `r1-zero` starts from
with `checkpoint.load_megatron=DIR`.

Both verify what they wrote: `to-hf` checks that every tensor the model's adapter names is in the
files with its shape (routed experts included, one by one), that nothing else is, and that the
parameter count equals the model's; `from-hf` reads its checkpoint back and compares every tensor.
A mismatch is one error line naming the keys.

`fp8-to-bf16` dequantizes a Hugging Face FP8 checkpoint (DeepSeek-V3's published format) into a
bf16 one without `quantization_config`: the directory the rollout engine (and the trainer) start
from; see the section at the end.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

from megatron_r1 import distributed, platform
from megatron_r1.config import ConfigError, ModelConfig, ParallelConfig, StageConfig, from_dict, to_dict
from megatron_r1.models.build import build_model
from megatron_r1.models.hf.base import (
    _DTYPES,
    _entries,
    _SafetensorsReader,
    _ShardWriter,
    get_adapter,
    iter_full_state,
    load_hf,
    read_hf_config,
    save_hf,
    unwrap,
)
from megatron_r1.models.hf.deepseek_v3 import dequantize_fp8, fp8_quantization
from megatron_r1.train import checkpoint as ckpt

log = logging.getLogger(__name__)


class ConversionError(ConfigError):
    """What a conversion wrote is not the model; the message names the keys."""


def _names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def hf_manifest(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the adapter gives the whole model, with its shape, worked out from the
    model's own parameters (global names and full shapes; meta tensors, no data, no communication).
    Only what this rank's pipeline stage holds; `to_hf` gathers the stages' manifests."""
    adapter = get_adapter(cfg.arch)
    manifest: dict[str, tuple[int, ...]] = {}
    for entry in _entries(unwrap(model)):
        if not entry.exported:
            continue
        for name in entry.names:
            for hf_name, tensor in adapter.to_hf(name, torch.empty(entry.full_shape, dtype=entry.tensor.dtype, device="meta"), cfg):
                manifest[hf_name] = tuple(tensor.shape)
    return manifest


def _whole_manifest(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """`hf_manifest` over all pipeline stages (and expert ranks: every rank names every expert)."""
    mine = hf_manifest(model, cfg)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    whole: dict[str, tuple[int, ...]] = {}
    for part in parts:
        whole.update(part)
    return whole


def read_hf_shapes(hf_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a HF directory's safetensors files (headers only)."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    shapes = {}
    for file in files:
        path = hf_dir / file
        if not path.is_file():
            raise ConversionError(f"{path} is missing (named by {index.name if index.is_file() else 'the directory layout'})")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def verify_hf_dir(hf_dir: str | Path, expected: dict[str, tuple[int, ...]]) -> int:
    """Check that `hf_dir` holds exactly the `expected` tensors with their shapes; returns the
    number of values written. Raises `ConversionError` naming the keys otherwise."""
    written = read_hf_shapes(hf_dir)
    missing = [k for k in expected if k not in written]
    extra = [k for k in written if k not in expected]
    wrong = [f"{k} {written[k]} != {expected[k]}" for k in expected if k in written and written[k] != expected[k]]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {_names(missing)}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s): {_names(extra)}")
        if wrong:
            parts.append(f"wrong shape: {_names(wrong)}")
        raise ConversionError(f"{hf_dir} does not match the model: " + "; ".join(parts))
    total = sum(_numel(s) for s in written.values())
    if total != sum(_numel(s) for s in expected.values()):
        raise ConversionError(f"{hf_dir} holds {total:,} values, the model {sum(_numel(s) for s in expected.values()):,}")
    return total


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def global_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the whole model (all TP/EP/PP shards; a tied output layer counted once)."""
    gpt = unwrap(model)
    params = {id(p) for p in gpt.parameters()}
    count = sum(_numel(e.full_shape) * len(e.names) for e in _entries(gpt) if e.exported and id(e.tensor) in params)
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron.core import parallel_state

        # Stages hold different layers; ranks within a stage report the same full count.
        # On the compute device: parallel_state's groups are NCCL-only on GPUs.
        box = torch.tensor([float(count)], dtype=torch.float64, device=platform.device())
        group = parallel_state.get_pipeline_model_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(box, group=group)
        count = int(box.item())
    return count


# --------------------------------------------------------------------------------------------
# Megatron checkpoint -> Hugging Face.


def _run_model_info(trainer_state: dict, where: Path) -> tuple[ModelConfig, Path | None]:
    info = trainer_state.get("extra", {}).get("model_info")
    if not info:
        raise ConversionError(
            f"{where} does not record the model it holds (saved by an older version); "
            "convert it with --model-config HF_DIR naming the Hugging Face directory the run started from"
        )
    return from_dict(ModelConfig, info["model"], "model"), (Path(info["tokenizer_dir"]) if info.get("tokenizer_dir") else None)


def check_output_dir(out: str | Path, flag: str) -> None:
    """An output directory must be new or empty: a file there, or an earlier result, is never overwritten."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConversionError(f"{flag} {path} is a file; give a directory to create")
    if path.is_dir() and any(path.iterdir()):
        raise ConversionError(f"{flag} {path} is not empty; give a new directory (or remove it first)")


def to_hf(checkpoint_root: str | Path, out: str | Path, step: int | None = None, model_config: str | Path | None = None,
          parallel: ParallelConfig | None = None, dtype: str | None = None) -> dict:
    """Write the checkpoint of `step` (default: the latest) under `checkpoint_root` as a HF directory.
    Collective; returns what was written (tensors, values, files)."""
    parallel = parallel or ParallelConfig()
    root = Path(checkpoint_root)
    if not root.is_dir():
        raise ConversionError(f"--checkpoint {root}: no such directory (a run's checkpoints/ directory, holding 'latest' and step_N/)")
    check_output_dir(out, "--out")
    distributed.init_distributed(parallel)
    if step is None:
        step = ckpt.resume_step(root, fix="restore the damaged files, or pass --step of an older checkpoint that verifies")
        if step is None:
            raise ConversionError(f"no complete checkpoint under {root} (no 'latest' file and no step_N/); pass --step or check the path")
    state = ckpt._check_layout(ckpt.step_dir(root, step))
    if model_config is not None:
        cfg, tokenizer_dir = read_hf_config(model_config), Path(model_config)
    else:
        cfg, tokenizer_dir = _run_model_info(state, ckpt.step_dir(root, step))
    model = build_model(cfg, parallel)
    ckpt.load_checkpoint(root, step, model, optimizer=None, load_rng=False)
    expected = _whole_manifest(model, cfg)
    save_hf(model, cfg, out, tokenizer_dir=tokenizer_dir, dtype=dtype)
    result = {"step": step, "tensors": len(expected), "parameters": global_parameter_count(model)}
    if distributed.is_main():
        result["values"] = verify_hf_dir(out, expected)
        log.info("wrote %s: %d tensors, %s values, from %s step %d", out, len(expected), f"{result['values']:,}", root, step)
    return result


# --------------------------------------------------------------------------------------------
# Hugging Face -> Megatron checkpoint.


def from_hf(hf_dir: str | Path, stage: StageConfig, out: str | Path) -> dict:
    """Save the HF model in `hf_dir` as a step-0 Megatron checkpoint in `stage.parallel`'s layout
    (collective: launch with as many ranks as the layout needs). Reads it back to verify."""
    import dataclasses

    check_output_dir(out, "--out")
    distributed.init_distributed(stage.parallel, stage.seed)
    cfg = dataclasses.replace(read_hf_config(hf_dir), params_dtype=stage.model.params_dtype, fp8_recipe=stage.model.fp8_recipe)
    model = build_model(cfg, stage.parallel)
    load_hf(model, cfg, hf_dir)
    ckpt.save_checkpoint(out, 0, model, None, None, {"model_info": ckpt.model_info(cfg, hf_dir)})

    # Read it back into a freshly initialised model and compare every full tensor.
    again = build_model(cfg, stage.parallel)
    ckpt.load_checkpoint(out, 0, again, optimizer=None, load_rng=False)
    differ = [name for (name, a), (_, b) in zip(iter_full_state(model), iter_full_state(again)) if not torch.equal(a, b)]
    if differ:
        raise ConversionError(f"{out}: tensors read back differ from the Hugging Face model: {_names(differ)}")
    result = {"parameters": global_parameter_count(model), "layout": to_dict(stage.parallel)}
    if distributed.is_main():
        log.info("wrote %s (step 0): %s parameters in layout %s", out, f"{result['parameters']:,}", result["layout"])
    return result


# --------------------------------------------------------------------------------------------
# FP8 Hugging Face checkpoint -> bf16 (the rollout engine's weights).
#
# DeepSeek-V3's published checkpoints store linear weights as float8_e4m3fn with a float32
# `<name>_scale_inv` per 128x128 block and say so in config.json's `quantization_config`. The
# trainer dequantizes them on load; vLLM would build FP8 layers instead, which the bf16 weight sync
# cannot feed (`models.hf.deepseek_v3.check_rollout_weights`). So rollouts, as in NeMo-RL, run a
# converted copy: every float8 weight times its scale, cast to bf16, the scales dropped, every other
# tensor (norms, embeddings, router, its float32 correction bias) copied bit for bit, and the
# config without `quantization_config`. Multi-token-prediction layers (`model.layers.<n >=
# num_hidden_layers>`) are converted like the rest and kept, as the source carries them.

_SCALE_SUFFIX = "_scale_inv"
_FLOAT8_HEADERS = {"F8_E4M3", "F8_E5M2"}  # safetensors' names for float8 dtypes
_INDEX = "model.safetensors.index.json"
_HEADER_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _fp8_source_config(src: Path) -> tuple[dict, int]:
    """config.json of an FP8 checkpoint and its block size; one-line errors for anything else."""
    if not src.is_dir():
        raise ConversionError(f"{src}: no such directory (the FP8 Hugging Face checkpoint to convert)")
    config = src / "config.json"
    if not config.is_file():
        raise ConversionError(f"no config.json in {src}: not a Hugging Face model directory")
    hf_config = json.loads(config.read_text())
    quant = fp8_quantization(hf_config)
    if quant is None:
        found = (hf_config.get("quantization_config") or {}).get("quant_method")
        raise ConversionError(
            f"{config} has no fp8 quantization_config" + (f" (quant_method {found!r})" if found else "")
            + ": its weights are not FP8, nothing to convert; use the directory as it is"
        )
    block = quant.get("weight_block_size") or [128, 128]
    if len(block) != 2 or block[0] != block[1]:
        raise ConversionError(f"{config}: weight_block_size {block} is not square; only DeepSeek-V3's square blocks are supported")
    return hf_config, int(block[0])


def _fp8_plan(src: Path, weight_map: dict[str, str], block: int) -> dict[str, tuple[str | None, tuple[int, ...], int]]:
    """Output tensor -> (its scale's name for float8 weights, else None; shape; source bytes per
    value), from the shards' headers alone, so that a broken checkpoint fails before anything is written."""
    headers: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in sorted(set(weight_map.values())):
        path = src / file
        if not path.is_file():
            raise ConversionError(f"{path} is missing (named by {_INDEX})")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                headers[key] = (piece.get_dtype(), tuple(piece.get_shape()))
    plan: dict[str, tuple[str | None, tuple[int, ...], int]] = {}
    for name, (dtype, shape) in headers.items():
        if name.endswith(_SCALE_SUFFIX) and name[: -len(_SCALE_SUFFIX)] in headers:
            continue  # consumed with its weight
        if dtype not in _FLOAT8_HEADERS:
            plan[name] = (None, shape, _HEADER_BYTES.get(dtype, 8))
            continue
        scale = name + _SCALE_SUFFIX
        if scale not in headers:
            raise ConversionError(f"{src}: float8 tensor {name} has no {scale}; the checkpoint is incomplete or not DeepSeek-V3's FP8 format")
        tiles = tuple(-(-d // block) for d in shape)
        if len(shape) != 2 or headers[scale][1] != tiles:
            raise ConversionError(f"{src}: {scale} has shape {headers[scale][1]}, expected {tiles} ({block}x{block} blocks of {name} {shape})")
        plan[name] = (scale, shape, 1)
    return plan


def _check_space(where: Path, needed: int) -> None:
    """Fail now rather than hours in: the output (about twice the FP8 source in bf16) must fit."""
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed > free:
        raise ConversionError(f"the converted checkpoint needs {needed / 2**30:,.1f} GiB, {where} has {free / 2**30:,.1f} GiB free; free space or choose another DST")


def _check_destination(dst: Path) -> Path:
    """`dst` must not hold anything yet; returns the staging directory beside it."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConversionError(f"{dst} already exists and is not empty; choose a new output directory or remove it")
    staging = dst.with_name(dst.name + ".tmp")
    if staging.exists():
        log.info("removing %s, left by an interrupted conversion", staging)
        shutil.rmtree(staging)
    return staging


def _copy_non_weights(src: Path, staging: Path, hf_config: dict, dtype: str) -> None:
    """config.json without `quantization_config`, and every other non-weight file (tokenizer,
    generation config, modeling code, ...) as it is. Hidden entries (`.cache/`, `.git*`) stay behind."""
    config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    config.update(torch_dtype=dtype, dtype=dtype)
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for entry in sorted(src.iterdir()):
        if entry.name.startswith(".") or entry.name in ("config.json", _INDEX) or entry.name.endswith(".safetensors"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, staging / entry.name)
        else:
            shutil.copy2(entry, staging / entry.name)  # follows symlinks: HF cache snapshots link to blobs


def fp8_to_bf16(src: str | Path, dst: str | Path, dtype: str = "bfloat16", max_shard_bytes: int = 5 * 2**30) -> dict:
    """Write the FP8 checkpoint `src` as a `dtype` checkpoint in `dst` (see the section comment).

    Streams one tensor at a time (a shard's worth of output at most is held in memory), into
    `DST.tmp`, renamed to `dst` only once every file is written and the tensor names and shapes
    are checked; an interrupted run leaves `DST.tmp`, which the next run starts over.
    """
    src, dst = Path(src), Path(dst)
    if dtype not in _DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    target = _DTYPES[dtype]
    hf_config, block = _fp8_source_config(src)
    staging = _check_destination(dst)
    with _SafetensorsReader(src) as reader:
        plan = _fp8_plan(src, reader.weight_map, block)
        _check_space(staging.parent, sum(_numel(shape) * (target.itemsize if scale else size) for scale, shape, size in plan.values()))
        staging.mkdir(parents=True)
        try:
            writer = _ShardWriter(staging, max_shard_bytes)
            bar = tqdm(plan.items(), total=len(plan), unit="tensor", desc=f"fp8 -> {dtype}")
            for name, (scale, _, _) in bar:
                tensor = reader.get(name)
                if scale is not None:
                    # float32 product, rounded once to `dtype`: what the trainer's load (dequantize,
                    # then copy into its bf16 parameters) computes, so both start from equal weights.
                    tensor = dequantize_fp8(tensor, reader.get(scale), block).to(target)
                writer.add(name, tensor.contiguous())
            writer.finish()
            _copy_non_weights(src, staging, hf_config, dtype)
            values = verify_hf_dir(staging, {name: shape for name, (_, shape, _) in plan.items()})
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if dst.exists():
        dst.rmdir()  # empty (checked above)
    staging.rename(dst)
    layers = hf_config.get("num_hidden_layers")
    mtp = sum(1 for name in plan if (m := _HF_LAYER.match(name)) and layers is not None and int(m[1]) >= layers)
    result = {
        "tensors": len(plan),
        "dequantized": sum(1 for scale, _, _ in plan.values() if scale),
        "values": values,
        "mtp_tensors": mtp,
        "files": len(list(dst.glob("*.safetensors"))),
    }
    log.info(
        "wrote %s: %d tensors (%d dequantized to %s; %d in multi-token-prediction layers, kept), "
        "%s values in %d file(s); point checkpoint.load_hf at it", dst, result["tensors"], result["dequantized"], dtype,
        mtp, f"{values:,}", result["files"],
    )
    return result
