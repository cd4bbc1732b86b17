"""Measure what a forward pass keeps for backward: the activation memory the planner estimates.

Autograd's saved-tensor hooks see every tensor a forward stores for its backward (including the
ones custom autograd functions save). Their unique storages, parameters excluded, are exactly the
activation memory alive when backward starts, which is the training step's peak on top of the
weights, gradients and optimizer state. Counted on any device, CPU included, and independent of the
allocator, so the number is reproducible anywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def saved_activation_bytes(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """(bytes of unique tensors saved for backward during `forward()`, its output). Parameters of
    `model` (saved by every linear layer for its input gradient) are not activations and not counted."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_storages and storage.nbytes():
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(seen.values()), out
