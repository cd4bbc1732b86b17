"""`TrainerSwap`: the trainer's state really leaves the device while the engine generates, and comes
back bit for bit (one CPU rank; the DP2 and EP2 MoE cases run in tests/distributed)."""

from __future__ import annotations

import pytest
import torch

from megatron_r1.config import ModelConfig, OptimizerConfig, ParallelConfig
from megatron_r1.distributed import init_distributed
from megatron_r1.models.build import build_model
from megatron_r1.train.memory import StorageSwap, TrainerSwap
from megatron_r1.train.optim import build_optimizer
from megatron_r1.train.step import Batch, lm_loss_fn, train_step

PARALLEL = ParallelConfig(use_distributed_optimizer=True)
SEED = 1234


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    init_distributed(PARALLEL, seed=SEED)


def _trainer():
    init_distributed(PARALLEL, seed=SEED)  # re-seeds: the same initial weights every call
    model = build_model(ModelConfig(), PARALLEL)
    ddp, optimizer, scheduler = build_optimizer(model, OptimizerConfig(lr=1e-3), PARALLEL, total_steps=20)
    init_distributed(PARALLEL, seed=SEED)
    reference = build_model(ModelConfig(), PARALLEL).eval().requires_grad_(False)
    return ddp, optimizer, scheduler, reference


def _batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ModelConfig().vocab_size, (4, 12), generator=g)
    mask = torch.zeros_like(tokens)
    for i in range(4):
        mask[i, 2 + i % 3 : 12 - i] = 1
    return Batch(tokens=tokens, loss_mask=mask)


def _state_bytes(ddp, optimizer, reference) -> dict[str, int]:
    """Device bytes each part holds right now (unique storages)."""
    from megatron_r1.train.memory import _module_tensors, _optimizer_tensors

    def held(tensors, skip=frozenset()):
        seen = {}
        for t in tensors:
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    weights = {t.untyped_storage().data_ptr() for t in _module_tensors(ddp)} | {b.grad_data.untyped_storage().data_ptr() for b in ddp.buffers}
    return {
        "weights": held(_module_tensors(ddp)),
        "gradients": sum(b.grad_data.untyped_storage().nbytes() for b in ddp.buffers),
        "optimizer": held(_optimizer_tensors(optimizer), weights),
        "reference": held(_module_tensors(reference)),
    }


@pytest.mark.parametrize("mode", ["except_weights", "all"])
def test_the_state_leaves_during_generation_and_training_is_bit_identical(mode):
    runs = {}
    for swap_mode in ("none", mode):
        ddp, optimizer, scheduler, reference = _trainer()
        swap = TrainerSwap(swap_mode, ddp, optimizer, reference)
        before = _state_bytes(ddp, optimizer, reference)
        losses = []
        for step in range(4):
            swap.restore()
            losses.append(train_step(ddp, optimizer, scheduler, _batch(step), lm_loss_fn, micro_batch_size=2)["loss"])
            full = _state_bytes(ddp, optimizer, reference)
            swap.offload_state()
            swap.offload_weights()
            during = _state_bytes(ddp, optimizer, reference)  # what the engine would see
            if swap_mode == "none":
                assert during == full
            else:
                assert full["optimizer"] > 0 and full["gradients"] > 0 and full["reference"] > 0
                assert during["gradients"] == during["optimizer"] == during["reference"] == 0, during
                assert during["weights"] == (0 if mode == "all" else full["weights"]), during
                assert swap.moved_bytes["optimizer"] == full["optimizer"] and swap.moved_bytes["reference"] == full["reference"]
        assert before["weights"] > 0
        swap.restore()
        assert _state_bytes(ddp, optimizer, reference) == full
        state = [p.detach().clone() for p in ddp.parameters()] + [t.detach().clone() for t in _optimizer_state(optimizer)]
        runs[swap_mode] = (losses, state, [p.detach().clone() for p in reference.parameters()])
    (loss_a, state_a, ref_a), (loss_b, state_b, ref_b) = runs["none"], runs[mode]
    assert loss_a == loss_b  # bit for bit, not approximately
    assert all(torch.equal(a, b) for a, b in zip(state_a, state_b, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(ref_a, ref_b, strict=True))


def _optimizer_state(optimizer):
    inner = optimizer.optimizer
    return [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor) and v.dim()]


def test_storage_swap_keeps_views_and_releases_bytes():
    buffer = torch.arange(16, dtype=torch.float32)
    views = [buffer[:8].view(2, 4), buffer[8:]]  # like parameters inside a contiguous DDP buffer
    swap = StorageSwap("test")
    assert swap.out([buffer.untyped_storage(), views[1].untyped_storage()]) == 64  # one storage, counted once
    assert buffer.untyped_storage().nbytes() == 0 and views[0].untyped_storage().nbytes() == 0
    with pytest.raises(RuntimeError, match="already swapped out"):
        swap.out([buffer.untyped_storage()])
    assert swap.back() == 64
    assert torch.equal(views[0], torch.arange(8, dtype=torch.float32).view(2, 4)) and torch.equal(buffer, torch.arange(16.0))
    released = StorageSwap("grads", keep=False)
    released.out([buffer.untyped_storage()])
    released.back()
    assert torch.equal(buffer, torch.zeros(16))


def test_swap_none_moves_nothing():
    ddp, optimizer, _, reference = _trainer()
    swap = TrainerSwap("none", ddp, optimizer, reference)
    assert swap.offload_state() == 0 and swap.offload_weights() == 0 and not swap.swapped and swap.restore() == 0
