"""Hugging Face checkpoints <-> Megatron-Core models: adapters per architecture, parallel gathers in `base`."""

from megatron_r1.models.hf.base import (
    HFAdapter,
    export_hf_tensors,
    get_adapter,
    iter_full_state,
    load_full_state,
    load_hf,
    read_hf_config,
    save_hf,
)

__all__ = [
    "HFAdapter",
    "export_hf_tensors",
    "get_adapter",
    "iter_full_state",
    "load_full_state",
    "load_hf",
    "read_hf_config",
    "save_hf",
]
