"""Checkpoints with Megatron dist_checkpointing on one CPU rank: exact resume, `latest`, pruning, errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from megatron_r1.config import ConfigError, ModelConfig, OptimizerConfig, ParallelConfig
from megatron_r1.distributed import init_distributed
from megatron_r1.models.build import build_model
from megatron_r1.train.checkpoint import (
    CheckpointError,
    latest_step,
    load_checkpoint,
    resume_step,
    save_checkpoint,
    saved_steps,
    step_dir,
)
from megatron_r1.train.optim import build_optimizer, current_lr
from megatron_r1.train.step import Batch, lm_loss_fn, train_step

PARALLEL = ParallelConfig()
OPT = OptimizerConfig(lr=1e-3, min_lr=1e-4, lr_warmup_steps=1, lr_decay_style="cosine")
TOTAL_STEPS = 10


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    init_distributed(PARALLEL, seed=7)


def fresh(seed: int = 7, model_cfg: ModelConfig | None = None):
    init_distributed(PARALLEL, seed=seed)
    return build_optimizer(build_model(model_cfg or ModelConfig(), PARALLEL), OPT, PARALLEL, TOTAL_STEPS)


def batch_for(step: int) -> Batch:
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, ModelConfig().vocab_size, (4, 10), generator=g)
    mask = torch.ones_like(tokens)
    mask[:, :3] = 0
    return Batch(tokens=tokens, loss_mask=mask)


def draw_rngs() -> tuple:
    return torch.rand(3), random.random(), np.random.rand()


def params(ddp) -> list[torch.Tensor]:
    return [p.detach().clone() for p in ddp.parameters()]


def test_resume_restores_rng_params_loss_and_schedule(tmp_path):
    ddp, opt, sched = fresh()
    for step in range(2):
        train_step(ddp, opt, sched, batch_for(step), lm_loss_fn, micro_batch_size=2)
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    save_checkpoint(tmp_path, 2, ddp, opt, sched, extra_state={"step": 2, "sampler": {"index": 8}})
    t_after, py_after, np_after = draw_rngs()
    m1 = train_step(ddp, opt, sched, batch_for(2), lm_loss_fn, micro_batch_size=2)
    p1 = params(ddp)

    ddp2, opt2, sched2 = fresh(seed=99)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    assert load_checkpoint(tmp_path, 2, ddp2, opt2, sched2) == {"step": 2, "sampler": {"index": 8}}
    assert sched2.num_steps == 2
    t, py, npv = draw_rngs()
    assert torch.equal(t, t_after) and py == py_after and npv == np_after
    m2 = train_step(ddp2, opt2, sched2, batch_for(2), lm_loss_fn, micro_batch_size=2)
    assert m2["loss"] == pytest.approx(m1["loss"], abs=1e-6)
    assert m2["lr"] == pytest.approx(m1["lr"], abs=1e-15)
    assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], abs=1e-6)
    for a, b in zip(params(ddp2), p1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_a_save_before_the_first_step_resumes_like_a_fresh_optimizer(tmp_path):
    ddp, opt, sched = fresh()
    start = params(ddp)
    save_checkpoint(tmp_path, 0, ddp, opt, sched)  # Adam has no state yet: only the model is saved
    first = train_step(ddp, opt, sched, batch_for(0), lm_loss_fn, micro_batch_size=2)
    after_first = params(ddp)
    train_step(ddp, opt, sched, batch_for(1), lm_loss_fn, micro_batch_size=2)

    load_checkpoint(tmp_path, 0, ddp, opt, sched)  # back to the start, into the trained optimizer
    assert all(torch.equal(a, b) for a, b in zip(params(ddp), start)) and sched.num_steps == 0
    again = train_step(ddp, opt, sched, batch_for(0), lm_loss_fn, micro_batch_size=2)
    assert (again["loss"], again["lr"]) == (first["loss"], first["lr"])
    for a, b in zip(params(ddp), after_first):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


def test_weights_only_load_into_a_bare_model(tmp_path):
    ddp, opt, sched = fresh()
    train_step(ddp, opt, sched, batch_for(0), lm_loss_fn, micro_batch_size=4)
    save_checkpoint(tmp_path, 1, ddp, opt, sched)
    init_distributed(PARALLEL, seed=5)
    bare = build_model(ModelConfig(), PARALLEL)
    load_checkpoint(tmp_path, 1, bare, load_rng=False)
    for a, b in zip(bare.parameters(), ddp.module.parameters()):
        assert torch.equal(a, b)


def test_latest_points_to_the_last_complete_save_and_old_ones_are_pruned(tmp_path):
    assert latest_step(tmp_path) is None and saved_steps(tmp_path) == []
    ddp, opt, sched = fresh()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, ddp, opt, sched, extra_state={"step": step}, keep_last=2)
        assert latest_step(tmp_path) == step
    assert saved_steps(tmp_path) == [2, 3]
    assert (tmp_path / "latest").read_text().strip() == "3"

    # A save that crashed half-way leaves only a .partial directory: `latest` is untouched...
    crashed = tmp_path / "step_4.partial"
    crashed.mkdir()
    (crashed / "common.pt").write_bytes(b"half")
    assert latest_step(tmp_path) == 3 and saved_steps(tmp_path) == [2, 3]
    # ...and the next save cleans it up.
    save_checkpoint(tmp_path, 5, ddp, opt, sched, keep_last=2)
    assert saved_steps(tmp_path) == [3, 5] and not crashed.exists() and latest_step(tmp_path) == 5
    assert not list(tmp_path.glob("*.tmp"))

    # Saving the same step again replaces it; keep_last=0 keeps everything.
    save_checkpoint(tmp_path, 5, ddp, opt, sched, keep_last=0)
    save_checkpoint(tmp_path, 6, ddp, opt, sched, keep_last=0)
    assert saved_steps(tmp_path) == [3, 5, 6]
    # These were saved before any optimizer step (empty Adam state); they load all the same.
    assert load_checkpoint(tmp_path, latest_step(tmp_path), *fresh(seed=3)) == {}


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_and_garbled_checkpoints_fail_with_one_clear_line(tmp_path):
    ddp, opt, sched = fresh()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path, 7, ddp, opt, sched)
    assert "no checkpoint at" in _one_line_error(e) and "step_7" in str(e.value)

    junk = step_dir(tmp_path, 8)
    junk.mkdir()
    (junk / "model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path, 8, ddp, opt, sched)
    assert "not a Megatron distributed checkpoint" in _one_line_error(e)

    save_checkpoint(tmp_path, 9, ddp, opt, sched, keep_last=0)
    (step_dir(tmp_path, 9) / "trainer_state.json").write_text("{garbled")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path, 9, ddp, opt, sched)
    assert "not valid JSON" in _one_line_error(e)

    (tmp_path / "latest").write_text("banana")
    with pytest.raises(CheckpointError) as e:
        latest_step(tmp_path)
    assert "step number" in _one_line_error(e)


def test_a_checkpoint_of_another_model_shape_is_refused(tmp_path):
    ddp, opt, sched = fresh()
    save_checkpoint(tmp_path, 1, ddp, opt, sched)
    other = fresh(model_cfg=ModelConfig(hidden_size=64, ffn_hidden_size=128))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path, 1, *other)
    assert "cannot load" in _one_line_error(e)


# --------------------------------------------------------------------------------------------
# Manifests: a save that dies half-way, or a checkpoint damaged on disk, never gets loaded.


def _two_checkpoints(root):
    """Steps 1 and 2 with different weights; returns the model and the weights of each step."""
    ddp, opt, sched = fresh()
    train_step(ddp, opt, sched, batch_for(0), lm_loss_fn, micro_batch_size=4)
    save_checkpoint(root, 1, ddp, opt, sched, extra_state={"step": 1})
    at_1 = params(ddp)
    train_step(ddp, opt, sched, batch_for(1), lm_loss_fn, micro_batch_size=4)
    save_checkpoint(root, 2, ddp, opt, sched, extra_state={"step": 2})
    return (ddp, opt, sched), at_1


def _shard(root, step: int):
    return next(step_dir(root, step).glob("*.distcp"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_newest_checkpoint_is_detected_and_the_previous_one_is_resumed(tmp_path, damage, caplog):
    model, at_1 = _two_checkpoints(tmp_path)
    assert resume_step(tmp_path) == 2 and (step_dir(tmp_path, 2) / "manifest.json").is_file()
    shard = _shard(tmp_path, 2)
    if damage == "flip":  # same size, different bytes: only the checksum level sees it
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        assert resume_step(tmp_path, verify="size") == 2
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        shard.unlink()

    with caplog.at_level("WARNING", logger="megatron_r1.train.checkpoint"):
        assert resume_step(tmp_path) == 1
    [line] = [r.getMessage() for r in caplog.records if "failed verification" in r.getMessage()]
    assert "step_2" in line and shard.name in line and "trying step_1" in line and "\n" not in line

    # Loading the damaged step by hand is refused in one line; the fallback loads step 1 exactly.
    if damage != "flip":
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path, 2, *model)
        assert "is damaged" in _one_line_error(e)
    assert load_checkpoint(tmp_path, 1, *model) == {"step": 1}
    assert all(torch.equal(a, b) for a, b in zip(params(model[0]), at_1))


def test_when_no_checkpoint_verifies_the_error_is_one_line(tmp_path):
    _two_checkpoints(tmp_path)
    for step in (1, 2):
        _shard(tmp_path, step).write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        resume_step(tmp_path)
    message = _one_line_error(e)
    assert "no checkpoint under" in message and "step_2:" in message and "step_1:" in message and "resume=false" in message
    assert resume_step(tmp_path / "nothing_here") is None


def test_a_save_that_fails_before_the_rename_leaves_the_previous_checkpoint_current(tmp_path, monkeypatch):
    model, at_1 = _two_checkpoints(tmp_path)
    import megatron_r1.train.checkpoint as ckpt

    def fail(*args):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ckpt.os, "replace", fail)  # shards and manifest written; the commit fails
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 3, *model)
    monkeypatch.undo()
    assert (tmp_path / "step_3.partial" / "manifest.json").is_file()
    assert latest_step(tmp_path) == 2 and resume_step(tmp_path) == 2 and saved_steps(tmp_path) == [1, 2]


def test_keep_last_one_is_refused_since_it_leaves_no_fallback(tmp_path):
    with pytest.raises(ConfigError) as e:
        save_checkpoint(tmp_path, 1, *fresh(), keep_last=1)
    assert "keep at least 2" in _one_line_error(e) and not (tmp_path / "step_1").exists()


_KILLED_MID_SAVE = """
import os, sys, time
from megatron_r1.config import ModelConfig, ParallelConfig
from megatron_r1.distributed import init_distributed
from megatron_r1.models.build import build_model
from megatron_r1.train import checkpoint, manifest

init_distributed(ParallelConfig(), seed=7)
model = build_model(ModelConfig(), ParallelConfig())
root = sys.argv[1]
checkpoint.save_checkpoint(root, 1, model, None, None, extra_state={"step": 1})
with __import__("torch").no_grad():
    for p in model.parameters():
        p.add_(1.0)

def stall(*args, **kwargs):  # every shard of step 2 is on disk, its manifest not yet
    print("SHARDS WRITTEN", flush=True)
    time.sleep(120)

manifest.write = stall
checkpoint.save_checkpoint(root, 2, model, None, None, extra_state={"step": 2})
"""


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_loadable_and_selected(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a 1-process job of its own, not a member of this test's group
    child = subprocess.Popen([sys.executable, "-c", _KILLED_MID_SAVE, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert child.stdout.readline().strip() == "SHARDS WRITTEN"
        assert list((tmp_path / "step_2.partial").glob("*.distcp"))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    assert latest_step(tmp_path) == 1 and saved_steps(tmp_path) == [1] and resume_step(tmp_path) == 1
    init_distributed(PARALLEL, seed=3)
    bare = build_model(ModelConfig(), PARALLEL)
    assert load_checkpoint(tmp_path, 1, bare, load_rng=False) == {"step": 1}
    # The next save of step 2 replaces the leftover and commits normally.
    save_checkpoint(tmp_path, 2, bare, None, None)
    assert not (tmp_path / "step_2.partial").exists() and resume_step(tmp_path) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the asynchronous writer is available")
def test_async_save_needs_cuda_and_says_so_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^checkpoint.async_save needs CUDA .*set it to false here$"):
        save_checkpoint(tmp_path / "ckpt", 1, *fresh(), async_save=True)
    assert not (tmp_path / "ckpt").exists()  # refused before anything was written


def test_a_damaged_file_of_an_unverified_checkpoint_is_one_line(tmp_path):
    """A checkpoint saved without a manifest (older versions) is loaded unverified; a damaged
    common.pt then fails in one line naming the fix, not with a pickle traceback."""
    model, _ = _two_checkpoints(tmp_path)
    (tmp_path / "step_2" / "manifest.json").unlink()
    (tmp_path / "step_2" / "common.pt").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path, 2, *model)
    message = _one_line_error(e)
    assert "a file is damaged" in message and "load an earlier step" in message


def test_the_fix_a_failed_resume_names_is_the_callers(tmp_path):
    _two_checkpoints(tmp_path)
    for step in (1, 2):
        _shard(tmp_path, step).write_bytes(b"")
    with pytest.raises(CheckpointError, match="pass --step of an older checkpoint") as e:
        resume_step(tmp_path, fix="pass --step of an older checkpoint that verifies")
    assert "resume=false" not in str(e.value)
