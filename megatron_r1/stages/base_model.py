"""The Hugging Face model a stage starts from (`checkpoint.load_hf`): a shipped model checked against its
`SHA256SUMS` (the tiny bases in `assets/`), or one pretrained first when a stage names how to make it
(`checkpoint.base_stage`)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from megatron_r1 import distributed
from megatron_r1.checksums import verify_checksums
from megatron_r1.config import ConfigError, StageConfig, load_config
from megatron_r1.stages import pretrain

log = logging.getLogger(__name__)


def ensure_base_model(stage_config: str | Path, overrides: list[str] | None = None) -> Path:
    """The HF directory of the pretrained tiny base model, pretraining it first if needed (collective).
    Two jobs that need the same missing base do not both write it: the second waits for the first."""
    cfg = load_config(stage_config, overrides or [])
    run_dir = Path(cfg.logging.run_dir)
    done = run_dir / pretrain.DONE_MARKER
    if not done.exists():
        with _exclusive(run_dir):
            if not done.exists():  # another job may have made it while this one waited
                if distributed.is_main():
                    log.warning("pretraining the base model first: %s, %d steps into %s (once; later runs reuse it; "
                                "the tiny base takes 7-11 minutes on 2 CPU cores)", stage_config, cfg.steps, run_dir)
                pretrain.run(cfg)
    return run_dir / "hf"


@contextlib.contextmanager
def _exclusive(run_dir: Path) -> Iterator[None]:
    """Hold `<run_dir>.lock` for this job: its rank 0 takes the lock (waiting while another job holds
    it), then every rank goes on together (a barrier), so the job's collective pretraining runs once."""
    lock = None
    if distributed.is_main():
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        lock = open(f"{run_dir}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another job is pretraining %s; waiting for it", run_dir)
            fcntl.flock(lock, fcntl.LOCK_EX)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    try:
        yield
    finally:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()


def prepare_base_model(cfg: StageConfig) -> tuple[Path, float]:
    """The Hugging Face directory a stage starts from (`checkpoint.load_hf`), and the seconds spent
    preparing it: when `checkpoint.base_stage` names a stage (the tiny base's pretraining) and the
    directory is missing, that stage runs first."""
    hf_dir = Path(cfg.checkpoint.load_hf)
    seconds = 0.0
    if not cfg.checkpoint.load_hf:
        raise ConfigError("checkpoint.load_hf is empty: name the Hugging Face model directory to start from")
    base_stage = cfg.checkpoint.base_stage
    if base_stage and not (hf_dir / "config.json").exists():
        start = time.perf_counter()
        ensure_base_model(base_stage, cfg.checkpoint.base_overrides)
        seconds = time.perf_counter() - start
        distributed.init_model_parallel(cfg.parallel, cfg.seed)  # back to this stage's layout
    if not (hf_dir / "config.json").exists():
        raise ConfigError(f"no Hugging Face model at {hf_dir} (config.json missing): set checkpoint.load_hf to a model directory")
    verify_checksums(hf_dir)
    return hf_dir, seconds

