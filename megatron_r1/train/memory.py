"""What the trainer hands back to the GPU before the colocated engine takes its share.

Between an update and the next rollout the trainer holds memory it does not need; three kinds:

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

* its state (gradient buffers, optimizer state, reference model, and the policy's weights once the
  engine has them): `TrainerSwap` moves it to host memory while the engine generates, as
  `memory.swap_during_rollout` says.

`megatron-r1 plan` counts the FP8 copies in the training peak and not in the rollout peak, and the
trainer's leftover during generation per swap mode; this module is what makes that true.
"""

from __future__ import annotations

import gc
import logging
import warnings
from collections.abc import Iterable, Iterator

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


# --------------------------------------------------------------------------------------------
# Moving the sleeping trainer off the device while the engine generates.


class StorageSwap:
    """Whole tensor storages moved to host memory and back, in place.

    A storage is swapped as a unit (`untyped_storage().resize_(0)`), so every view of it (a
    parameter inside DDP's contiguous buffer, an optimizer shard, `main_grad`) stays the same Python
    object and sees the restored bytes again; nothing that holds a reference has to be told. The
    host copies are allocated once (pinned on CUDA, so the copies run at PCIe speed without a
    staging buffer) and reused every step. `keep=False` releases without copying and restores zeros:
    for buffers whose contents are dead between steps (gradients are zeroed before every update).
    """

    def __init__(self, name: str, keep: bool = True) -> None:
        self.name = name
        self.keep = keep
        self._moved: list[tuple[torch.UntypedStorage, int, torch.Tensor | None]] = []  # storage, bytes, host copy
        self._host: dict[int, torch.Tensor] = {}  # host copies by position, reused across steps

    @property
    def swapped(self) -> bool:
        return bool(self._moved)

    def out(self, storages: Iterable[torch.UntypedStorage]) -> int:
        """Move `storages` (each once; empty ones skipped) to the host; returns the bytes released on the device."""
        if self._moved:
            raise RuntimeError(f"{self.name} is already swapped out")
        copies, seen = [], set()
        unique = [s for s in storages if s.nbytes() and not (s.data_ptr() in seen or seen.add(s.data_ptr()))]
        for index, storage in enumerate(unique):
            nbytes = storage.nbytes()
            host = None
            if self.keep:
                host = self._host.get(index)
                if host is None or host.numel() != nbytes:
                    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=storage.device.type == "cuda")
                    self._host[index] = host
                host.copy_(_bytes_of(storage), non_blocking=True)
            copies.append((storage, nbytes, host))
        if any(s.device.type == "cuda" for s, _, _ in copies):
            torch.cuda.current_stream().synchronize()  # the copies must land before the device bytes go
        for storage, _, _ in copies:
            storage.resize_(0)
        self._moved = copies
        return sum(n for _, n, _ in copies)

    def back(self) -> int:
        """Reallocate every swapped storage on its device and copy its bytes back (or zero it)."""
        restored = 0
        for storage, nbytes, host in self._moved:
            storage.resize_(nbytes)
            if host is None:
                _bytes_of(storage).zero_()
            else:
                _bytes_of(storage).copy_(host, non_blocking=True)
            restored += nbytes
        self._moved = []
        return restored


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole storage (what the copies read and write)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _unique_storages(tensors: Iterable[torch.Tensor], device: torch.device, exclude: set[int]) -> list[torch.UntypedStorage]:
    """The distinct storages of `tensors` on `device`, in first-seen order, minus the `exclude`d ones
    (by address). Tensors elsewhere (the host share of an offloaded optimizer) are left alone."""
    seen, out = set(exclude), []
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != device.type:
            continue
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if storage.nbytes() and ptr not in seen:
            seen.add(ptr)
            out.append(storage)
    return out


def _module_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from torch.nn.Module.buffers(module)  # Megatron's DDP shadows `buffers` with its gradient buffers


def _optimizer_tensors(optimizer) -> Iterator[torch.Tensor]:
    """Every tensor a Megatron optimizer holds: the inner torch optimizer's parameters (fp32 master
    shards under mixed precision), their gradients, and its state (Adam's moments), for each
    optimizer of a chain (dense + expert)."""
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                yield p
                if p.is_leaf and p.grad is not None:  # a view's grad is a view of DDP's buffer
                    yield p.grad
        for state in inner.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


class TrainerSwap:
    """What `memory.swap_during_rollout` moves off the device between an update and the next one.

    * ``none``: nothing (the allocator's cache and the FP8 weight copies are released regardless);
    * ``except_weights``: after the update, the gradient buffers are released (Megatron DDP's own
      `offload_grad_buffers`: they are zeroed before every update anyway), the optimizer's device
      state (fp32 master shards, Adam's moments) and the reference model go to pinned host memory;
      the policy's weights stay, so the refit reads them in place;
    * ``all``: also the policy's weights, once the refit has copied them into the engine.

    `restore` brings everything back (gradients as zeros) once the engine sleeps. The order in the
    step (`stages/rl.py`, `rollout/weight_sync.refit`) never holds the engine's KV cache and the
    trainer's state at once: update -> `offload_state` -> engine weights wake -> refit ->
    `offload_weights` -> KV cache wakes -> generate -> engine sleeps -> `restore` -> update.

    Why not Megatron's `offload_to_cpu` for the optimizer and `_ParamAndGradBuffer.offload_to_cpu` for
    the weights (Megatron-Core 0.16): the first moves only CUDA tensors into fresh pageable host
    tensors at every call (a synchronous copy at half the pinned bandwidth), the second pins a copy
    made by `.cpu()`, which on a CPU tensor is the tensor itself, so it is CUDA-only; one storage swap
    serves both devices, which is what lets the CPU suite check the bytes really leave.
    """

    def __init__(self, mode: str, ddp: torch.nn.Module, optimizer, reference: torch.nn.Module | None = None) -> None:
        self.mode = mode
        self.ddp = ddp
        self.optimizer = optimizer
        self.reference = reference
        self.device = next(ddp.parameters()).device
        self._state = StorageSwap("optimizer state and reference model")
        self._weights = StorageSwap("policy weights")
        self._grads_out = False
        self.moved_bytes = {"gradients": 0, "optimizer": 0, "reference": 0, "weights": 0}

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def _weight_storages(self) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in _module_tensors(self.ddp)}

    def offload_state(self) -> int:
        """Gradients released, optimizer state and reference model to the host (modes except_weights
        and all); returns the device bytes freed."""
        if not self.enabled or self._state.swapped:
            return 0
        weights = self._weight_storages() | self._grad_storages()  # the optimizer's views of them stay
        grads = self._grad_bytes()
        with warnings.catch_warnings():  # Megatron resizes through the deprecated TypedStorage
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            self.ddp.offload_grad_buffers(synchronize=self.device.type == "cuda", empty_cache=False)
        self._grads_out = True
        optimizer = _unique_storages(_optimizer_tensors(self.optimizer), self.device, weights)
        reference = _unique_storages(_module_tensors(self.reference), self.device, weights) if self.reference is not None else []
        self.moved_bytes.update(gradients=grads, optimizer=sum(s.nbytes() for s in optimizer),
                                reference=sum(s.nbytes() for s in reference))
        moved = self._state.out(optimizer + reference)
        _empty_device_cache(self.device)
        return grads + moved

    def offload_weights(self) -> int:
        """The policy's weights to the host (mode all), after the refit has read them."""
        if self.mode != "all" or self._weights.swapped:
            return 0
        storages = _unique_storages(_module_tensors(self.ddp), self.device, self._grad_storages())
        self.moved_bytes["weights"] = self._weights.out(storages)
        _empty_device_cache(self.device)
        return self.moved_bytes["weights"]

    def restore_weights(self) -> int:
        """The policy's weights alone back on the device (a refit right after the engine started)."""
        restored = self._weights.back()
        if restored and self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        return restored

    def restore(self) -> int:
        """Everything back on the device (call with the engine asleep); returns the bytes restored."""
        restored = self._weights.back() + self._state.back()
        if self._grads_out:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
                self.ddp.restore_grad_buffers(synchronize=False)
            restored += self._grad_bytes()
            self._grads_out = False
        if restored and self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        return restored

    @property
    def swapped(self) -> bool:
        return self._grads_out or self._state.swapped or self._weights.swapped

    def _buffers(self):
        return list(getattr(self.ddp, "buffers", [])) + list(getattr(self.ddp, "expert_parallel_buffers", []))

    def _grad_storages(self) -> set[int]:
        return {b.grad_data.untyped_storage().data_ptr() for b in self._buffers() if b.grad_data is not None}

    def _grad_bytes(self) -> int:
        return sum(b.grad_data.numel() * b.grad_data.element_size() for b in self._buffers() if b.grad_data is not None)


def _empty_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
