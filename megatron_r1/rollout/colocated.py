"""The trainer's rollouts when every rank also hosts an engine (`placement: colocated`, SPMD).

Generation and the update take turns on the same devices: sample and score (engine awake), sleep
the engine and bring the trainer's state back (`memory.swap_during_rollout`), update, refit every
rank's own worker and probe it (`weight_sync.refit`). `RemoteRollouts` (`rollout/remote.py`) is the
same interface over the bridge to separate rollout ranks; `stages/rl.py` drives either.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from megatron_r1 import distributed
from megatron_r1.config import StageConfig
from megatron_r1.data.prompts import MixedSampler
from megatron_r1.rewards.general import GeneralReward
from megatron_r1.rollout.collect import RolloutBatch, collect_rollouts
from megatron_r1.rollout.evaluation import EvalResult, evaluate, evaluate_general
from megatron_r1.rollout.vllm_engine import VLLMEngine
from megatron_r1.rollout.weight_sync import ParityProbe, SampledCheck, WeightSync, probe_thresholds, refit
from megatron_r1.train.memory import TrainerSwap, release_fp8_weight_caches
from megatron_r1.train.step import sequence_logprobs

log = logging.getLogger(__name__)


class ColocatedRollouts:
    """This rank's engine worker, the swap that makes room for it, the refit and the probe."""

    placement = "colocated"

    def __init__(self, cfg: StageConfig, policy, reference, tokenizer, train_set, eval_set, general_set, reward_fn, loop,
                 general_eval_set=None) -> None:
        self.cfg, self.policy, self.reference, self.tokenizer = cfg, policy, reference, tokenizer
        self.eval_set, self.reward_fn, self.loop = eval_set, reward_fn, loop
        self.general_eval_set = general_eval_set  # held-out general prompts (data.general_eval_size), scored at each evaluation
        self.sampler = MixedSampler(train_set, general_set, cfg.grpo.prompts_per_step, cfg.data.general_share, seed=cfg.seed)
        self.swap = TrainerSwap(cfg.memory.swap_during_rollout, policy.ddp, policy.optimizer, reference)
        self.swap.offload_state()  # the engine claims its share of the device when it starts
        self.swap.offload_weights()
        self.engine = VLLMEngine(cfg.rollout, str(policy.hf_dir), return_routing=cfg.grpo.routing_replay == "r3")  # one worker on every rank
        self.syncer = WeightSync(self.engine, cfg.rollout.sync_bucket_mb)
        self.general = GeneralReward(cfg, self.engine, tokenizer) if general_set is not None else None
        if self.general is not None and distributed.is_main():
            log.info("general prompts: %d, %d per step, rewarded by the %s (weight %g); %d held out for evaluation", len(general_set.items),
                     self.sampler.general.batch_size, self.general.kind.replace("_", " "), self.general.weight,
                     len(general_eval_set.items) if general_eval_set is not None else 0)
        self.probe = self._make_probe()
        self.sampled_check = SampledCheck(probe_thresholds(cfg.rollout, self.engine.dtype)[0], probing=self.probe is not None)
        self.num_engines = self.engine.layout.num_engines

    @property
    def timer(self):
        return self.loop.timer  # the loop starts a fresh timer when the steps begin

    def describe(self) -> str:
        return self.engine.layout.describe()

    def layout(self) -> dict:
        return {"placement": self.placement, **self.engine.layout.as_dict()}

    def _make_probe(self) -> ParityProbe | None:
        """The logprob parity probe: a fixed batch scored by every engine and by the trainer after the first
        sync and every `rollout.probe_every`-th (`weight_sync.probe_due`)."""
        cfg = self.cfg
        if not cfg.rollout.probe_every:
            return None
        prompts = [p.prompt_ids for p in self.eval_set.items[: cfg.rollout.probe_prompts]]

        def trainer_logprobs(sequences):
            lp = sequence_logprobs(self.policy.model, sequences, self.tokenizer.pad_token_id, cfg.grpo.micro_batch_size)
            release_fp8_weight_caches(self.policy.model)  # the engine is awake: this forward's FP8 caches must not stay
            return lp

        mean_threshold, max_threshold = probe_thresholds(cfg.rollout, self.engine.dtype)
        probe = ParityProbe(self.engine, trainer_logprobs, prompts, mean_threshold, max_threshold)
        probe.sequences()  # generated now, while the engine is awake: later checks find its KV cache asleep
        return probe

    # -- the run ---------------------------------------------------------------------------------

    def start(self, saved: dict | None, weights_changed: bool, evaluate_base: bool, step: int) -> None:
        """Resume the sampler; bring the engines to the policy when it is not the checkpoint they loaded."""
        if saved is not None:
            self.sampler.load_state_dict(saved["sampler"])
        if weights_changed:
            self.engine.sleep()
            self.publish(0)

    def evaluate(self, step: int) -> EvalResult:
        cfg = self.cfg
        result = evaluate(self.engine, self.tokenizer, self.eval_set.items, self.reward_fn, cfg.rollout.max_response_tokens,
                          cfg.logging.eval_samples, cfg.rollout.temperature, seed=cfg.seed + step, stop=cfg.rollout.stop)
        if self.general is not None and self.general_eval_set is not None:
            result.general = evaluate_general(self.engine, self.tokenizer, self.general_eval_set.items, self.general, self.reward_fn,
                                              cfg.rollout.max_response_tokens, stop=cfg.rollout.stop)
        return result

    def batch(self, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        """Each engine its share of the prompts; whole groups on every rank."""
        rollout = collect_rollouts(self.cfg, self.engine, self.tokenizer, self.sampler, self.reward_fn, step, self.general)
        for phase, seconds in rollout.seconds.items():
            self.timer.seconds[phase] += seconds
        return rollout, {}

    def before_update(self) -> None:
        """The engine's device memory goes to the trainer."""
        self.engine.sleep()
        with self.timer("swap"):
            self.swap.restore()

    def check_sampled(self, train: dict, step: int) -> None:
        """The update just scored this step's batch with the weights that sampled it: the parity check on
        every step, for nothing (`weight_sync.SampledCheck`: a gap has this step's refit probed)."""
        self.sampled_check.after_update(train, step)

    def publish(self, version: int, probe_every: int | None = None) -> dict[str, float]:
        """Every rank refits its own worker (the trainer's state leaves the device), then the parity probe."""
        if probe_every is None:
            probe_every = self.sampled_check.probe_every(version, self.cfg.rollout.probe_every)
        return refit(self.engine, self.policy.model, self.policy.model_cfg, self.syncer, self.probe, version, probe_every,
                     self.reference, self.swap, self.timer)

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        """A checkpoint between rollouts: the engine sleeps while the trainer's state is back, then
        is refit (sleep level 2 drops its weights)."""
        if not self.swap.swapped:
            yield
            return
        self.engine.sleep()
        with self.timer("swap"):
            self.swap.restore()
        yield
        self.publish(0, probe_every=0)

    def state(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def close(self, status: int = 0, message: str = "") -> None:
        """The engine goes; the trainer's state comes back (the export reads the weights)."""
        if status:
            return
        self.engine.shutdown()
        self.swap.restore()
