"""Checkpoint conversion: Megatron `dist_checkpointing` checkpoints <-> Hugging Face directories.

    megatron-r1 convert to-hf --checkpoint runs/r1_zero_tiny/checkpoints [--step N] --out /tmp/hf
    megatron-r1 convert from-hf --hf runs/tiny_base/hf --stage conf/stages/r1_zero_tiny.yaml \
        [parallel.tensor_model_parallel_size=2 ...] --out /tmp/ckpt

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
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from megatron_r1 import distributed
from megatron_r1.config import ConfigError, ModelConfig, ParallelConfig, StageConfig, from_dict, to_dict
from megatron_r1.models.build import build_model
from megatron_r1.models.hf.base import _entries, get_adapter, iter_full_state, load_hf, read_hf_config, save_hf, unwrap
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
        box = torch.tensor([float(count)], dtype=torch.float64)
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


def to_hf(checkpoint_root: str | Path, out: str | Path, step: int | None = None, model_config: str | Path | None = None,
          parallel: ParallelConfig | None = None, dtype: str | None = None) -> dict:
    """Write the checkpoint of `step` (default: the latest) under `checkpoint_root` as a HF directory.
    Collective; returns what was written (tensors, values, files)."""
    parallel = parallel or ParallelConfig()
    distributed.init_distributed(parallel)
    root = Path(checkpoint_root)
    if step is None:
        step = ckpt.latest_step(root)
        if step is None:
            raise ConversionError(f"no complete checkpoint under {root} (no 'latest' file); pass --step or check the path")
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


def model_info(model_cfg: ModelConfig, tokenizer_dir: str | Path | None) -> dict:
    """What `to_hf` needs to rebuild the model of a checkpoint (kept in its extra state)."""
    return {"model": to_dict(model_cfg), "tokenizer_dir": str(tokenizer_dir) if tokenizer_dir else None}


def from_hf(hf_dir: str | Path, stage: StageConfig, out: str | Path) -> dict:
    """Save the HF model in `hf_dir` as a step-0 Megatron checkpoint in `stage.parallel`'s layout
    (collective: launch with as many ranks as the layout needs). Reads it back to verify."""
    import dataclasses

    distributed.init_distributed(stage.parallel, stage.seed)
    cfg = dataclasses.replace(read_hf_config(hf_dir), params_dtype=stage.model.params_dtype, fp8_recipe=stage.model.fp8_recipe)
    model = build_model(cfg, stage.parallel)
    load_hf(model, cfg, hf_dir)
    ckpt.save_checkpoint(out, 0, model, None, None, {"model_info": model_info(cfg, hf_dir)})

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
