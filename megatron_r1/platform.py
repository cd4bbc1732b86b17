"""Device and backend detection, and the one place that adapts Megatron-Core to a CPU.

On a GPU machine nothing here changes any behaviour: `setup()` only records what is available.

On a machine without CUDA, Megatron-Core's training path (DDP buckets, the optimizer, pipeline
schedules, MoE routing, `dist_checkpointing`) still names CUDA in many places: `device="cuda"`,
`torch.cuda.current_device()`, streams and events, `param.grad.type() == "torch.cuda.FloatTensor"`.
Rather than patching each call site, `setup()` installs one general mechanism:

* `CudaToCpuMode`, a `TorchFunctionMode` entered once per process, rewrites every `device=`
  argument that names CUDA to the CPU, makes `Tensor.cuda()` / `pin_memory()` return the tensor
  itself, and makes an argument-less `Tensor.type()` report the `torch.cuda.*` type string that
  Megatron's asserts expect;
* the few `torch.cuda` functions that Megatron calls for bookkeeping (streams, events,
  synchronisation, RNG state, memory statistics) get CPU stand-ins with the same meaning on a
  single in-order device: a stream is the default stream, an event is already complete;
* without Transformer Engine, `moe_utils.te_general_gemm` is defined as `None` and MLA's
  `HAVE_TE` is cleared, which is what Megatron's own fallback branches test for.

The same code therefore runs on 2 CPU cores over gloo and on H100s over NCCL.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import time

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)


@functools.cache
def has_cuda() -> bool:
    """True when a CUDA device can be used (checked once; the CPU shim never changes it)."""
    return torch.cuda.is_available()


@functools.cache
def has_transformer_engine() -> bool:
    """True when Transformer Engine imports (GPU builds only)."""
    if not has_cuda() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # a broken TE install should not stop a bf16 run
        log.warning("Transformer Engine is installed but does not import (%s); using the local spec", e)
        return False
    return True


# Checking on CPU what NCCL will demand on GPUs: every tensor a collective of this package sends
# lives on the compute device. With MEGATRON_R1_STRICT_DEVICES=1 on a machine without CUDA,
# `device()` names CUDA (which the CPU adaptation maps to the CPU), tensors created with no device
# (on the host, on a GPU machine too) are marked, and a collective called from megatron_r1 with a
# marked tensor raises `HostTensorInCollective`. The multi-rank gloo tests run this way.
STRICT_DEVICES_ENV = "MEGATRON_R1_STRICT_DEVICES"
_VIRTUAL_CUDA = torch.device("cuda", 0)  # made at import, before the CPU adaptation maps CUDA away


class HostTensorInCollective(RuntimeError):
    """A collective got a host tensor; over NCCL (parallel_state's groups on GPUs) it would fail."""


def strict_devices() -> bool:
    """True when this CPU process checks collective tensors' devices (see STRICT_DEVICES_ENV)."""
    return not has_cuda() and os.environ.get(STRICT_DEVICES_ENV) == "1"


def device() -> torch.device:
    """The device this process computes on."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    if strict_devices():
        return _VIRTUAL_CUDA
    return torch.device("cpu")


def distributed_backend(requested: str = "auto") -> str:
    """`nccl` on GPUs, `gloo` on CPUs, unless the config asks for one explicitly."""
    if requested != "auto":
        return requested
    return "nccl" if has_cuda() else "gloo"


def describe() -> str:
    """One line for logs: what this process runs on."""
    if has_cuda():
        name = torch.cuda.get_device_name()
        te = "Transformer Engine" if has_transformer_engine() else "no Transformer Engine"
        return f"CUDA ({name}, {torch.cuda.device_count()} visible, {te})"
    return f"CPU ({torch.get_num_threads()} threads, gloo; Megatron-Core CPU adaptation active)"


# --------------------------------------------------------------------------------------------
# CPU adaptation.

_CPU = torch.device("cpu")


def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    # On a machine without CUDA, an integer device can only mean a CUDA ordinal.
    return isinstance(value, int) and not isinstance(value, bool)


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.int8: "torch.cuda.CharTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


_FACTORIES = frozenset(
    {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
     torch.rand, torch.randn, torch.randint}
)


class CudaToCpuMode(TorchFunctionMode):
    """Run code written for CUDA on the CPU by rewriting device arguments (see module docstring)."""

    def __init__(self, strict: bool = False):
        super().__init__()
        self.strict = strict  # mark host-created tensors (see STRICT_DEVICES_ENV)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if self.strict:
            return self._strict(func, args, kwargs)
        return self._run(func, args, kwargs)

    def _strict(self, func, args, kwargs):
        if func in _FACTORIES:
            # No device named: the host on a GPU machine too. (An explicit CPU device cannot be told
            # from a device taken from a parameter, which is CUDA there: left unmarked.)
            on_host = kwargs.get("device") is None
            out = self._run(func, args, kwargs)
            if on_host:
                out._r1_host = True
            return out
        moves_to_device = (func is torch.Tensor.cuda) or (
            func is torch.Tensor.to and (_is_cuda_device(kwargs.get("device")) or (len(args) > 1 and _is_cuda_device(args[1])))
        )
        if moves_to_device and getattr(args[0], "_r1_host", False):
            return args[0].clone()  # a host -> device copy, as on a GPU: the copy is a device tensor
        return self._run(func, args, kwargs)

    def _run(self, func, args, kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.device and args and _is_cuda_device(args[0]):
            return _CPU  # e.g. `with torch.device(torch.cuda.current_device()):` in yarn RoPE
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and "dtype" not in kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype, args[0].type())
        if func is torch.Tensor.type and len(args) > 1 and isinstance(args[1], str):
            # Tensor.type("torch.cuda.FloatTensor") -> the CPU tensor of that dtype.
            args = (args[0], args[1].replace(".cuda", ""), *args[2:])
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _CompletedEvent:
    """A CUDA event on an in-order device where every recorded op has already finished."""

    def __init__(self, *args, **kwargs):
        self._time = None

    def record(self, stream=None):
        self._time = time.perf_counter()

    def wait(self, stream=None):
        pass

    def query(self) -> bool:
        return True

    def synchronize(self):
        pass

    def elapsed_time(self, end: "_CompletedEvent") -> float:
        return 1000.0 * ((end._time or 0.0) - (self._time or 0.0))


class _DefaultStream:
    """The one stream of an in-order device."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or _CompletedEvent()
        event.record()
        return event

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __eq__(self, other) -> bool:
        return isinstance(other, _DefaultStream)

    def __hash__(self) -> int:
        return 0


_STREAM = _DefaultStream()


def _cuda_stand_ins() -> dict:
    """`torch.cuda` attributes that Megatron calls for bookkeeping, with CPU meanings."""
    return {
        "current_device": lambda: 0,
        "set_device": lambda *a, **k: None,
        "device_count": lambda: 1,
        "synchronize": lambda *a, **k: None,
        "empty_cache": lambda: None,
        "Stream": _DefaultStream,
        "ExternalStream": _DefaultStream,
        "Event": _CompletedEvent,
        "current_stream": lambda *a, **k: _STREAM,
        "default_stream": lambda *a, **k: _STREAM,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "set_stream": lambda *a, **k: None,
        # The CPU generator stands in for the device generator (Megatron's RNG tracker forks it).
        "get_rng_state": lambda *a, **k: torch.get_rng_state(),
        "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
        "manual_seed": lambda seed: None,
        "manual_seed_all": lambda seed: None,
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0,
        "memory_stats": lambda *a, **k: {},
        "reset_peak_memory_stats": lambda *a, **k: None,
    }


_installed = False


def install_cuda_stand_ins() -> None:
    """Put the CPU meanings of `torch.cuda.*` in place. `setup()` does it once; call it again after
    starting vLLM's CPU engine, whose worker replaces `torch.cuda.Stream`/`Event`/`stream`
    process-wide with placeholders that Megatron's code cannot use."""
    if has_cuda():
        return
    for name, value in _cuda_stand_ins().items():
        setattr(torch.cuda, name, value)
    # torch.cuda.random.* is what megatron.core.tensor_parallel.random imports by name.
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state


def setup() -> None:
    """Prepare this process for Megatron-Core; idempotent. On CPU, installs the adaptation."""
    global _installed
    if _installed:
        return
    _installed = True
    # Megatron reads these at import time in a few places; harmless on GPU.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if not has_transformer_engine():
        _megatron_without_te()
    if has_cuda():
        _count_real_tokens_only()
        return
    install_cuda_stand_ins()
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # Megatron wraps this tiny elementwise function in torch.compile (`jit_fuser`); on CPU the
    # first call would spend seconds generating C++ for no measurable gain.
    if hasattr(TopKRouter._apply_expert_bias, "__wrapped__"):
        TopKRouter._apply_expert_bias = TopKRouter._apply_expert_bias.__wrapped__
    _count_real_tokens_only()
    # Entered for the life of the process: every Megatron call from here on sees a CPU "cuda".
    mode = CudaToCpuMode(strict=strict_devices())
    mode.__enter__()
    _keep_mode_during_backward(mode)
    if mode.strict:
        _check_collective_devices()
    log.debug("installed the Megatron-Core CPU adaptation")


def _count_real_tokens_only() -> None:
    """Megatron-Core 0.16.1 flattens a router's padding mask to `[tokens]` and then masks the
    `[tokens, experts]` routing map with it, which fails to broadcast: a forward given a padding mask
    (as `train.step` gives MoE training forwards, so that right padding does not count in the expert
    load the aux-loss-free bias balances) would stop there. Mask per token, as intended."""
    from megatron.core.transformer.moe.router import TopKRouter

    original = TopKRouter._apply_expert_bias
    if getattr(original, "_r1_per_token_mask", False):
        return

    def apply_expert_bias(self, routing_map, padding_mask=None):
        if padding_mask is not None and padding_mask.dim() == routing_map.dim() - 1:
            padding_mask = padding_mask.unsqueeze(-1)
        return original(self, routing_map, padding_mask=padding_mask)

    apply_expert_bias._r1_per_token_mask = True
    TopKRouter._apply_expert_bias = apply_expert_bias


def _keep_mode_during_backward(mode: CudaToCpuMode) -> None:
    """`Tensor.backward()` reaches the autograd engine from inside our mode's handler, where torch
    has suspended the mode; Megatron's backward functions (e.g. TP gathers) would then see the real,
    absent CUDA. Re-enter the mode right where the engine is started."""
    import torch.autograd
    from torch.overrides import _get_current_function_mode_stack

    run_backward = torch.autograd._engine_run_backward

    def run_backward_in_mode(*args, **kwargs):
        if mode in _get_current_function_mode_stack():
            return run_backward(*args, **kwargs)
        with mode:
            return run_backward(*args, **kwargs)

    torch.autograd._engine_run_backward = run_backward_in_mode


# Point-to-point ops stay unwrapped: `P2POp` checks their identity, and the package sends none itself.
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "all_to_all_single", "reduce")


def _check_collective_devices() -> None:
    """Wrap torch.distributed's tensor collectives: one called from this package with a tensor made
    on the host raises (Megatron's own calls, some on gloo groups by design, are left alone)."""
    import sys

    import torch.distributed as dist

    def checked(name, collective):
        @functools.wraps(collective)
        def call(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("megatron_r1."):
                for value in (*args, *kwargs.values()):
                    for tensor in value if isinstance(value, (list, tuple)) else (value,):
                        if getattr(tensor, "_r1_host", False):
                            raise HostTensorInCollective(
                                f"{caller} passes a host tensor to dist.{name}; NCCL groups take tensors on "
                                "platform.device() only (create it there)"
                            )
            return collective(*args, **kwargs)

        return call

    for name in _COLLECTIVES:
        setattr(dist, name, checked(name, getattr(dist, name)))


def _megatron_without_te() -> None:
    """Megatron's MLA module decides "TE present" from an import that succeeds with placeholders."""
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False


def is_adapted() -> bool:
    """True when the CPU adaptation is active in this process."""
    return _installed and not has_cuda()
