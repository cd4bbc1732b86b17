"""The Hugging Face model a stage starts from (`checkpoint.load_hf`), pretrained first when a stage names
how to make it (`checkpoint.base_stage`: the tiny base of the CPU runs)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from megatron_r1 import distributed
from megatron_r1.config import ConfigError, StageConfig, load_config
from megatron_r1.stages import pretrain

log = logging.getLogger(__name__)


def ensure_base_model(stage_config: str | Path, overrides: list[str] | None = None) -> Path:
    """The HF directory of the pretrained tiny base model, pretraining it first if needed."""
    cfg = load_config(stage_config, overrides or [])
    hf_dir = Path(cfg.logging.run_dir) / "hf"
    if not (Path(cfg.logging.run_dir) / pretrain.DONE_MARKER).exists():
        pretrain.run(cfg)
    return hf_dir


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
        log.info("no base model at %s: pretraining it with %s", hf_dir, base_stage)
        start = time.perf_counter()
        ensure_base_model(base_stage, cfg.checkpoint.base_overrides)
        seconds = time.perf_counter() - start
        distributed.init_model_parallel(cfg.parallel, cfg.seed)  # back to this stage's layout
    if not (hf_dir / "config.json").exists():
        raise ConfigError(f"no Hugging Face model at {hf_dir} (config.json missing): set checkpoint.load_hf to a model directory")
    return hf_dir, seconds
