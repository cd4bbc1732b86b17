"""The rollout ranks of a disaggregated GRPO job: generate, score, evaluate; never train, never sleep.

The trainer (`stages/rl.py`) and these ranks follow one `AsyncSchedule`:

    for step i:  receive the versions a batch of step i may not be sampled without (<= i - k),
                 evaluating each one an evaluation asks for; sample and score batch i with the
                 newest version held; post it (with the version, the sampler's state after it and
                 the parity probe of the weights that sampled it)

so with `async.max_staleness: k >= 1` batch i+1..i+k is being sampled while the trainer updates on
batch i. Each weight version is checked with the parity probe on arrival: the trainer sends its own
logprobs of the probe batch after the weights, these ranks score the same batch with the engine.

Everything on this side is SPMD over the rollout ranks' own world (vLLM's external launcher over
those ranks, as in the colocated run); the first rollout rank posts what the trainer reads.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from megatron_r1 import heartbeat, platform
from megatron_r1.config import StageConfig
from megatron_r1.data.prompts import MixedSampler, load_prompts
from megatron_r1.data.tokenizer import load_tokenizer
from megatron_r1.placement import Disaggregated
from megatron_r1.rewards.reward_fn import RewardFn
from megatron_r1.rollout.bridge import AsyncSchedule, Bridge, RemoteFailure
from megatron_r1.rollout.collect import collect_rollouts
from megatron_r1.rollout.evaluation import evaluate
from megatron_r1.rollout.vllm_engine import VLLMEngine
from megatron_r1.rollout.weight_sync import ParityProbe, probe_thresholds
from megatron_r1.train.preemption import Preempted, PreemptionWatch

log = logging.getLogger(__name__)


def schedule_of(cfg: StageConfig) -> AsyncSchedule:
    return AsyncSchedule(cfg.steps, cfg.async_.max_staleness, cfg.logging.eval_every)


def serve(cfg: StageConfig, job: Disaggregated) -> dict:
    """Run this rollout rank until the trainer ends the run; returns {} (the trainer writes the summary)."""
    platform.setup()
    heartbeat.start(cfg.parallel.heartbeat_timeout_s, job)
    bridge = Bridge(job, cfg.parallel.timeout_minutes * 60)
    # Preemption is the trainer's decision (it saves); here a signal must only not kill the engine.
    with PreemptionWatch():
        try:
            _RolloutSide(cfg, bridge).run()
        except RemoteFailure:
            status = bridge.finished()  # the trainer ended the run while this side waited
            if status is None or status["status"] not in (0, 75):
                raise
            if status["status"] == 75:
                raise Preempted(status["message"]) from None
        except Preempted:
            raise
        except BaseException as e:
            bridge.fail(f"rollout rank {job.role.job_rank} failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            raise
    return {}


class _RolloutSide:
    def __init__(self, cfg: StageConfig, bridge: Bridge) -> None:
        self.cfg, self.bridge = cfg, bridge
        self.main = bridge.role.side_rank == 0
        self.schedule = schedule_of(cfg)
        self.version = 0  # the policy version the engines hold
        self.wait_s = 0.0  # waiting for weights since the last posted batch
        self.probe_stats: dict[str, float] = {}

    def run(self) -> None:
        cfg, bridge = self.cfg, self.bridge
        hf_dir = Path(bridge.get("hf_dir", "the base model (the trainer prepares it)"))
        self.tokenizer = load_tokenizer(hf_dir)
        train_set = load_prompts(cfg.data, "train", self.tokenizer)
        self.eval_set = load_prompts(cfg.data, "eval", self.tokenizer)
        self.sampler = MixedSampler(train_set, None, cfg.grpo.prompts_per_step, 0.0, seed=cfg.seed)
        self.reward_fn = RewardFn(cfg.reward)
        self.engine = VLLMEngine(cfg.rollout, str(hf_dir), return_routing=cfg.grpo.routing_replay == "r3")
        self.probe = self._make_probe()
        if self.main:
            bridge.put("hello", {"layout": self.engine.layout.as_dict(), "eval_size": len(self.eval_set.items),
                                 "probe_sequences": self.probe.sequences() if self.probe else None})
        start = bridge.get("start", "the trainer's start (it builds and resumes the policy)")
        if start["sampler"] is not None:
            self.sampler.load_state_dict(start["sampler"])
        self.version = start["version"]
        if start["send_weights"]:
            self._receive(self.version)
        if start["evaluate_base"]:
            self._evaluate(0)
        for i in range(start["generate_from"], cfg.steps):
            self._receive_versions_before(i)
            bridge.raise_if_ended(f"batch {i}")
            self._post_batch(i)
        self._receive_versions_before(cfg.steps)  # the evaluations still to come
        status = self._wait_for_finish()
        self.engine.shutdown()
        if status["status"] == 75:
            raise Preempted(status["message"])

    def _make_probe(self) -> ParityProbe | None:
        cfg = self.cfg
        if not cfg.rollout.probe_every:
            return None
        prompts = [p.prompt_ids for p in self.eval_set.items[: cfg.rollout.probe_prompts]]
        mean, worst = probe_thresholds(cfg.rollout, self.engine.dtype)
        probe = ParityProbe(self.engine, lambda sequences: self._trainer_logprobs, prompts, mean, worst)
        probe.sequences()  # generated with the base weights, as the colocated run does
        return probe

    def _receive_versions_before(self, step: int) -> None:
        for version in self.schedule.versions_before(step, self.version):
            self._receive(version)
            if self.schedule.is_eval(version):
                self._evaluate(version)

    def _receive(self, version: int) -> None:
        start = time.perf_counter()
        stream, tail = self.bridge.receive_weights(version)
        self.engine.load_weights(stream)  # one reload over the whole stream (see VLLMEngine.load_weights)
        self.version = version
        self.wait_s += time.perf_counter() - start
        self._trainer_logprobs = tail["after"]
        if self.probe is not None and self._trainer_logprobs is not None:
            self.probe_stats = self.probe.check()  # raises WeightSyncError when the engine disagrees

    def _evaluate(self, version: int) -> None:
        cfg = self.cfg
        result = evaluate(self.engine, self.tokenizer, self.eval_set.items, self.reward_fn, cfg.rollout.max_response_tokens,
                          cfg.logging.eval_samples, cfg.rollout.temperature, seed=cfg.seed + version, stop=cfg.rollout.stop)
        if self.main:
            self.bridge.put(f"eval/{version}", result)

    def _post_batch(self, step: int) -> None:
        start = time.perf_counter()
        rollout = collect_rollouts(self.cfg, self.engine, self.tokenizer, self.sampler, self.reward_fn, step)
        for sample in rollout.samples:
            sample.version = self.version
        if self.main:
            self.bridge.put(f"batch/{step}", {
                "rollout": rollout, "version": self.version, "sampler": self.sampler.state_dict(),
                "probe": self.probe_stats, "rollout_wait_s": self.wait_s, "rollout_s": time.perf_counter() - start,
            })
        self.wait_s, self.probe_stats = 0.0, {}

    def _wait_for_finish(self) -> dict:
        start = time.perf_counter()
        while (status := self.bridge.finished()) is None:
            self.bridge.raise_if_ended("the end of the run")
            if time.perf_counter() - start > self.bridge.timeout_s:
                raise TimeoutError("the trainer did not end the run within parallel.timeout_minutes after the last batch")
            time.sleep(self.bridge.poll_s * 5)
        if self.main:
            log.info("rollout side done: %s", status["message"])
        return status
