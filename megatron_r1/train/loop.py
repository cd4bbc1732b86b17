"""The one training loop: what every training stage needs, written once.

A stage (GRPO, SFT, the reward model, pretraining) supplies its data and one function that runs a
step; the loop owns everything around it, the same way for every stage:

* the model: built from a Hugging Face directory (`build_from_hf`), with its DDP wrapper, optimizer and
  learning-rate schedule;
* resume: the latest verified checkpoint in `<run_dir>/checkpoints` (the stage's own state rides in
  the checkpoint's extra state), and one metrics-file policy: a fresh start begins an empty
  `metrics.jsonl`, a resume keeps the rows up to the checkpoint's step (each step once);
* preemption: inside `with TrainingLoop(...)` SIGUSR1/SIGTERM finish the step, save it and raise
  `Preempted` (exit status 75, requeued by the Slurm scripts);
* guards: `optimizer.max_nonfinite_steps` skipped updates in a row, or rewards failing above
  `reward.max_failure_rate` for `reward.failure_patience` steps, save the last good state and raise
  `TrainingHalted`;
* cadence: held-out evaluation every `eval_every` steps and at the end, checkpoints every
  `checkpoint.save_every` steps and at the end (asynchronous when `checkpoint.async_save`, except the
  last save before the process leaves);
* the progress bar, per-phase timing (`time/<phase>`), wall time across restarts, and the finish:
  the Hugging Face export, `summary.json` and `plot.png`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_r1 import distributed
from megatron_r1.config import ConfigError, StageConfig
from megatron_r1.models.build import build_model
from megatron_r1.models.hf.base import load_hf, read_hf_config, save_hf
from megatron_r1.models.reward_model import build_reward_model, reward_model_config
from megatron_r1.train import checkpoint as ckpt
from megatron_r1.train.guards import RunGuard, TrainingHalted
from megatron_r1.train.metrics import MetricsLogger, PhaseTimer
from megatron_r1.train.moe_routing import RouterHealth
from megatron_r1.train.optim import build_optimizer
from megatron_r1.train.preemption import Preempted, PreemptionWatch

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Trainee:
    """A Megatron model and everything that updates it."""

    model_cfg: Any  # ModelConfig
    model: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: Any
    scheduler: Any
    hf_dir: Path | None = None  # where it was loaded from (its tokenizer goes with the export)
    head: str = "lm"  # "lm" (causal LM) or "value" (reward model: exported as a sequence classifier)


# The fields that make two models different models (what `plan` sizes and the run must train).
ARCHITECTURE_FIELDS = ("arch", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                       "multi_latent_attention", "num_experts", "moe_ffn_hidden_size")


def model_config_from_hf(cfg: StageConfig, hf_dir: Path):
    """The architecture of `hf_dir` with this stage's precision settings. A `model:` section the
    config sets must describe the same model (it is what `megatron-r1 plan` sizes): ConfigError otherwise."""
    model_cfg = read_hf_config(hf_dir)
    if "model" in getattr(cfg, "given_sections", ()):
        differ = [f for f in ARCHITECTURE_FIELDS if getattr(cfg.model, f) != getattr(model_cfg, f)]
        if differ:
            ours = ", ".join(f"{f}={getattr(cfg.model, f)}" for f in differ)
            theirs = ", ".join(f"{f}={getattr(model_cfg, f)}" for f in differ)
            raise ConfigError(f"the model: section ({ours}) is not the model in checkpoint.load_hf={hf_dir} ({theirs}); "
                              "the weights come from checkpoint.load_hf: point it at the model you mean, or make model: match it")
    return dataclasses.replace(model_cfg, params_dtype=cfg.model.params_dtype, fp8_recipe=cfg.model.fp8_recipe)


def build_from_hf(cfg: StageConfig, hf_dir: Path, total_steps: int, head: str = "lm") -> Trainee:
    """The Megatron model of `hf_dir` in this stage's layout, its weights loaded, with optimizer and
    schedule over `total_steps`. `head="value"`: the reward model (the decoder of `hf_dir`, a new
    scalar head)."""
    model_cfg = model_config_from_hf(cfg, hf_dir)
    if head == "value":
        model_cfg = reward_model_config(model_cfg)
        model = build_reward_model(model_cfg, cfg.parallel)
        load_hf(model, model_cfg, hf_dir, head="none")
    else:
        model = build_model(model_cfg, cfg.parallel, cfg.memory)
        load_hf(model, model_cfg, hf_dir)
    ddp, optimizer, scheduler = build_optimizer(model, cfg.optimizer, cfg.parallel, total_steps, cfg.memory)
    return Trainee(model_cfg, model, ddp, optimizer, scheduler, hf_dir, head)


@dataclasses.dataclass
class StepResult:
    """What a stage's step function returns to the loop."""

    row: dict[str, float]  # the step's metrics (the loop adds eval, time/* and time/wall)
    nonfinite: float = 0.0  # > 0: the update was skipped for an inf/nan loss or gradient (train_step's "nonfinite")
    reward_failures: float = 0.0  # sequences whose reward raised (scored 0)
    sequences: int = 0  # sequences the failures are a share of
    postfix: dict[str, str] = dataclasses.field(default_factory=dict)  # the progress bar's fields


class TrainingLoop:
    """Runs a stage's steps with resume, preemption, guards, evaluation, checkpoints and metrics.

    Use as a context manager around everything the stage does after building its model: a signal
    that arrives during set-up or evaluation is noted and honoured at the next step boundary.
    """

    def __init__(self, cfg: StageConfig, trainee: Trainee, total_steps: int, desc: str) -> None:
        ckpt.require_async_support(cfg.checkpoint.async_save)
        self.cfg = cfg
        self.trainee = trainee
        self.total_steps = total_steps
        self.desc = desc
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.main = distributed.is_main()
        self.metrics = MetricsLogger(self.run_dir, enabled=self.main, tensorboard=cfg.logging.tensorboard)
        self.timer = PhaseTimer()
        self.guard = RunGuard(cfg.optimizer.max_nonfinite_steps, cfg.reward.max_failure_rate, cfg.reward.failure_patience)
        self.start_step = 0
        self._prior_wall = 0.0
        self._wall_start = time.perf_counter()
        self._watch: PreemptionWatch | None = None
        # MoE models: expert load, router bias and routing agreement in every step's row (train/moe_routing.py).
        self.routers = RouterHealth(trainee.ddp)
        if self.routers.active:
            config = trainee.model.config
            config.finalize_model_grads_func = self.routers.wrap_finalize(config.finalize_model_grads_func)

    # -- context: preemption signals are noted from here on ---------------------------------

    def __enter__(self) -> TrainingLoop:
        self._watch = PreemptionWatch()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.metrics.close()
        if self._watch is not None:
            self._watch.__exit__(exc_type, exc, tb)

    # -- resume ------------------------------------------------------------------------------

    def resume(self) -> dict | None:
        """Load the latest checkpoint (weights, optimizer, schedule, RNG) when `checkpoint.resume` and
        one exists: returns the stage's extra state saved with it, or None on a fresh start. Either way
        `metrics.jsonl` is made to hold exactly the steps before the start."""
        latest = ckpt.resume_step(self.ckpt_dir, self.cfg.checkpoint.verify) if self.cfg.checkpoint.resume else None
        if latest is None:
            self.metrics.truncate_after(-1)  # a fresh run starts a fresh file
            return None
        t = self.trainee
        extra = ckpt.load_checkpoint(self.ckpt_dir, latest, t.ddp, t.optimizer, t.scheduler)
        self.start_step, self._prior_wall = latest, extra.get("wall_seconds", 0.0)
        self._wall_start = time.perf_counter()
        self.metrics.truncate_after(latest)
        if self.main:
            log.info("resumed from %s at step %d of %d", self.ckpt_dir, latest, self.total_steps)
        return extra

    def wall(self) -> float:
        """Seconds of this stage so far, across restarts."""
        return self._prior_wall + time.perf_counter() - self._wall_start

    # -- the steps ---------------------------------------------------------------------------

    def run(
        self,
        step: Callable[[int], StepResult],
        *,
        evaluate: Callable[[int], dict[str, float]] | None = None,
        eval_every: int = 0,
        state: Callable[[], dict] = dict,
        resident: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        """Steps `start_step .. total_steps - 1`. `step(i)` runs step i (0-based) and returns its
        metrics; `evaluate(done)` gives held-out metrics after `done` steps (every `eval_every` steps
        and after the last); `state()` is the stage's extra state saved with each checkpoint;
        `resident()` is a context in which the trainer's state is on its device (GRPO moves it out
        while the engine generates: a checkpoint is saved inside it)."""
        if self._watch is None:
            raise RuntimeError("TrainingLoop.run must be called inside `with TrainingLoop(...) as loop:`")
        cfg = self.cfg
        bar = tqdm(range(self.start_step, self.total_steps), initial=self.start_step, total=self.total_steps, desc=self.desc,
                   disable=not (self.main and cfg.logging.progress_bar), dynamic_ncols=True)
        self.timer = PhaseTimer()  # set-up and the initial evaluation are not step time
        for i in bar:
            ckpt.finish_pending_saves()  # an asynchronous save written in the background: rename it now
            self.routers.begin_step()
            with self.routers.comparing():
                out = step(i)
            done = i + 1
            last = done == self.total_steps
            row = {**out.row, **self.routers.metrics()}
            if evaluate is not None and (eval_every and done % eval_every == 0 or last):
                with self.timer("eval"):
                    row.update(evaluate(done))
            stop = self._watch.stop_requested(done)  # a signal reached some rank: save this step, then exit
            halt = self.guard.update(out.nonfinite, out.reward_failures, out.sequences)
            leaving = bool(stop or halt or last)
            if leaving or cfg.checkpoint.save_every and done % cfg.checkpoint.save_every == 0:
                with self.timer("checkpoint"), resident():
                    self.save(done, state(), final=leaving)
            row.update(self.timer.finish())
            row["time/wall"] = self.wall()
            self.metrics.log(done, row)
            if out.postfix:
                bar.set_postfix(**out.postfix)
            if stop:
                bar.close()
                raise Preempted(f"step {done} of {self.total_steps} is saved in {self.ckpt_dir}; rerun the same command to resume")
            if halt:
                bar.close()
                raise TrainingHalted(f"stopped at step {done}: {halt}; the last good state is saved in {self.ckpt_dir}")
        bar.close()

    def save(self, step: int, extra: dict, final: bool = False) -> None:
        """A checkpoint of `step` with the stage's `extra` state (plus wall time and what rebuilds the
        model). `final`: the process leaves after it, so it is written synchronously."""
        t, c = self.trainee, self.cfg.checkpoint
        extra = {**extra, "wall_seconds": self.wall(), "model_info": ckpt.model_info(t.model_cfg, t.hf_dir)}
        ckpt.save_checkpoint(self.ckpt_dir, step, t.ddp, t.optimizer, t.scheduler, extra,
                             keep_last=c.keep_last, verify=c.verify, async_save=c.async_save and not final)

    # -- the finish --------------------------------------------------------------------------

    def export_hf(self) -> Path | None:
        """The trained model as a Hugging Face directory `<run_dir>/hf` (collective), when
        `checkpoint.export_hf`."""
        if not self.cfg.checkpoint.export_hf:
            return None
        t = self.trainee
        out = self.run_dir / "hf"
        save_hf(t.model, t.model_cfg, out, tokenizer_dir=t.hf_dir, head="score" if t.head == "value" else "lm")
        return out

    def write_summary(self, summary: dict, plot: Callable[[Path], None] | None = None) -> None:
        """`summary.json` (and `plot.png` from `plot(run_dir)`), on the main rank."""
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if plot is not None:
            plot(self.run_dir)
