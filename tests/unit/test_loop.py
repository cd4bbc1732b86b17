"""The shared training loop on one CPU rank with a real tiny Megatron model: evaluation and checkpoint
cadence, asynchronous saves (every save but the last one before the process leaves), the
non-finite guard, the metrics-file policy and the resume of the stage's own state."""

from __future__ import annotations

import json

import pytest

from megatron_r1.config import ModelConfig, ParallelConfig, load_config
from megatron_r1.distributed import init_distributed
from megatron_r1.models.build import build_model
from megatron_r1.train import checkpoint as ckpt
from megatron_r1.train.guards import TrainingHalted
from megatron_r1.train.loop import StepResult, Trainee, TrainingLoop
from megatron_r1.train.optim import build_optimizer
from megatron_r1.train.step import lm_loss_fn, train_step
from tests.unit.test_step import make_batch


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    init_distributed(ParallelConfig(), seed=1234)


def _trainee(steps: int) -> Trainee:
    init_distributed(ParallelConfig(), seed=1234)  # the same initial weights every call
    cfg = ModelConfig()
    model = build_model(cfg, ParallelConfig())
    return Trainee(cfg, model, *build_optimizer(model, load_config(None, ["optimizer.lr=1e-3"]).optimizer, ParallelConfig(), steps))


def _cfg(run_dir, *overrides):
    return load_config(None, [f"logging.run_dir={run_dir}", "logging.progress_bar=false", "logging.tensorboard=false", *overrides])


def _lm_step(trainee: Trainee):
    def step(i: int) -> StepResult:
        out = train_step(trainee.ddp, trainee.optimizer, trainee.scheduler, make_batch(seed=i), lm_loss_fn, 2)
        return StepResult({"train/loss": out["loss"]}, nonfinite=out["nonfinite"], sequences=4)

    return step


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cadence_async_saves_and_exact_resume(tmp_path, monkeypatch):
    saves = []
    real_save = ckpt.save_checkpoint

    def recording_save(root, step, *args, async_save=False, **kwargs):
        saves.append((step, async_save))
        return real_save(root, step, *args, async_save=False, **kwargs)  # CPU: written synchronously all the same

    monkeypatch.setattr(ckpt, "save_checkpoint", recording_save)
    monkeypatch.setattr(ckpt, "require_async_support", lambda enabled: None)  # the flag's routing is what is tested here
    cfg = _cfg(tmp_path / "a", "steps=5", "checkpoint.save_every=2", "checkpoint.async_save=true", "checkpoint.keep_last=0")
    trainee = _trainee(5)
    evals = []
    with TrainingLoop(cfg, trainee, 5, "test") as loop:
        assert loop.resume() is None
        loop.run(_lm_step(trainee), evaluate=lambda done: evals.append(done) or {"eval/x": float(done)}, eval_every=3,
                 state=lambda: {"marker": 7})
    assert evals == [3, 5]  # every 3 steps and after the last
    assert saves == [(2, True), (4, True), (5, False)]  # the last save before leaving is complete when the process ends
    rows = _rows(tmp_path / "a")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2]["eval/x"] == 3.0 and "time/checkpoint" in rows[1] and "time/eval" in rows[2] and rows[-1]["time/wall"] > 0

    # Resume from step 4 in a copy: the stage's state comes back, the metrics keep steps 1-4, and step 5 is
    # the uninterrupted run's step 5.
    import shutil

    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    shutil.rmtree(b / "checkpoints/step_5")
    (b / "checkpoints/latest").write_text("4\n")
    trainee = _trainee(5)
    with TrainingLoop(_cfg(b, "steps=5", "checkpoint.save_every=2"), trainee, 5, "test") as loop:
        assert loop.resume()["marker"] == 7 and loop.start_step == 4
        assert [r["step"] for r in _rows(b)] == [1, 2, 3, 4]
        loop.run(_lm_step(trainee))
    assert [r["train/loss"] for r in _rows(b)] == [r["train/loss"] for r in rows]


def test_non_finite_steps_in_a_row_save_and_halt(tmp_path):
    cfg = _cfg(tmp_path, "steps=6", "optimizer.max_nonfinite_steps=2", "checkpoint.save_every=0")
    trainee = _trainee(6)
    flags = iter([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    with pytest.raises(TrainingHalted, match="stopped at step 5: 2 steps in a row"):
        with TrainingLoop(cfg, trainee, 6, "test") as loop:
            loop.resume()
            loop.run(lambda i: StepResult({"x": float(i)}, nonfinite=next(flags)))
    assert ckpt.latest_step(tmp_path / "checkpoints") == 5


def test_a_fresh_start_begins_an_empty_metrics_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 9, "old": 1.0}) + "\n")
    cfg = _cfg(tmp_path, "steps=1", "checkpoint.save_every=0", "checkpoint.resume=false")
    trainee = _trainee(1)
    with TrainingLoop(cfg, trainee, 1, "test") as loop:
        loop.resume()
        loop.run(lambda i: StepResult({"x": 1.0}))
    assert [r["step"] for r in _rows(tmp_path)] == [1]


def test_run_outside_the_context_is_refused(tmp_path):
    loop = TrainingLoop(_cfg(tmp_path), _trainee(1), 1, "test")
    with pytest.raises(RuntimeError, match="inside `with TrainingLoop"):
        loop.run(lambda i: StepResult({}))
