"""What the trainer hands back to the GPU before the colocated engine takes its share.

Between an update and the next rollout the trainer holds two kinds of memory it does not need:

* the caching allocator's free blocks (activations of the last micro-batch, temporaries):
  `torch.cuda.empty_cache()` returns them to the device;
* Transformer Engine's FP8 weight workspaces. With FP8, Megatron passes `is_first_microbatch` to
  TE's linear layers (unless `disable_parameter_transpose_cache` is set), and TE keeps the FP8
  cast of each weight (and its transpose) in the module attribute `_fp8_workspaces` for the rest
  of the step. These are live tensors: `empty_cache()` cannot free them. The reference model
  keeps its own. That is one byte per weight (the planner's "FP8 weight copies"), ~3 GiB per GPU
  per model for the 671B recipe. Dropping the dictionary entries is safe: TE rebuilds a missing
  workspace from the current weights on the next forward, which is what it does at the first
  micro-batch of every step anyway.

`megatron-r1 plan` counts the FP8 copies in the training peak and not in the rollout peak; this
module is what makes that true.
"""

from __future__ import annotations

import gc
import logging

import torch

log = logging.getLogger(__name__)


def release_fp8_weight_caches(*models: torch.nn.Module | None) -> int:
    """Drop Transformer Engine's cached FP8 weights in `models` (None entries are skipped);
    returns the bytes the dropped tensors held (0 without TE or FP8)."""
    released = 0
    for model in models:
        if model is None:
            continue
        for module in model.modules():
            workspaces = getattr(module, "_fp8_workspaces", None)
            if not workspaces:
                continue
            released += sum(tensor_bytes(t) for t in workspaces.values())
            workspaces.clear()
    return released


def free_for_engine(*models: torch.nn.Module | None) -> None:
    """Give the GPU everything the sleeping trainer does not need while the engine generates: the
    FP8 weight caches of `models` (policy, reference) and the allocator's cached blocks. On CPU
    there is no caching allocator to empty (and a full garbage collection of a process holding vLLM
    and Megatron costs ~0.4 s a step): only the module walk runs."""
    released = release_fp8_weight_caches(*models)
    if released:
        log.debug("released %.2f GiB of FP8 weight caches before the engine wakes", released / 2**30)
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def tensor_bytes(tensor) -> int:
    """Bytes of a plain or TE-quantized tensor (QuantizedTensor keeps its data in inner tensors)."""
    total = 0
    for name in ("_data", "_transpose", "_rowwise_data", "_columnwise_data", "_rowwise_scale_inv", "_columnwise_scale_inv", "_scale_inv"):
        inner = getattr(tensor, name, None)
        if isinstance(inner, torch.Tensor):
            total += inner.numel() * inner.element_size()
    if total == 0 and isinstance(tensor, torch.Tensor):
        total = tensor.numel() * tensor.element_size()
    return total
