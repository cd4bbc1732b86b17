"""The trainer's rollouts when they come from separate rollout ranks (`placement: disaggregated`).

The same interface as `ColocatedRollouts`, over the bridge (`rollout/bridge.py`) to the rollout ranks
(`rollout/serve.py`): a step's batch is read from the store (posted there by the rollout side, which
may already be sampling the next one), and after the update the new weights are broadcast to the
engines when the schedule says a later batch or an evaluation needs them. The trainer never holds an
engine and never swaps.

Bounded staleness: batch `i` was sampled with version `i - k` (`async.max_staleness: k`) while the
trainer updated on the batches before it. The loss needs nothing new for that: with one update per
rollout the PPO ratio's "old" policy is the current one, and the engine's own logprobs of the sampled
tokens (`grpo.mismatch_correction`: TIS/MIS) reweight for everything between the sampling policy and
it: the kernels, and now the k updates in between.

Checkpoints: a checkpoint at step `s` also holds the batches `s .. s+k-1` the rollout side has
already sampled (with weights no checkpoint keeps) and the sampler's state after them, so a resumed
run trains on exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from megatron_r1.config import StageConfig
from megatron_r1.models.hf.base import export_hf_tensors
from megatron_r1.rollout.bridge import Bridge, pack, unpack
from megatron_r1.rollout.collect import RolloutBatch
from megatron_r1.rollout.evaluation import EvalResult
from megatron_r1.rollout.layout import EngineLayout
from megatron_r1.rollout.serve import schedule_of
from megatron_r1.rollout.weight_sync import MB, probe_due
from megatron_r1.train.step import sequence_logprobs

log = logging.getLogger(__name__)


class RemoteRollouts:
    """The trainer ranks' end of the bridge."""

    placement = "disaggregated"

    def __init__(self, cfg: StageConfig, bridge: Bridge, policy, tokenizer, loop) -> None:
        self.cfg, self.bridge, self.policy, self.tokenizer, self.loop = cfg, bridge, policy, tokenizer, loop
        self.schedule = schedule_of(cfg)
        self.in_flight: dict[int, dict] = {}  # batches read ahead of their step (restored from a checkpoint)
        self.last_sampler: dict | None = None  # the sampler's state after the newest batch read
        self.next_batch = 0  # the step of the next batch to read from the store
        hello = bridge.get("hello", "the rollout ranks' engines")
        self.engine_layout = hello["layout"]
        self.num_engines = self.engine_layout["rollout_engines"]
        self.probe_sequences = hello["probe_sequences"]

    @property
    def timer(self):
        return self.loop.timer  # the loop starts a fresh timer when the steps begin

    def describe(self) -> str:
        layout = EngineLayout(self.engine_layout["world_size"], 0, self.engine_layout["engine_tensor_parallel_size"],
                              self.engine_layout["engine_pipeline_parallel_size"])
        return f"{layout.describe()} apart from the trainer ({self.bridge.role.describe()}), at most {self.cfg.async_.max_staleness} step(s) stale"

    def layout(self) -> dict:
        role = self.bridge.role
        return {"placement": self.placement, **self.engine_layout, "world_size": role.job_world,
                "trainer_ranks": role.trainer_ranks, "rollout_ranks": role.rollout_ranks,
                "max_staleness": self.cfg.async_.max_staleness}

    # -- the run ---------------------------------------------------------------------------------

    def start(self, saved: dict | None, weights_changed: bool, evaluate_base: bool, step: int) -> None:
        """Tell the rollout side where the run starts: the sampler's state, the batches a checkpoint
        already holds (they are not sampled again) and whether the engines need this policy first."""
        in_flight = unpack(saved["in_flight"]) if saved and saved.get("in_flight") else []
        self.in_flight = {message["step"]: message for message in in_flight}
        self.next_batch = step + len(in_flight)
        if in_flight:
            self.last_sampler = in_flight[-1]["sampler"]
        sampler = self.last_sampler or (saved or {}).get("sampler")
        if self.bridge.role.job_rank == 0:  # trainer rank 0 speaks for the trainer
            self.bridge.put("start", {"sampler": sampler, "version": step, "send_weights": weights_changed,
                                      "evaluate_base": evaluate_base, "generate_from": self.next_batch})
        if weights_changed:
            self._send(step)

    def evaluate(self, step: int) -> EvalResult:
        with self.timer("wait"):
            return self.bridge.get(f"eval/{step}", f"the evaluation of step {step}")

    def batch(self, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        """The rollout side's batch of `step` and what it says about the overlap."""
        start = time.perf_counter()
        with self.timer("wait"):
            message = self.in_flight.pop(step, None) or self._read(step)
        waited = time.perf_counter() - start
        rollout: RolloutBatch = message["rollout"]
        staleness = [step - s.version for s in rollout.samples] or [step - message["version"]]
        row = {
            "async/staleness_mean": sum(staleness) / len(staleness),
            "async/staleness_max": float(max(staleness)),
            "async/trainer_wait_s": waited,
            "async/rollout_wait_s": message["rollout_wait_s"],
            "async/rollout_s": message["rollout_s"],
            "async/version": float(message["version"]),
            **message["probe"],
        }
        return rollout, row

    def _read(self, step: int) -> dict:
        if step != self.next_batch:
            raise RuntimeError(f"the trainer asked for batch {step}, the next one due is {self.next_batch}")
        message = self.bridge.get(f"batch/{step}", f"the rollout batch of step {step}")
        self.next_batch, self.last_sampler = step + 1, message["sampler"]
        if step >= 2 and self.bridge.role.job_rank == 0:  # every trainer rank has read it by now
            self.bridge.store.delete_key(f"batch/{step - 2}")
        return {**message, "step": step}

    def before_update(self) -> None:
        pass  # the trainer's devices are its own

    def check_sampled(self, train: dict, step: int) -> None:
        """Nothing: a batch here may come from weights a few versions old (`async.max_staleness`), so its
        engine/trainer gap is off-policy drift, not a refit fault; the rollout ranks probe every version
        they load that `rollout.probe_every` picks (`serve.py`)."""

    def publish(self, version: int) -> dict[str, float]:
        """Broadcast version `version` to the engines when a later batch or an evaluation needs it."""
        if not self.schedule.weights_needed(version):
            return {}
        with self.timer("sync"):
            return self._send(version)

    def _send(self, version: int) -> dict[str, float]:
        cfg = self.cfg
        probe = None
        if self.probe_sequences and probe_due(version, cfg.rollout.probe_every):
            probe = sequence_logprobs(self.policy.model, self.probe_sequences, self.tokenizer.pad_token_id, cfg.grpo.micro_batch_size)
        tensors = export_hf_tensors(self.policy.model, self.policy.model_cfg)
        return self.bridge.send_weights(version, tensors, max(1, int(cfg.rollout.sync_bucket_mb * MB)), after=probe)

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        yield  # nothing to bring back: the trainer never gives its memory away

    def state(self) -> dict:
        """Saved with a checkpoint after step `s`: the batches the rollout side sampled for
        `s .. s+k-1` (waited for: they need no weights the trainer has not sent) and the sampler
        after them."""
        done = self.next_batch - len(self.in_flight)  # the step the checkpoint is of
        ahead = [self.in_flight.get(s) or self._read(s) for s in range(done, done + self.cfg.async_.max_staleness) if s < self.cfg.steps]
        for message in ahead:
            self.in_flight[message["step"]] = message
        return {"sampler": self.last_sampler, "in_flight": pack(ahead)}

    def close(self, status: int = 0, message: str = "done") -> None:
        """The rollout side leaves with the trainer's status (0 done, 75 preempted)."""
        if self.bridge.role.job_rank == 0:
            self.bridge.finish(status, message)
