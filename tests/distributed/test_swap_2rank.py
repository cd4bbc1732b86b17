"""`memory.swap_during_rollout` on two gloo ranks: data parallelism (a dense model, ZeRO-1 sharded
optimizer state) and expert parallelism (the tiny DeepSeek-V3 MoE, EP=2, experts' optimizer state
on its own expert-data-parallel shard). Between updates, as while the engine generates, every byte of
the trainer's state (gradient buffers, optimizer state, reference model, policy weights) leaves its
storage; the losses, the weights, and a resume from a checkpoint saved between swaps are bit for bit
those of the same steps without the swap. Results come back through files; assertions run in the parent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from megatron_r1.distributed import free_port

WORLD = 2
STEPS = 4
SAVED_AT = 2


def _batch(vocab: int, rank: int, step: int):
    from megatron_r1.train.step import Batch

    g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own rows
    tokens = torch.randint(0, vocab, (4, 16), generator=g)
    mask = torch.zeros_like(tokens)
    for i in range(4):
        mask[i, 2 + i % 3 : 16 - i] = 1
    return Batch(tokens=tokens, loss_mask=mask)


def _device_bytes(ddp, optimizer, reference) -> int:
    from megatron_r1.train.memory import _module_tensors, _optimizer_tensors

    storages = {}
    for t in [*_module_tensors(ddp), *_optimizer_tensors(optimizer), *_module_tensors(reference)]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    grads = sum(b.grad_data.untyped_storage().nbytes() for b in ddp.buffers + ddp.expert_parallel_buffers)
    return sum(storages.values()) + grads


def _run(model_cfg, parallel, mode: str, ckpt: Path) -> dict:
    """STEPS GRPO-shaped updates (reference model resident), swapping as `mode` says between them;
    a checkpoint after step SAVED_AT; then a fresh trainer resumes from it and runs the rest."""
    from megatron_r1.config import OptimizerConfig
    from megatron_r1.distributed import init_distributed
    from megatron_r1.models.build import build_model
    from megatron_r1.train.checkpoint import load_checkpoint, save_checkpoint
    from megatron_r1.train.memory import TrainerSwap
    from megatron_r1.train.optim import build_optimizer
    from megatron_r1.train.step import lm_loss_fn, train_step

    rank = int(os.environ["RANK"])

    def build():
        init_distributed(parallel, seed=1234)  # re-seeds: the same initial weights every build
        ddp, opt, sched = build_optimizer(build_model(model_cfg, parallel), OptimizerConfig(lr=1e-3), parallel, total_steps=20)
        reference = build_model(model_cfg, parallel).eval().requires_grad_(False)
        return ddp, opt, sched, reference, TrainerSwap(mode, ddp, opt, reference)

    def steps(ddp, opt, sched, reference, swap, first: int, last: int, losses: list, released: list):
        for step in range(first, last):
            swap.restore()
            losses.append(train_step(ddp, opt, sched, _batch(model_cfg.vocab_size, rank, step), lm_loss_fn, micro_batch_size=2)["loss"])
            if step + 1 == SAVED_AT and first == 0:
                save_checkpoint(ckpt, SAVED_AT, ddp, opt, sched)
            swap.offload_state()
            swap.offload_weights()
            released.append(_device_bytes(ddp, opt, reference))  # what is left while the engine generates
        swap.restore()

    ddp, opt, sched, reference, swap = build()
    full = _device_bytes(ddp, opt, reference)
    losses, released = [], []
    steps(ddp, opt, sched, reference, swap, 0, STEPS, losses, released)
    weights = [p.detach().clone() for p in ddp.parameters()]

    ddp, opt, sched, reference, swap = build()
    load_checkpoint(ckpt, SAVED_AT, ddp, opt, sched)
    resumed = []
    steps(ddp, opt, sched, reference, swap, SAVED_AT, STEPS, resumed, [])
    same_after_resume = all(torch.equal(a, b.detach()) for a, b in zip(weights, ddp.parameters(), strict=True))
    torch.save(weights, ckpt.parent / f"weights_{ckpt.name}_rank{rank}.pt")
    return {"losses": losses, "resumed": resumed, "released": released, "full_bytes": full, "same_after_resume": same_after_resume}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MEGATRON_R1_STRICT_DEVICES"] = "1"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share two cores
    from megatron_r1 import distributed
    from megatron_r1.config import ModelConfig, ParallelConfig, load_config

    out = Path(out_dir)
    layouts = {
        "dp2": (ModelConfig(), ParallelConfig(use_distributed_optimizer=True)),
        "ep2": (load_config(None, ["model=tiny_moe"]).model, ParallelConfig(expert_model_parallel_size=WORLD, use_distributed_optimizer=True)),
    }
    results = {}
    for name, (model_cfg, parallel) in layouts.items():
        for mode in ("none", "all"):
            results[f"{name}_{mode}"] = _run(model_cfg, parallel, mode, out / f"{name}_{mode}")
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    distributed.destroy()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("swap_2rank")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("layout", ["dp2", "ep2"])
def test_swap_releases_the_state_and_changes_no_bit(ranks, layout):
    out, results = ranks
    for rank, r in enumerate(results):
        off, on = r[f"{layout}_none"], r[f"{layout}_all"]
        assert on["losses"] == off["losses"], (rank, on["losses"], off["losses"])  # exactly
        assert on["resumed"] == off["resumed"] == off["losses"][SAVED_AT:], (rank, on["resumed"], off["resumed"], off["losses"])
        assert on["same_after_resume"] and off["same_after_resume"]
        assert on["released"] == [0] * STEPS, on["released"]  # every storage empty during generation
        assert len(set(off["released"])) == 1 and off["released"][0] > off["full_bytes"] > 0  # + Adam's state after step 1
        a = torch.load(out / f"weights_{layout}_none_rank{rank}.pt")
        b = torch.load(out / f"weights_{layout}_all_rank{rank}.pt")
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
