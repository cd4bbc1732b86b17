"""Two gloo processes: train steps and checkpoints under TP=2, DP=2 (ZeRO-1 optimizer) and PP=2 on the CPU.

One `torch.multiprocessing.spawn` runs every scenario (the import of Megatron dominates the cost);
each rank writes its numbers to a JSON file, and the tests below assert on them in the parent.

* TP=2 must reproduce TP=1 exactly: with `use_cpu_initialization` Megatron draws each full weight
  from the same seeded generator and slices it, so both layouts start from the same weights. The
  TP=1 reference runs as DP=2 with the same batch on both ranks, which averages two identical
  gradients and is therefore the single-process computation.
* DP=2 must be the global token mean: ranks holding different halves of a batch (different token
  counts) train exactly like ranks that each hold the whole batch. The optimizer is the distributed
  (ZeRO-1) one, and its sharded state survives a checkpoint round trip.
* PP=2 runs Megatron's 1F1B schedule over two micro-batches; every rank reports the same numbers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from megatron_r1.distributed import free_port

WORLD = 2
SEED = 1234
STEPS = 3


def _batch(batch_size: int, seed: int):
    from megatron_r1.train.step import Batch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, _model_config().vocab_size, (batch_size, 12), generator=g)
    mask = torch.zeros_like(tokens)
    for i in range(batch_size):
        mask[i, 2 + i % 3 : 12 - i % 4] = 1  # responses of different lengths
    return Batch(tokens=tokens, loss_mask=mask)


def _model_config():
    from megatron_r1.config import ModelConfig

    # The tiny default: one key/value head, so at TP=2 Megatron replicates it and all-gathers qkv;
    # that gather's backward allocates on "cuda" (covered by the CPU adaptation).
    return ModelConfig()


def _build(parallel):
    from megatron_r1.config import OptimizerConfig
    from megatron_r1.distributed import init_distributed
    from megatron_r1.models.build import build_model
    from megatron_r1.train.optim import build_optimizer

    init_distributed(parallel, seed=SEED)  # re-seeds: every build starts from the same weights
    return build_optimizer(build_model(_model_config(), parallel), OptimizerConfig(lr=1e-3), parallel, total_steps=20)


def _train(ddp, opt, sched, batch, steps: int = STEPS, micro_batch_size: int = 2) -> list[dict]:
    from megatron_r1.train.step import lm_loss_fn, train_step

    return [train_step(ddp, opt, sched, batch, lm_loss_fn, micro_batch_size) for _ in range(steps)]


def _entropy_bonus_loss(logprobs, entropy, micro):
    """NLL minus an entropy bonus: exercises the vocab-parallel entropy and its gradient."""
    nll = -(logprobs * micro.mask).sum() / micro.num_tokens
    bonus = (entropy * micro.mask).sum() / micro.num_tokens
    return nll - 0.5 * bonus, {"entropy": (entropy.detach() * micro.mask).sum() / micro.mask.sum()}


def _entropy_step(ddp, opt, sched, batch) -> dict:
    from megatron_r1.train.step import train_step

    return train_step(ddp, opt, sched, batch, _entropy_bonus_loss, micro_batch_size=2, with_entropy=True)


def _param_fingerprint(model) -> list[float]:
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    return [flat.sum().item(), flat.square().sum().item(), flat[:: max(1, flat.numel() // 50)].sum().item()]


def _tensor_parallel(tmp: Path) -> dict:
    from megatron_r1.config import ParallelConfig
    from megatron_r1.train.checkpoint import load_checkpoint, save_checkpoint
    from megatron_r1.train.step import compute_logprobs

    batch = _batch(4, seed=0)
    tp2 = ParallelConfig(tensor_model_parallel_size=2)
    ddp, opt, sched = _build(tp2)
    out = {"logprobs_tp2": compute_logprobs(ddp, batch.tokens, 2).tolist()}
    out["tp2"] = _train(ddp, opt, sched, batch)
    out["entropy_tp2"] = _entropy_step(ddp, opt, sched, batch)

    # Checkpoint round trip with each rank holding half of every weight.
    save_checkpoint(tmp / "ckpt_tp2", STEPS, ddp, opt, sched, extra_state={"step": STEPS})
    out["after_save"] = _train(ddp, opt, sched, batch, steps=1)[0]
    ddp2, opt2, sched2 = _build(tp2)
    with torch.no_grad():  # scramble, so the resumed numbers can only come from the checkpoint
        for p in ddp2.parameters():
            p.add_(0.1)
    out["extra"] = load_checkpoint(tmp / "ckpt_tp2", STEPS, ddp2, opt2, sched2)
    out["after_load"] = _train(ddp2, opt2, sched2, batch, steps=1)[0]

    tp1 = ParallelConfig()  # DP=2 over identical batches == one rank with the whole batch
    ddp, opt, sched = _build(tp1)
    out["logprobs_tp1"] = compute_logprobs(ddp, batch.tokens, 2).tolist()
    out["tp1"] = _train(ddp, opt, sched, batch)
    out["entropy_tp1"] = _entropy_step(ddp, opt, sched, batch)
    return out


def _data_parallel(tmp: Path) -> dict:
    from megatron_r1.config import ParallelConfig
    from megatron_r1.train.checkpoint import load_checkpoint, resume_step, save_checkpoint

    rank = torch.distributed.get_rank()
    full = _batch(8, seed=1)
    half = full.rows(slice(4 * rank, 4 * rank + 4))  # different token counts on the two ranks
    dp = ParallelConfig(use_distributed_optimizer=True)  # ZeRO-1: each rank updates half, then all-gathers
    ddp, opt, sched = _build(dp)
    out = {"split": _train(ddp, opt, sched, half, steps=4), "fingerprint": _param_fingerprint(ddp)}
    out["masked_targets"] = full.loss_mask[:, 1:].sum().item()

    # The distributed optimizer's state is sharded over DP ranks; each rank saves and restores its part.
    save_checkpoint(tmp / "ckpt_dp", 4, ddp, opt, sched)
    out["after_save"] = _train(ddp, opt, sched, half, steps=1)[0]
    ddp2, opt2, sched2 = _build(dp)
    load_checkpoint(tmp / "ckpt_dp", 4, ddp2, opt2, sched2)
    out["after_load"] = _train(ddp2, opt2, sched2, half, steps=1)[0]

    # Damage a file of step 5 that only one rank's share of the manifest check reads: both ranks
    # must still agree to fall back to step 4.
    save_checkpoint(tmp / "ckpt_dp", 5, ddp2, opt2, sched2)
    shard = sorted((tmp / "ckpt_dp" / "step_5").glob("*.distcp"))[-1]
    if rank == 1:
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    torch.distributed.barrier()
    out["resume_step"] = resume_step(tmp / "ckpt_dp")
    ddp, opt, sched = _build(dp)
    out["whole"] = _train(ddp, opt, sched, full, steps=4, micro_batch_size=3)
    return out


def _pipeline_parallel() -> dict:
    from megatron_r1.config import ParallelConfig
    from megatron_r1.train.step import compute_logprobs, forward_backward, lm_loss_fn

    batch = _batch(4, seed=2)
    pp = ParallelConfig(pipeline_model_parallel_size=2)
    ddp, opt, sched = _build(pp)
    lp = compute_logprobs(ddp, batch.tokens, 2)
    eval_loss = forward_backward(ddp, batch, lm_loss_fn, micro_batch_size=2, forward_only=True)["loss"]
    mask = batch.loss_mask[:, 1:].float()
    return {
        "logprobs": lp.tolist(),
        "eval_loss": eval_loss,
        "loss_from_logprobs": (-(lp * mask).sum() / mask.sum()).item(),
        "steps": _train(ddp, opt, sched, batch, steps=4),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MEGATRON_R1_STRICT_DEVICES"] = "1"  # collectives must get device tensors (platform.py)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes share two cores
    from megatron_r1 import distributed

    tmp = Path(out_dir)
    results, timings = {}, {}
    for name, scenario in (("tp", lambda: _tensor_parallel(tmp)), ("dp", lambda: _data_parallel(tmp)), ("pp", _pipeline_parallel)):
        start = time.perf_counter()
        results[name] = scenario()
        timings[name] = time.perf_counter() - start
    results["timings"] = timings
    (tmp / f"rank{rank}.json").write_text(json.dumps(results))
    distributed.destroy()



@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("train_2rank")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _losses(steps: list[dict]) -> list[float]:
    return [s["loss"] for s in steps]


def _falls(losses: list[float]) -> bool:
    return all(b < a for a, b in zip(losses, losses[1:]))


def test_tensor_parallel_equals_tp1(ranks):
    r0, r1 = ranks[0]["tp"], ranks[1]["tp"]
    assert _falls(_losses(r0["tp2"])), _losses(r0["tp2"])
    assert _losses(r0["tp2"]) == _losses(r1["tp2"])  # both TP ranks report the same loss
    assert _losses(r0["tp2"]) == pytest.approx(_losses(r0["tp1"]), abs=1e-5)
    assert [s["grad_norm"] for s in r0["tp2"]] == pytest.approx([s["grad_norm"] for s in r0["tp1"]], rel=1e-5)
    lp2, lp1 = torch.tensor(r0["logprobs_tp2"]), torch.tensor(r0["logprobs_tp1"])
    assert torch.equal(lp2, torch.tensor(r1["logprobs_tp2"]))  # every TP rank holds the full tensor
    torch.testing.assert_close(lp2, lp1, atol=1e-5, rtol=0)
    # Vocab-parallel entropy: same value and same gradient as on the full vocabulary.
    e2, e1 = r0["entropy_tp2"], r0["entropy_tp1"]
    assert e2["entropy"] == pytest.approx(e1["entropy"], abs=1e-5) and e2["entropy"] > 0
    assert (e2["loss"], e2["grad_norm"]) == pytest.approx((e1["loss"], e1["grad_norm"]), rel=1e-5)


def test_tensor_parallel_checkpoint_resumes_exactly(ranks):
    for r in ranks:
        tp = r["tp"]
        assert tp["extra"] == {"step": STEPS}
        assert tp["after_load"]["loss"] == pytest.approx(tp["after_save"]["loss"], abs=1e-6)
        assert tp["after_load"]["lr"] == tp["after_save"]["lr"]


def test_data_parallel_is_a_global_token_mean(ranks):
    r0, r1 = ranks[0]["dp"], ranks[1]["dp"]
    split, whole = _losses(r0["split"]), _losses(r0["whole"])
    assert _falls(split), split
    assert split == _losses(r1["split"])  # the loss metric is averaged over DP ranks
    # Halves with different token counts train exactly like the whole batch on every rank.
    assert split == pytest.approx(whole, abs=1e-5)
    # num_tokens counts the masked targets on all DP ranks (the whole batch twice in the second run).
    assert 2 * r0["split"][0]["num_tokens"] == r0["whole"][0]["num_tokens"] == 2 * r0["masked_targets"]
    # The distributed optimizer's all-gather leaves identical replicas.
    assert r0["fingerprint"] == pytest.approx(r1["fingerprint"], rel=1e-12, abs=1e-12)


def test_distributed_optimizer_checkpoint_resumes_exactly(ranks):
    for r in ranks:
        dp = r["dp"]
        assert dp["after_load"]["loss"] == pytest.approx(dp["after_save"]["loss"], abs=1e-6)
        assert dp["after_load"]["grad_norm"] == pytest.approx(dp["after_save"]["grad_norm"], abs=1e-6)


def test_a_damaged_shard_makes_every_rank_fall_back_to_the_same_step(ranks):
    assert [r["dp"]["resume_step"] for r in ranks] == [4, 4]


def test_pipeline_parallel_train_step(ranks):
    r0, r1 = ranks[0]["pp"], ranks[1]["pp"]
    losses = _losses(r0["steps"])
    assert _falls(losses), losses
    assert losses == _losses(r1["steps"])  # the last stage's metrics reach the first stage
    assert r0["logprobs"] == r1["logprobs"]
    assert r0["eval_loss"] == pytest.approx(r0["loss_from_logprobs"], abs=1e-5)
    assert losses[0] == pytest.approx(r0["eval_loss"], abs=1e-5)
