"""The colocated vLLM engine: generate rollouts, score sequences, sleep/wake, load new weights in memory.

SPMD colocation
---------------
Every trainer rank hosts one vLLM worker, in its own process and in the trainer's own
torch.distributed world: `vllm.LLM(..., distributed_executor_backend="external_launcher")`. vLLM
groups the workers of consecutive ranks into engines of ``engine_tensor_parallel_size x
engine_pipeline_parallel_size`` ranks and numbers the engines as its data-parallel ranks (see
`rollout.layout`); it builds its own process groups over the trainer's ranks. An engine may span
nodes (TP x PP up to the whole job), as a 671B model needs.

Every rank of an engine runs the same scheduler on the same requests with the same seed, so all of
them return the same outputs; the engines of different data-parallel ranks sample different
prompts and keep each other in step (vLLM all-reduces "work left?" over its DP group and runs dummy
batches on an engine that finished first). So every rank calls `generate` the same number of
times, each with its engine's share of the prompts.

Each GPU therefore holds one trainer rank and one vLLM worker: the engine takes
``gpu_memory_utilization`` of the device, the trainer the rest, and sleep mode hands the engine's
share back to the trainer between rollouts. After an update every rank loads new weights into its
own worker, in-process (`load_weights`, driven by `rollout.weight_sync`).

On CPU the same code runs over gloo with vLLM's CPU build.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_r1 import distributed, platform
from megatron_r1.config import ConfigError, RolloutConfig
from megatron_r1.models.hf.deepseek_v3 import check_rollout_weights

log = logging.getLogger(__name__)

GiB = 1 << 30


@dataclass
class Rollout:
    """One sampled response."""

    prompt_index: int  # index of the prompt in the `generate` call
    prompt_ids: list[int]
    response_ids: list[int]  # includes the stop token when generation stopped on one
    logprobs: list[float]  # sampled tokens' logprobs under the raw (temperature 1, untruncated) policy
    finish_reason: str  # "stop" | "length"
    # [prompt + response - 1, MoE layers, top-k] int16: the experts the engine routed each token to
    # (R3; the last sampled token never ran through the model). None unless the engine returns routing.
    routing: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# The engine.


def _hf_config(model_dir: str) -> dict:
    config = Path(model_dir) / "config.json"
    return json.loads(config.read_text()) if config.is_file() else {}


def _uses_mla(model_dir: str) -> bool:
    return _hf_config(model_dir).get("kv_lora_rank") is not None


def _is_moe(model_dir: str) -> bool:
    config = _hf_config(model_dir)
    return any(config.get(key) for key in ("n_routed_experts", "num_experts", "num_local_experts"))


def _moe_layer_numbers(model_dir: str) -> tuple[int, list[int]]:
    """(decoder layers, the MoE ones) of a DeepSeek-V3-style checkpoint, as its config lays them out."""
    config = _hf_config(model_dir)
    layers, first_dense, every = config["num_hidden_layers"], config.get("first_k_dense_replace", 0), config.get("moe_layer_freq", 1)
    return layers, [i for i in range(layers) if i >= first_dense and i % every == 0]


def engine_routing_to_layers(routed: torch.Tensor, num_layers: int, moe_layer_numbers: list[int]) -> torch.Tensor:
    """vLLM's `routed_experts` of one sequence `[T, layers, k]` -> `[T, L_moe, k]`, the model's MoE
    layers in layer order. vLLM reports either every decoder layer (dense layers as filler rows) or
    the MoE layers only; both are accepted, anything else is an error naming the sizes."""
    if routed.dim() != 3:
        raise ValueError(f"routed experts must be [tokens, layers, top-k], got shape {tuple(routed.shape)}")
    if routed.shape[1] == len(moe_layer_numbers):
        return routed
    if routed.shape[1] == num_layers:
        return routed[:, moe_layer_numbers]
    raise ValueError(
        f"the engine reported routing for {routed.shape[1]} layers; the model has {num_layers} layers, "
        f"{len(moe_layer_numbers)} of them MoE"
    )



def check_engine_options(cfg: RolloutConfig, routing_replay: str = "none", on_gpu: bool | None = None) -> None:
    """What only a GPU engine can do, refused in one line before anything loads."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if cfg.quantization == "fp8" and not on_gpu:
        raise ConfigError("rollout.quantization=fp8 runs on GPU engines only (vLLM's CPU FP8 kernels need AMX, and the planner "
                          "sizes GPU engines); set rollout.quantization=none here")
    if routing_replay == "r3" and not on_gpu:
        raise ConfigError("grpo.routing_replay=r3 needs the engine's routed experts, which vLLM returns only from Model Runner V2 "
                          "(VLLM_USE_V2_MODEL_RUNNER=1, Triton: GPU only); use grpo.routing_replay=r2 or none on CPU")


def _refresh_cpu_kernels(worker) -> dict[str, int]:
    """Runs inside vLLM's worker after `reload_weights` on CPU: rebuild the kernel state that
    vLLM 0.32's reload leaves stale there. Returns how many modules of each kind were refreshed.

    * CPU GEMMs keep a packed copy of their weight (`cpu_linear`). A tied LM head shares the
      embedding's weight but receives no tensor of its own, so reload never re-processes it and it
      would go on computing logits with the old embedding.
    * Unquantized MoE experts are packed for the CPU grouped GEMM only on the first load; a reload
      leaves the new weights unpacked, so the experts would compute with scrambled weights.
    """
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    modules = list(worker.get_model().modules())
    embeddings = {id(m.weight) for m in modules if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}
    refreshed = {"tied_lm_heads": 0, "moe": 0}
    for module in modules:
        method = getattr(module, "quant_method", None)
        if isinstance(module, ParallelLMHead) and id(module.weight) in embeddings:
            method.process_weights_after_loading(module)  # re-packs from the (shared) current weight
            refreshed["tied_lm_heads"] += 1
        experts = getattr(getattr(method, "moe_kernel", None), "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)
            refreshed["moe"] += 1
    return refreshed


def _direct_refit(cfg: RolloutConfig, model_dir: str) -> bool:
    """Whether refits load straight into the live parameters (`rollout.weight_loading`): only where the
    engine keeps the weights as the checkpoint has them, up to fusing and sharding (unquantized dense
    models); quantized engines re-quantize in the reload, and MoE experts and MLA derive tensors there."""
    mode = cfg.weight_loading
    eligible = cfg.quantization == "none" and not _is_moe(model_dir) and not _uses_mla(model_dir)
    if mode == "direct" and not eligible:
        raise ConfigError("rollout.weight_loading=direct loads unquantized dense models only (quantized engines, MoE experts "
                          "and MLA rebuild tensors in vLLM's reload); set rollout.weight_loading=auto or reload")
    return mode == "direct" or (mode == "auto" and eligible)


def _forget_previous_engine() -> None:
    """vLLM keeps its process groups in module globals: a second engine in this process would reuse
    the first one's, built for another layout. Destroy vLLM's groups (not the trainer's world, which
    `destroy_distributed_environment` would also take down) so the next engine builds its own."""
    from vllm.distributed import parallel_state

    if parallel_state.model_parallel_is_initialized():
        log.info("a vLLM engine was started in this process before: rebuilding vLLM's process groups")
        parallel_state.destroy_model_parallel()
    if parallel_state._WORLD is not None:
        parallel_state._WORLD.destroy()
        parallel_state._WORLD = None


@contextlib.contextmanager
def _trainer_world_kept() -> Iterator[None]:
    """vLLM's teardown ends with `torch.distributed.destroy_process_group()`, which would take the
    trainer's world, and Megatron's groups with it, down too. Let it destroy only its own groups."""
    destroy = dist.destroy_process_group

    def destroy_unless_world(group=None):
        if group is None or group is dist.GroupMember.WORLD:
            return
        destroy(group)

    dist.destroy_process_group = destroy_unless_world
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def _shutdown_keeping_world(engine_core) -> None:
    """vLLM's engine teardown, without the trainer's world (see `_trainer_world_kept`). Also runs
    when an engine is garbage-collected or at exit; once the world is gone, vLLM's groups went
    with it and there is nothing left to destroy."""
    with _trainer_world_kept():
        try:
            engine_core.shutdown()
        except ValueError:  # "Invalid process group": destroyed with the world already
            if dist.is_initialized():
                raise


class VLLMEngine:
    """This rank's vLLM worker (SPMD, see the module docstring). Prompts and responses are token ids.

    Collective: every rank of the job builds its engine at the same time, and calls `generate`,
    `prompt_logprobs` and `shutdown` the same number of times.
    """

    def __init__(self, cfg: RolloutConfig, model_dir: str, return_routing: bool = False) -> None:
        """`return_routing`: every sampled response carries the experts each token was routed to
        (`Rollout.routing`, for R3 routing replay; MoE models on GPU)."""
        from megatron_r1.rollout.layout import EngineGroups, EngineLayout

        self.cfg = cfg
        self.model_dir = str(model_dir)
        check_rollout_weights(self.model_dir)  # FP8 checkpoints: convert to bf16 first (before any start-up cost)
        self.on_gpu = torch.cuda.is_available()
        check_engine_options(cfg, "r3" if return_routing else "none", self.on_gpu)
        if return_routing and not _is_moe(self.model_dir):
            raise ConfigError(f"routing replay needs a mixture-of-experts model; {self.model_dir} is dense: set grpo.routing_replay=none")
        self.return_routing = return_routing
        self.direct_refit = _direct_refit(cfg, self.model_dir)
        self._refit_pool: dict = {}  # CPU staging buffers of the direct refit, kept between refits
        self.dtype = cfg.engine_dtype(self.on_gpu, mla=_uses_mla(self.model_dir))  # one-line error before any start-up cost
        distributed.ensure_process_group()  # vLLM joins the trainer's world (or a 1-rank one)
        self.layout = EngineLayout.from_config(cfg, dist.get_world_size(), dist.get_rank())
        if not self.on_gpu and self.layout.num_engines > 1 and _is_moe(self.model_dir):
            # Data-parallel MoE engines exchange tokens with `all_gatherv`, which vLLM 0.32's CPU
            # communicator does not implement (CUDA's does).
            raise ConfigError(
                f"a mixture-of-experts model on CPU needs one engine over all {self.layout.world_size} ranks: "
                f"set rollout.engine_tensor_parallel_size={self.layout.world_size} (vLLM's CPU build cannot run "
                "data-parallel MoE engines)"
            )
        kwargs = dict(
            model=self.model_dir,
            # Token ids in and out; vLLM needs its tokenizer only to match stop strings in the text.
            skip_tokenizer_init=not cfg.stop,
            dtype=self.dtype,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=self.layout.tensor_parallel_size,
            pipeline_parallel_size=self.layout.pipeline_parallel_size,
            data_parallel_size=self.layout.num_engines,
            # One worker in this process, in the trainer's torch.distributed world; every rank of an
            # engine runs the scheduler itself (this also keeps the engine core in-process).
            distributed_executor_backend="external_launcher",
            enforce_eager=cfg.enforce_eager,
            # Ranks of one engine must draw the same samples: same seed everywhere (the loop seeds
            # torch per step and engine before each call).
            seed=cfg.seed,
            # Logprobs of the model's own distribution (before temperature/top-p): the quantity the
            # trainer computes, so importance ratios and the parity probe compare like with like.
            logprobs_mode="raw_logprobs",
        )
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.enable_sleep_mode)
            if cfg.quantization == "fp8":
                # Blockwise 128 x 128 online quantization of the bf16 weights. A refit goes through
                # `reload_weights` in checkpoint format, which re-runs the quantization on what it receives.
                kwargs["quantization"] = "fp8_per_block"
            if return_routing:
                # Routed experts come back through vLLM's aux-output connector: Model Runner V2 and
                # prefix caching (it rebuilds cached prompt blocks' routing from a block-hash store).
                os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
                kwargs.update(enable_return_routed_experts=True, enable_prefix_caching=True)
        else:
            kwargs.update(self._cpu_kwargs())
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # external_launcher requires it

        # torch._C's original, not `torch.set_num_threads`: an earlier engine in this process may
        # already have replaced that one with vLLM's no-op.
        threads, set_threads = torch.get_num_threads(), torch._C.set_num_threads
        from vllm import LLM

        _forget_previous_engine()
        self.llm = LLM(**kwargs)
        # vLLM shuts its engine down when the client is collected; make that keep the trainer's world too.
        core = self.llm.llm_engine.engine_core
        if getattr(core, "_finalizer", None) is not None and core._finalizer.detach() is not None:
            core._finalizer = weakref.finalize(core, _shutdown_keeping_world, core.engine_core)
        # vLLM's CPU worker pins its threads and replaces `torch.set_num_threads` with a no-op for
        # the whole process; the trainer shares the process and needs its threads back.
        torch.set_num_threads = set_threads
        set_threads(threads)
        # vLLM freezes the garbage collector's heap after start (a server optimisation); in a shared
        # process that would pin everything the trainer had allocated so far.
        gc.unfreeze()
        # The CPU worker also replaces torch.cuda's streams and events process-wide with placeholders
        # that Megatron cannot use; put the trainer's CPU meanings back.
        platform.install_cuda_stand_ins()
        self.groups = EngineGroups(self.layout)
        self._sleep_noted = False
        if self.layout.rank == 0:
            log.info("vLLM engines ready: %s (%s; %s; refits %s)", self.model_dir, "GPU" if self.on_gpu else "CPU", self.layout.describe(),
                     "direct into the live parameters" if self.direct_refit else "through vLLM's reload_weights")

    def _cpu_kwargs(self) -> dict:
        gb = self.cfg.cpu_kvcache_space_gb
        # vLLM reads the legacy variable as whole GiB and lets it override `kv_cache_memory_bytes`.
        if float(gb).is_integer():
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(gb))
        else:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        kwargs: dict = {"kv_cache_memory_bytes": int(gb * GiB)}
        if _uses_mla(self.model_dir):
            # vLLM 0.32's CPU rotary kernel rotates [tokens, heads, dim] inputs with more than one
            # head wrongly; MLA passes its query that way (GQA models pass flattened 2-D inputs).
            # The PyTorch implementation is exact.
            from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

            RotaryEmbedding.forward_cpu = RotaryEmbedding.forward_native
        if _uses_mla(self.model_dir) and self.dtype == "float32":
            # On CPUs with AMX, vLLM picks its AMX MLA kernels, which take bf16/fp16 weights only;
            # the reference CPU MLA backend runs float32.
            kwargs["attention_config"] = {"backend": "CPU_MLA"}
        return kwargs

    # ----------------------------------------------------------------------------------------
    # Sampling and scoring.

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        stop_token_ids: Sequence[int] | None = None,
        progress: bool = False,
        stop: Sequence[str] | None = None,
        min_tokens: int = 0,
    ) -> list[Rollout]:
        """Sample `n` responses per prompt. Returned prompt-major: all n samples of prompt 0 first.

        `logprobs` are the raw logprobs of the sampled tokens: equal to the trainer's at
        temperature 1 and top_p 1; with other settings they are still the untempered policy's.
        Sampling draws from torch's global generator: seed it for a reproducible batch. No response
        stops before `min_tokens` tokens (EOS and stop strings are ignored until then).
        """
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            stop_token_ids=list(stop_token_ids or []),
            # Stop strings (several tokens long) are matched in the detokenized text and kept in the
            # response, so the format reward sees the closing tag.
            stop=list(stop or []),
            include_stop_str_in_output=True,
            logprobs=0,  # the sampled token's logprob only
            detokenize=bool(stop),
        )
        if stop and not self.cfg.stop:
            raise ValueError("stop strings need the engine's tokenizer: list them in rollout.stop before the engine starts")
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=progress)
        rollouts = []
        for i, out in enumerate(outputs):
            for sample in sorted(out.outputs, key=lambda c: c.index):
                if sample.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished a request with {sample.finish_reason!r} (prompt {i})")
                ids = list(sample.token_ids)
                logprobs = [step[tok].logprob for step, tok in zip(sample.logprobs, ids)]
                routing = self._routing(sample) if self.return_routing else None
                rollouts.append(Rollout(i, list(out.prompt_token_ids), ids, logprobs, sample.finish_reason, routing))
        return rollouts

    def _routing(self, sample) -> torch.Tensor:
        """vLLM's `routed_experts` (`[prompt + response - 1, every decoder layer, top-k]`, dense layers
        as rows of zeros) -> the MoE layers' rows, int16."""
        if sample.routed_experts is None:
            raise RuntimeError("the engine returned no routed experts: was it started with enable_return_routed_experts?")
        layers, moe = _moe_layer_numbers(self.model_dir)
        routed = torch.from_numpy(sample.routed_experts.astype("int16"))
        return engine_routing_to_layers(routed, layers, moe).contiguous()

    def prompt_logprobs(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Logprob of each token given the tokens before it, for tokens `prompt_lens[i]` .. end of
        sequence i (default: from token 1, i.e. ``len(seq) - 1`` values, the trainer's layout)."""
        from vllm import SamplingParams

        # prompt_logprobs=0 returns just the scored token; such requests never read the prefix
        # cache, so every position is computed with the current weights.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False)
        result = []
        for i, (seq, out) in enumerate(zip(sequences, outputs)):
            start = max(1, prompt_lens[i] if prompt_lens is not None else 1)
            steps = out.prompt_logprobs  # [None, {token: Logprob}, ...], one entry per prompt token
            result.append(torch.tensor([steps[j][seq[j]].logprob for j in range(start, len(seq))], dtype=torch.float32))
        return result

    # ----------------------------------------------------------------------------------------
    # Memory: sleep while the trainer computes.

    def sleep(self) -> None:
        """Release the engine's GPU memory (level 1: KV cache dropped, weights offloaded; level 2:
        both dropped, reload weights before generating). A no-op on CPU and without sleep mode."""
        if self._sleep_enabled():
            self.llm.sleep(level=self.cfg.sleep_level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take the memory back; `tags=["weights"]` first and `["kv_cache"]` after a weight sync keeps
        the peak lower. A no-op on CPU and without sleep mode."""
        if self._sleep_enabled():
            self.llm.wake_up(tags)

    def _sleep_enabled(self) -> bool:
        if self.on_gpu and self.cfg.enable_sleep_mode:
            return True
        if not self._sleep_noted:
            self._sleep_noted = True
            why = "on CPU" if not self.on_gpu else "with rollout.enable_sleep_mode=false"
            log.info("engine sleep/wake_up are no-ops %s: the engine keeps its memory", why)
        return False

    # ----------------------------------------------------------------------------------------
    # Weights.

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace this worker's weights in memory with Hugging Face-named full tensors: every tensor
        of the checkpoint (a tied LM head excepted), in one call.

        vLLM's weight loaders keep what this worker holds (its engine TP shard of each tensor; with
        engine PP, its stage's layers). The iterable is consumed lazily inside one `reload_weights`
        call, so a generator keeps only what it has yielded and vLLM has not yet copied alive. One
        call, not one per bucket: vLLM rebuilds every fused module it receives part of (q/k/v,
        gate/up, experts) from the parts in *that* call, so a module split across calls would be
        left partly uninitialised (and on CPU the MoE experts are re-packed after every call, which
        assumes they were all loaded).
        """
        if self.direct_refit:  # straight into the live parameters (rollout/direct_refit.py)
            from megatron_r1.rollout.direct_refit import direct_refit

            self.llm.collective_rpc(direct_refit, args=(iter(named_tensors), self._refit_pool))
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
            if not self.on_gpu:
                self.llm.collective_rpc(_refresh_cpu_kernels)
        self.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        """Forget cached KV blocks: they were computed with the previous weights."""
        self.llm.reset_prefix_cache()

    def shutdown(self) -> None:
        """Free the engine's memory (collective: every rank shuts its worker down). The trainer's
        process groups are left alone."""
        if self.llm is None:
            return
        core = self.llm.llm_engine.engine_core
        if core._finalizer.detach() is not None:  # not shut down yet: vLLM's groups go, the trainer's stay
            _shutdown_keeping_world(core.engine_core)
        _forget_previous_engine()
        self.llm = None
        gc.collect()
