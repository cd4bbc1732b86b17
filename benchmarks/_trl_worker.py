"""One Hugging Face TRL `GRPOTrainer` run for `benchmarks/peer_trl.py`, in a process of its own.

    .venv/bin/python benchmarks/_trl_worker.py --model DIR --out DIR --generation vllm|transformers \
        [--save] [--length-plan SEED] conf/stages/r1_zero_tiny.yaml key=value ...

The stage config and overrides are the ones megatron-r1 gets on its command line, and every setting
of the run is read from them: prompts (same reasoning-gym task, seeds and template, fed in the order
megatron-r1's sampler draws them), reward (the project's `RewardFn`: accuracy + 0.1 x strict
format), group size, response length, learning rate and schedule, clipping, loss aggregation, batch
split and steps. Writes OUT/result.json (seconds of every optimizer step; seconds of generation,
weight sync, reward and log-prob pass, and rollout tokens, per step; TRL's own log) and, with
--save, the final policy to OUT/hf.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
import types
from pathlib import Path

# vLLM's CPU build sizes its KV cache from this; 1 GiB is what megatron-r1's engine gets
# (rollout.cpu_kvcache_space_gb), so both engines run with the same cache.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from megatron_r1.config import load_config  # noqa: E402
from megatron_r1.data.prompts import MixedSampler, load_prompts  # noqa: E402
from megatron_r1.data.tokenizer import load_tokenizer  # noqa: E402
from megatron_r1.rewards.reward_fn import RewardFn  # noqa: E402


def grpo_config(cfg, out: Path, use_vllm: bool) -> GRPOConfig:
    """TRL's settings for the stage `cfg`: the same algorithm megatron-r1 runs, field by field."""
    g, opt, r = cfg.grpo, cfg.optimizer, cfg.rollout
    if opt.lr_decay_style != "constant" or opt.lr_warmup_steps or g.loss_agg != "token-mean" or g.updates_per_rollout != 1:
        sys.exit("peer_trl compares the constant-lr, token-mean, one-update-per-rollout GRPO of r1_zero_tiny.yaml only")
    sequences = g.prompts_per_step * r.n_samples_per_prompt
    micro = min(g.micro_batch_size, sequences)
    if sequences % micro:
        sys.exit(f"{sequences} sequences per step do not split into micro-batches of {micro}")
    return GRPOConfig(
        output_dir=str(out / "trainer"),
        seed=cfg.seed,
        max_steps=cfg.steps,
        # One optimizer step per rollout batch, accumulated over micro-batches as megatron-r1 does.
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=sequences // micro,
        num_generations=r.n_samples_per_prompt,
        max_completion_length=r.max_response_tokens,
        # rollout.min_response_tokens: no stop before that many tokens (vLLM's min_tokens; transformers' min_new_tokens).
        generation_kwargs=({"min_tokens" if use_vllm else "min_new_tokens": r.min_response_tokens} if r.min_response_tokens else None),
        temperature=r.temperature,
        top_p=r.top_p,
        learning_rate=opt.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_epsilon=opt.adam_eps,
        max_grad_norm=opt.clip_grad,
        beta=g.kl_beta,  # 0: no reference model, as in megatron-r1
        epsilon=g.clip_eps_low,
        epsilon_high=g.clip_eps_high,
        loss_type="dapo",  # token-level mean over the whole accumulated batch = megatron-r1's token-mean
        scale_rewards="group" if g.scale_advantages_by_std else "none",
        num_iterations=g.updates_per_rollout,
        # The engine/trainer mismatch correction megatron-r1 uses: token-level truncated IS at the same cap.
        vllm_importance_sampling_correction=use_vllm and g.mismatch_correction != "none",
        vllm_importance_sampling_mode="token_truncate",
        vllm_importance_sampling_clip_max=g.mismatch_max,
        use_vllm=use_vllm,
        vllm_mode="colocate",
        vllm_max_model_length=r.max_model_len,
        # fp32 weights and no activation recomputation, as megatron-r1 trains the tiny models on CPU.
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        shuffle_dataset=False,  # the dataset is already in megatron-r1's sampling order
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def train_dataset(cfg, tokenizer) -> tuple[Dataset, list]:
    """The prompts of every step, in the order megatron-r1's sampler draws them for the same seed."""
    prompts = load_prompts(cfg.data, "train", tokenizer)
    sampler = MixedSampler(prompts, None, cfg.grpo.prompts_per_step, 0.0, seed=cfg.seed)
    drawn = [item for _ in range(cfg.steps) for item in sampler.next_batch()]
    rows = [{"prompt": item.prompt, "row": i} for i, item in enumerate(drawn)]
    return Dataset.from_list(rows), drawn


class StepClock(TrainerCallback):
    """Wall seconds of every optimizer step: from the end of one to the end of the next (the first
    from the start of training), so generation, reward, update and weight sync are all inside."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.seconds.append(now - self._last)
        self._last = now


class Phases:
    """Rows (phase, step, value): seconds of timed calls, or rollout tokens. `step` is TRL's
    `state.global_step` when the call began, i.e. 0 throughout the first optimizer step."""

    def __init__(self) -> None:
        self.trainer = None  # set once built: calls read its step
        self.rows: list[tuple[str, int, float]] = []

    def add(self, phase: str, value: float) -> None:
        self.rows.append((phase, self.trainer.state.global_step, value))

    def timed(self, phase: str, fn, when=lambda: True):
        """`fn`, timed as `phase` on the calls for which `when()` holds."""

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if not when():
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - start)

        return call


def r1_zero_reward(cfg, tokenizer, drawn: list, phases: Phases):
    """The project's reward on TRL's completions. TRL hands rewards text decoded without special
    tokens, which would drop <think>/<answer> (special tokens of the tiny tokenizer): decode the ids
    here exactly as megatron-r1's rollout does."""
    reward_fn = RewardFn(cfg.reward)

    def r1_zero_reward(prompts, completions, completion_ids, row, **_):  # TRL names its metrics after it
        phases.add("rollout_tokens", sum(len(ids) for ids in completion_ids))
        texts = [tokenizer.decode(ids, skip_special_tokens=False).replace(tokenizer.eos_token, "") for ids in completion_ids]
        return reward_fn(prompts, texts, [drawn[i].as_reward_item() for i in row]).total.tolist()

    return phases.timed("reward", r1_zero_reward)


def vllm_on_cpu_at_our_dtype(dtype: str) -> None:
    """TRL 1.16 + vLLM 0.32's CPU build, made to run: two adapters applied from outside TRL's code.

    * dtype: TRL's colocate mode builds `vllm.LLM(...)` with no dtype and GRPOConfig has no field for one;
      vLLM's "auto" turns an fp32 checkpoint into bf16. The name `LLM` in TRL's module is bound to vLLM's
      class with our `rollout.dtype`, so both trainers' engines run the same precision.
    * weight sync: TRL loads one parameter per `model.load_weights` call into the live model, but vLLM's
      CPU linear layers swapped their weights for plain empty Parameters after the first load (the packed
      GEMM copy lives in `layer.cpu_linear`), so TRL's sync fails with "'Parameter' object has no
      attribute 'weight_loader'" (`bind_weight_sync` below replaces it with vLLM's supported path)."""
    import vllm
    import trl.generation.vllm_generation as trl_vllm

    trl_vllm.LLM = functools.partial(vllm.LLM, dtype=dtype)


def bind_weight_sync(engine) -> None:
    """TRL's `sync_weights` as vLLM 0.32 supports it on CPU: every parameter in one `reload_weights` call
    (which rebuilds fused layers and re-packs the CPU GEMMs), then the tied LM head re-packed (the reload
    gives it no tensor of its own, so it would keep the old embedding) — the same two calls megatron-r1's
    engine makes (`rollout.vllm_engine.VllmEngine.load_weights`). TRL's own parameter naming is kept."""
    from megatron_r1.rollout.vllm_engine import _refresh_cpu_kernels

    def sync_weights(self):
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._iter_named_params()})
        self.llm.collective_rpc(_refresh_cpu_kernels)
        self.llm.reset_prefix_cache()

    engine.sync_weights = types.MethodType(sync_weights, engine)


def time_phases(trainer: GRPOTrainer, phases: Phases) -> None:
    """Time generation (the call itself, as megatron-r1's rollout time is), the weight sync into
    vLLM, and the extra no-grad log-prob pass TRL makes for importance sampling against vLLM."""
    phases.trainer = trainer
    if trainer.use_vllm:
        engine = trainer.vllm_generation
        if not torch.cuda.is_available():
            bind_weight_sync(engine)
        engine.generate = phases.timed("generation", engine.generate)
        engine.sync_weights = phases.timed("sync", engine.sync_weights)
    else:
        trainer.model.generate = phases.timed("generation", trainer.model.generate)
    trainer._get_per_token_logps_and_entropies = phases.timed(
        "logprob_pass", trainer._get_per_token_logps_and_entropies, when=lambda: not torch.is_grad_enabled()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face base model directory (with the tokenizer)")
    parser.add_argument("--out", required=True, help="directory for result.json (and hf/ with --save)")
    parser.add_argument("--generation", choices=["vllm", "transformers"], required=True,
                        help="vllm: TRL's colocated vLLM engine; transformers: TRL's default model.generate")
    parser.add_argument("--save", action="store_true", help="save the final policy to OUT/hf")
    parser.add_argument("--length-plan", type=int, metavar="SEED",
                        help="vLLM generates every sampled response at the length benchmarks/length_plan.py draws with SEED")
    parser.add_argument("stage", help="stage YAML, then its overrides (as megatron-r1 takes them)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.stage, args.overrides)
    tokenizer = load_tokenizer(args.model)
    dataset, drawn = train_dataset(cfg, tokenizer)
    phases = Phases()
    clock = StepClock()
    use_vllm = args.generation == "vllm"
    if use_vllm and not torch.cuda.is_available():
        vllm_on_cpu_at_our_dtype(cfg.rollout.engine_dtype(on_gpu=False, mla=False))
    if args.length_plan is not None:
        if not use_vllm:
            sys.exit("--length-plan sets the lengths vLLM generates; it needs --generation vllm")
        from length_plan import install

        install(cfg.rollout.max_response_tokens, args.length_plan)

    start = time.perf_counter()
    trainer = GRPOTrainer(
        model=args.model,
        reward_funcs=r1_zero_reward(cfg, tokenizer, drawn, phases),
        args=grpo_config(cfg, out, use_vllm),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    setup_seconds = time.perf_counter() - start
    time_phases(trainer, phases)
    trainer.train()

    if args.save:
        trainer.save_model(str(out / "hf"))
        for name in ("tokenizer.json", "tokenizer_config.json"):  # the very tokenizer files of the base
            shutil.copyfile(Path(args.model) / name, out / "hf" / name)
    result = {
        "generation": args.generation,
        # The engine's dtype as vLLM reports it (ours on CPU: `vllm_on_cpu_at_our_dtype`).
        "engine_dtype": str(trainer.vllm_generation.llm.llm_engine.model_config.dtype) if use_vllm else str(trainer.model.dtype),
        "trainer_dtype": str(trainer.model.dtype),
        "setup_seconds": setup_seconds,
        "step_seconds": clock.seconds,
        "phases": phases.rows,
        "sequences_per_step": cfg.grpo.prompts_per_step * cfg.rollout.n_samples_per_prompt,
        "log": trainer.state.log_history,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
