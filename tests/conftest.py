"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_rank():
    """A 1-rank gloo process group with Megatron's model-parallel state (TP = PP = EP = 1).

    Module-scoped so that each test module starts from the default layout, whatever an earlier
    module initialised; the process group itself lives for the whole session.
    """
    from megatron_r1.config import ParallelConfig
    from megatron_r1.distributed import init_distributed

    return init_distributed(ParallelConfig())


# What vLLM's CPU worker replaces process-wide when it is imported (vllm/v1/worker/cpu/shm.py).
_VLLM_PATCHED = [
    (torch, "Event"),
    *((torch.cuda, name) for name in ("Event", "Stream", "set_stream", "current_stream", "stream")),
]


@pytest.fixture
def in_process_vllm(monkeypatch):
    """vLLM in this process (no engine subprocess, 1 GiB KV cache); afterwards the torch attributes
    vLLM's CPU worker overrides, and torch's thread count, are put back for the tests that follow."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    saved = [(owner, name, getattr(owner, name)) for owner, name in _VLLM_PATCHED]
    threads = torch.get_num_threads()
    yield
    for owner, name, value in saved:
        setattr(owner, name, value)
    torch.set_num_threads(threads)
