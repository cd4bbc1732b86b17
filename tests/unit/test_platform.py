"""The CPU adaptation of Megatron-Core: what it rewrites, and that Megatron code runs under it."""

import pytest
import torch

from megatron_r1 import platform

pytestmark = pytest.mark.skipif(platform.has_cuda(), reason="the adaptation is only installed without CUDA")


@pytest.fixture(scope="module", autouse=True)
def adapted():
    platform.setup()
    assert platform.is_adapted()


def test_cuda_device_arguments_land_on_cpu():
    for dev in ("cuda", "cuda:0", torch.device("cuda"), 0, torch.cuda.current_device()):
        assert torch.zeros(2, device=dev).device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.empty(3, pin_memory=True).device.type == "cpu"


def test_cuda_and_type_behave_like_a_cuda_tensor():
    t = torch.ones(3)
    assert t.cuda() is t
    assert t.type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert t.type(torch.float64).dtype == torch.float64  # explicit conversions still convert


def test_streams_and_events_are_complete_at_once():
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    assert event.query()
    torch.cuda.synchronize()


def test_rng_state_round_trips_through_the_cpu_generator():
    state = torch.cuda.get_rng_state()
    a = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))


def test_megatron_rng_tracker_forks():
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("test-rng", 123)
    before = torch.rand(1)
    with tracker.fork("test-rng"):
        inside = torch.rand(1)
    with tracker.fork("test-rng"):
        inside2 = torch.rand(1)
    assert not torch.equal(inside, inside2)  # the forked stream advances
    assert before.shape == inside.shape


def test_backend_and_description():
    assert platform.distributed_backend() == "gloo"
    assert platform.distributed_backend("nccl") == "nccl"
    assert "CPU" in platform.describe()
    assert platform.device().type == "cpu"


class _AllocatesOnCudaInBackward(torch.autograd.Function):
    """Like Megatron's TP gathers: the backward allocates with device=cuda."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * torch.full_like(grad, 2.0, device=torch.cuda.current_device())


def test_backward_runs_under_the_adaptation():
    x = torch.ones(3, requires_grad=True)
    _AllocatesOnCudaInBackward.apply(x).sum().backward()  # Tensor.backward
    assert torch.equal(x.grad, torch.full((3,), 2.0))
    (g,) = torch.autograd.grad(_AllocatesOnCudaInBackward.apply(x).sum(), x)  # autograd.grad
    assert torch.equal(g, torch.full((3,), 2.0))
