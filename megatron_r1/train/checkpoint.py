"""Resumable checkpoints with Megatron's `dist_checkpointing`: any TP/PP/DP layout, every rank writes its shard.

Layout under a checkpoint root (e.g. ``<run_dir>/checkpoints``)::

    latest                  text: the step of the newest complete checkpoint (written last, atomically)
    step_<N>/               one complete checkpoint
        metadata.json, ...  dist_checkpointing: model weights + optimizer state (sharded tensors)
        trainer_state.json  step, lr-scheduler state, whether Adam state was saved, `extra_state` (rank 0)
        rng/rank_<R>.pt     RNG states of rank R (python, numpy, torch, CUDA, Megatron's tracker)
        manifest.json       every other file with its size (and CRC-32): written once all ranks are done
    step_<N>.partial/       a save in progress (renamed to step_<N> once complete; ignored otherwise)

A save is committed in this order: shards on every rank -> manifest -> check the manifest ->
rename ``.partial`` -> ``latest``. A crash anywhere before the last step leaves ``latest`` naming
the previous checkpoint, and the next save cleans the leftover up. A checkpoint damaged later (a
truncated or changed file) fails its manifest check on load: `resume_step` then falls back to the
newest older one that passes, which is why rotation keeps at least two. Keys in the sharded state dict are
those of the bare GPTModel (never the DDP wrapper), so weights load into a wrapped or bare model.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.optimizer import DistributedOptimizer, MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_r1 import platform
from megatron_r1.config import ConfigError, ModelConfig, to_dict
from megatron_r1.train import manifest
from megatron_r1.train.optim import unwrap

log = logging.getLogger(__name__)

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")

# How the distributed optimizer lays out its state: each DP rank writes its own buckets in parallel
# (no gather on one rank); resuming needs the same TP/PP layout, DP size may change.
# Non-distributed optimizers ignore it.
_OPTIMIZER_SHARDING = "dp_reshardable"


class CheckpointError(ConfigError):
    """A checkpoint directory that cannot be used; the message names the directory and the fix."""


def model_info(model_cfg: ModelConfig, tokenizer_dir: str | Path | None) -> dict:
    """What `to_hf` needs to rebuild the model of a checkpoint (kept in its extra state)."""
    return {"model": to_dict(model_cfg), "tokenizer_dir": str(tokenizer_dir) if tokenizer_dir else None}


def step_dir(root: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` lives."""
    return Path(root) / f"step_{step}"


def latest_step(root: str | Path) -> int | None:
    """The step of the newest complete checkpoint under `root`, or None when there is none."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} should hold a step number, found {text[:40]!r}; delete it to start afresh")
    return int(text)


def saved_steps(root: str | Path) -> list[int]:
    """Steps of the complete checkpoint directories under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name)))


def _sharding_metadata() -> dict:
    # A fresh dict each call: Megatron adds process groups to it while building the state dict.
    return {"distrib_optim_sharding_type": _OPTIMIZER_SHARDING, "chained_optim_avoid_prefix": True}


def _inner_optimizers(optimizer: MegatronOptimizer) -> list[tuple[MegatronOptimizer, torch.optim.Optimizer]]:
    """(Megatron optimizer, the torch optimizer it drives) for each of a ChainedOptimizer's parts."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [(opt, opt.optimizer) for opt in parts if getattr(opt, "optimizer", None) is not None]


def _has_stepped(optimizer: MegatronOptimizer) -> bool:
    """Whether Adam has any state yet (it creates it lazily on its first step); agreed by all ranks."""
    stepped = torch.tensor(
        [float(any(len(inner.state) > 0 for _, inner in _inner_optimizers(optimizer)))], device=platform.device()
    )
    if dist.is_initialized():
        dist.all_reduce(stepped, op=dist.ReduceOp.MAX)
    return bool(stepped.item())


def _prepare_distributed_adam_for_load(optimizer: MegatronOptimizer) -> None:
    """Give a not-yet-stepped torch AdamW inside Megatron's DistributedOptimizer its zero state.

    Without Apex / Transformer Engine (e.g. on CPU), Megatron 0.16 backs the distributed optimizer
    with torch's AdamW and reads Adam's `step` from its per-parameter state even to build the state
    dict it loads *into*; a fresh AdamW has no state, and that read fails. The load overwrites it.
    """
    for opt, inner in _inner_optimizers(optimizer):
        if not isinstance(opt, DistributedOptimizer) or not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state.setdefault("exp_avg", torch.zeros_like(param))
                    state.setdefault("exp_avg_sq", torch.zeros_like(param))


def _unshare_adam_steps(optimizer: MegatronOptimizer) -> None:
    """Give every parameter its own Adam step counter, at the checkpoint's step, after a load.

    Without Apex / Transformer Engine (torch's Adam, e.g. on CPU), Megatron 0.16's distributed
    optimizer saves the step once, in the parameter groups, and on load leaves one shared step tensor
    in every parameter's state, not at the saved count: torch's Adam then increments it once per
    parameter, so after a resume every bias correction, hence every update, differed from the
    uninterrupted run's. The group's restored step is the truth; each parameter gets its own copy.
    """
    for _, inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state and isinstance(state.get("step"), torch.Tensor):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype, device=state["step"].device)


def _sharded_state_dict(model: torch.nn.Module, optimizer: MegatronOptimizer | None, is_loading: bool) -> dict:
    """Megatron's sharded state dicts of the bare GPTModel and, when given, of the optimizer."""
    gpt = unwrap(model)
    model_sd = gpt.sharded_state_dict(metadata=_sharding_metadata())
    state = {"model": model_sd}
    if optimizer is not None:
        if is_loading:
            _prepare_distributed_adam_for_load(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_sharding_metadata())
    return state


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _check_verify_level(verify: str) -> None:
    if verify not in manifest.LEVELS:
        raise ConfigError(f"checkpoint.verify={verify!r} is not one of: {', '.join(manifest.LEVELS)}")


def _write_manifest(directory: Path, verify: str) -> None:
    """Collective: rank 0 lists the files, each rank fsyncs and describes its share, rank 0 writes."""
    names = _broadcast(manifest.list_files(directory) if _rank() == 0 else None)
    shares = _all_gather(manifest.describe(directory, names[_rank() :: _world()], verify))
    if _rank() == 0:
        manifest.write(directory, {k: v for share in shares for k, v in share.items()}, verify)
    _barrier()


def verify_checkpoint(directory: str | Path, verify: str = "checksum") -> str | None:
    """Collective: check `directory` against its manifest at level `verify` ("size" or "checksum"),
    each rank reading a share of the files. Returns the first problem (the same on every rank), or
    None when it passes. A checkpoint without a manifest (saved before manifests) passes unchecked."""
    _check_verify_level(verify)
    directory = Path(directory)
    if _rank() == 0:
        if not directory.is_dir():
            found: Any = "the directory is missing"
        else:
            try:
                found = manifest.read(directory)
            except ValueError as e:
                found = str(e)
            if found is None:
                log.warning("%s has no %s (saved by an older version): loading it unverified", directory, manifest.MANIFEST)
    else:
        found = None
    found = _broadcast(found)
    if found is None or isinstance(found, str):
        return found
    names = sorted(found["files"])
    level = verify if found["level"] == "checksum" else "size"  # a size-only manifest has no CRCs to check
    share = {n: found["files"][n] for n in names[_rank() :: _world()]}
    problems = sorted(p for rank_problems in _all_gather(manifest.check(directory, share, level)) for p in rank_problems)
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


# --------------------------------------------------------------------------------------------
# Saving.


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: MegatronOptimizer | None,
    scheduler: OptimizerParamScheduler | None,
    extra_state: dict[str, Any] | None = None,
    keep_last: int = 2,
    verify: str = "checksum",
    async_save: bool = False,
) -> Path:
    """Save everything needed to resume at `step`; collective: every rank calls it.

    `async_save` (GPU): Megatron's asynchronous writer stages the shards to host memory and writes
    them in a background process while training goes on; the manifest, the rename and `latest`
    follow when a later `finish_pending_saves` (every step, and before exiting) finds the write
    done on every rank. Until then `latest` names the previous checkpoint, as after a crash.

    `extra_state` (data position, metrics, ...) must be JSON-serialisable; `load_checkpoint`
    returns it. Keeps the newest `keep_last` checkpoints (0 keeps all; 1 is refused: a damaged
    newest checkpoint would leave nothing to fall back on). `verify` is what the manifest records:
    "checksum" (sizes and CRC-32s: every byte is read back once, split over the ranks) or "size".
    Returns the directory.
    """
    _check_verify_level(verify)
    require_async_support(async_save)
    if keep_last == 1 or keep_last < 0:
        raise ConfigError(
            f"checkpoint.keep_last={keep_last}: keep at least 2 (a damaged newest checkpoint falls back "
            "to the one before), or 0 to keep all"
        )
    root = Path(root)
    finish_pending_saves(blocking=True)  # one write in flight at a time, and `latest` in step order
    final, partial = step_dir(root, step), root / f"step_{step}.partial"
    main = _rank() == 0
    try:  # on every rank, so that all of them stop together
        json.dumps(extra_state or {})
    except TypeError as e:
        raise TypeError(f"extra_state must be JSON-serialisable: {e}") from e
    if main:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    _barrier()

    # Before its first step Adam has no state to save (and Megatron drops a step count of 0), so
    # such a checkpoint holds only the model; loading it leaves the optimizer fresh, which is exact.
    with_optimizer = optimizer is not None and _has_stepped(optimizer)
    sharded = _sharded_state_dict(model, optimizer if with_optimizer else None, is_loading=False)
    request = dist_checkpointing.save(sharded, str(partial), async_sharded_save=async_save)
    _save_rng(partial / "rng" / f"rank_{_rank():05d}.pt")
    if main:
        state = {
            "format": FORMAT_VERSION,
            "step": step,
            "optimizer_state": with_optimizer,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "extra": extra_state or {},
        }
        (partial / TRAINER_STATE).write_text(json.dumps(state, indent=1))

    def complete() -> None:
        _complete_save(root, step, partial, final, keep_last, verify)

    if async_save:
        request.add_finalize_fn(complete)
        _async_queue().schedule_async_request(request)
        return final
    complete()
    return final


def _complete_save(root: Path, step: int, partial: Path, final: Path, keep_last: int, verify: str) -> None:
    """Manifest, check, rename, `latest`, pruning: once every rank's files are written (collective)."""
    main = _rank() == 0
    _barrier()  # every rank's shard and RNG file is on disk
    _write_manifest(partial, verify)
    # Read back what the rename will vouch for: all ranks' RNG files, the trainer state, the
    # manifest itself, and every file at the size it was written with.
    problem = verify_checkpoint(partial, "size") or _missing_parts(partial)
    if problem:
        raise CheckpointError(f"the save of step {step} in {partial} is incomplete ({problem}); {LATEST} still names the previous checkpoint")

    if main:
        if final.exists():  # re-saving a step: the old copy goes only now that the new one is complete
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomically(root / LATEST, f"{step}\n")
        _prune(root, keep_last, step)
        log.info("saved checkpoint %s", final)
    _barrier()


_ASYNC_QUEUE = None  # Megatron's AsyncCallsQueue, created by the first asynchronous save


def require_async_support(async_save: bool) -> None:
    """One line now rather than a CUDA error at the first save hours later."""
    if async_save and not platform.has_cuda():
        raise ConfigError("checkpoint.async_save needs CUDA (Megatron's asynchronous checkpoint writer); set it to false here")


def _async_queue():
    global _ASYNC_QUEUE
    if _ASYNC_QUEUE is None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        _ASYNC_QUEUE = AsyncCallsQueue(persistent=True)  # one writer process, reused by every save
    return _ASYNC_QUEUE


def finish_pending_saves(blocking: bool = False) -> None:
    """Complete the asynchronous saves whose writes are done on every rank (collective; call it on
    every rank at the same points: each step, and with `blocking=True` before the run ends)."""
    if _ASYNC_QUEUE is not None:
        _ASYNC_QUEUE.maybe_finalize_async_calls(blocking=blocking)


def _missing_parts(directory: Path) -> str | None:
    """What a complete save has that `directory` lacks (checked on rank 0, agreed by all)."""
    if _rank() == 0:
        expected = [TRAINER_STATE, "metadata.json", manifest.MANIFEST] + [f"rng/rank_{r:05d}.pt" for r in range(_world())]
        missing = [name for name in expected if not (directory / name).is_file()]
        problem = f"{missing[0]} is missing" if missing else None
    else:
        problem = None
    return _broadcast(problem)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make renames inside `directory` durable (the rename of a checkpoint, then `latest`)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep_last: int, newest: int) -> None:
    """Drop leftovers of interrupted saves and all but the newest `keep_last` checkpoints."""
    for leftover in root.glob("step_*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last <= 0:
        return
    older = [s for s in saved_steps(root) if s <= newest]
    for step in older[:-keep_last]:
        shutil.rmtree(step_dir(root, step), ignore_errors=True)


def _save_rng(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if platform.has_cuda() else None,
        "megatron_tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    torch.save(state, path)


# --------------------------------------------------------------------------------------------
# Loading.


def resume_step(root: str | Path, verify: str = "checksum",
                fix: str = "restore the damaged files, or start afresh (checkpoint.resume=false or a new run directory)") -> int | None:
    """Collective: the step to resume from under `root`, the same on every rank; None when there is
    no checkpoint yet. That is the step `latest` names if it passes `verify_checkpoint`; otherwise
    (one warning line each) the newest older one that passes. Raises `CheckpointError` (one line)
    when checkpoints exist and none passes, ending with `fix` (what the caller's user can do)."""
    root = Path(root)
    if _rank() == 0:
        try:
            latest = latest_step(root)
            plan: Any = None if latest is None else [latest] + [s for s in reversed(saved_steps(root)) if s < latest]
        except CheckpointError as e:  # a garbled `latest`: the step directories still say what exists
            steps = saved_steps(root)
            log.warning("%s; trying the saved steps %s", e, steps)
            plan = list(reversed(steps)) or str(e)
    else:
        plan = None
    plan = _broadcast(plan)
    if isinstance(plan, str):
        raise CheckpointError(plan)
    if plan is None:
        return None
    failures = []
    for i, step in enumerate(plan):
        problem = verify_checkpoint(step_dir(root, step), verify)
        if problem is None:
            return step
        failures.append(f"step_{step}: {problem}")
        if _rank() == 0:
            fallback = f"trying step_{plan[i + 1]}" if i + 1 < len(plan) else "no older checkpoint left"
            log.warning("checkpoint %s failed verification (%s); %s", step_dir(root, step), problem, fallback)
    raise CheckpointError(f"no checkpoint under {root} passes verification ({'; '.join(failures)}); {fix}")


def load_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: MegatronOptimizer | None = None,
    scheduler: OptimizerParamScheduler | None = None,
    load_rng: bool = True,
    verify: str = "size",
) -> dict[str, Any]:
    """Restore the checkpoint of `step` into `model` (DDP-wrapped or bare) and, when given, the
    optimizer, scheduler and RNG states; collective. Returns the `extra_state` saved with it.

    Pass `optimizer=None` to load weights only (evaluation, export); the TP/PP layout may then
    differ from the one that saved. Raises `CheckpointError` (one line) for a missing or unusable
    directory, or one that fails its manifest check at level `verify` (default "size": cheap; a
    step chosen by `resume_step` has been checked at the configured level already).
    """
    path = step_dir(root, step)
    trainer_state = _check_layout(path)
    problem = verify_checkpoint(path, verify)
    if problem:
        raise CheckpointError(f"{path} is damaged ({problem}); load an earlier step, or let resume_step pick one that verifies")

    with_optimizer = optimizer is not None and trainer_state.get("optimizer_state", False)
    state = _sharded_state_dict(model, optimizer if with_optimizer else None, is_loading=True)
    try:
        loaded = dist_checkpointing.load(state, str(path))
        # Copies into parameters (and the distributed optimizer's views of them) are not for autograd.
        with torch.no_grad():
            unwrap(model).load_state_dict(loaded["model"], strict=True)
            if with_optimizer:
                optimizer.load_state_dict(loaded["optimizer"])
                _unshare_adam_steps(optimizer)
            elif optimizer is not None:  # saved before the first step: a fresh optimizer on the loaded weights
                _reset_optimizer(optimizer)
    except (pickle.UnpicklingError, EOFError, OSError) as e:  # a damaged file (no manifest caught it)
        raise CheckpointError(f"cannot load {path}: a file is damaged ({_reason(e)}); restore it, or load an earlier step") from None
    except (CheckpointingException, TorchCheckpointException, KeyError, RuntimeError, ValueError) as e:
        reason = _reason(e)
        if "zip archive" in reason or "unpickl" in reason.lower():  # torch.load of a truncated or flipped file
            raise CheckpointError(f"cannot load {path}: a file is damaged ({reason}); restore it, or load an earlier step") from None
        raise CheckpointError(
            f"cannot load {path}: {reason} (was it saved with the same model config and TP/PP layout?)"
        ) from e

    if scheduler is not None and trainer_state.get("scheduler"):
        # Megatron's load_state_dict *advances* the schedule by the saved step count: start from 0.
        scheduler.num_steps = 0
        scheduler.load_state_dict(trainer_state["scheduler"])
    if load_rng:
        _load_rng(path / "rng" / f"rank_{_rank():05d}.pt")
    _barrier()
    log.info("loaded checkpoint %s", path)
    return trainer_state.get("extra", {})


def _reset_optimizer(optimizer: MegatronOptimizer) -> None:
    """Forget Adam's moments and copy the model's weights into fp32 master weights, if any."""
    for _, inner in _inner_optimizers(optimizer):
        inner.state.clear()
    optimizer.reload_model_params()


def _reason(error: BaseException) -> str:
    """One line saying why a load failed (torch.distributed.checkpoint wraps per-rank errors)."""
    if isinstance(error, TorchCheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0][:300]


def _check_layout(path: Path) -> dict:
    """Fail early, with one line, on a directory that is not one of our checkpoints."""
    if not path.is_dir():
        root = path.parent
        steps = saved_steps(root)
        found = f"saved steps there: {steps}" if steps else "no checkpoints there"
        raise CheckpointError(f"no checkpoint at {path} ({found}); check the run directory / step")
    if not dist_checkpointing.check_is_distributed_checkpoint(str(path)):
        raise CheckpointError(
            f"{path} is not a Megatron distributed checkpoint (no valid metadata.json); "
            "it is incomplete or was not written by save_checkpoint"
        )
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {TRAINER_STATE}; the save was interrupted, use an earlier step") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / TRAINER_STATE} is not valid JSON ({e}); use an earlier step") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path / TRAINER_STATE}: unknown checkpoint format {state.get('format') if isinstance(state, dict) else state!r}")
    return state


def _load_rng(path: Path) -> None:
    if not path.is_file():
        # A resume on more ranks than saved: the new ranks keep their seeded streams.
        log.warning("no RNG state %s (different world size?); keeping this rank's seeded RNG", path)
        return
    # Our own file, holding numpy and python RNG tuples, which the weights-only loader refuses.
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and platform.has_cuda():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])
