"""The colocated vLLM engine: generate rollouts, score sequences, sleep/wake, load new weights in memory.

Who runs an engine
------------------
Trainer ranks are numbered node by node (global rank = node * gpus_per_node + local rank). Inside a
node the GPUs are cut into consecutive groups of ``engine_tensor_parallel_size`` (t); each group is one
vLLM engine with tensor parallelism t, and the group's first rank, its *leader*, owns the
`VLLMEngine` object: it builds `vllm.LLM`, calls `generate`, and drives weight loading. An engine
never spans nodes, so its all-reduces stay on NVLink. `engine_layout` computes the groups:

    N GPUs per node, t dividing N: node k holds ranks kN .. kN+N-1 and the engines
    [kN + jt, ..., kN + jt + t - 1] for j = 0 .. N/t - 1, led by rank kN + jt.
    2 nodes x 8 GPUs, t = 1: 16 engines, every rank leads its own.
    2 nodes x 8 GPUs, t = 4: engines [0..3] [4..7] [8..11] [12..15]; leaders 0, 4, 8, 12.

Each GPU therefore hosts one trainer rank and one vLLM worker: the engine takes
``gpu_memory_utilization`` of the device, the trainer the rest, and sleep mode hands the engine's
share back to the trainer between rollouts.

How new weights reach an engine (after every policy update)
------------------------------------------------------------
The model adapters turn the trainer's TP/PP/EP shards into full Hugging Face tensors one at a time,
on every rank (all-gathers inside the TP/EP groups, a broadcast across pipeline stages), so every
rank sees the same stream of ``(hf_name, full_tensor)``. Then (see `rollout.weight_sync`):

* t = 1: the engine lives in the leader's own process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`); the
  stream goes by reference into one `reload_weights` call and vLLM copies each tensor into its own
  parameters on the same device. Nothing is serialised and the model is never held twice.
* t > 1: the engine's workers are separate processes, one per GPU of the group. Every rank of the
  group exports CUDA IPC handles of its copy of the current bucket, the leader gathers them and
  calls vLLM's weight-transfer API (`start_weight_update` / `update_weights` / `finish_weight_update`,
  IPC backend); each worker maps the tensor that lives on its own GPU and its weight loader keeps its
  TP shard. For this the launcher gives the leader the group's GPUs, its own first, and every other
  rank only its own GPU (`engine_visible_devices`), before CUDA is initialised.

Rollouts: each leader samples its share of the prompts; the loop gathers them to the trainer ranks.

CPU (gloo, no GPU: ``gpus_per_node = 0``): one in-process engine on global rank 0. With 2 ranks,
rank 1 holds no engine; it takes part in the gathers that build the full tensors and in the
trainer's logprob collectives only.

An in-process engine must not join the trainer's process group (vLLM would build its groups over
all trainer ranks and wait for ranks that never build an engine), so `VLLMEngine` gives vLLM a
private one-rank world while it starts (`_private_torch_distributed`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_r1.config import RolloutConfig

log = logging.getLogger(__name__)

GiB = 1 << 30
# torch names process groups by a process-wide counter that must agree across trainer ranks; the
# engines' own groups are numbered from here, so they never shift or collide with the trainer's.
_engine_group_count = 1_000_000


@dataclass
class Rollout:
    """One sampled response."""

    prompt_index: int  # index of the prompt in the `generate` call
    prompt_ids: list[int]
    response_ids: list[int]  # includes the stop token when generation stopped on one
    logprobs: list[float]  # sampled tokens' logprobs under the raw (temperature 1, untruncated) policy
    finish_reason: str  # "stop" | "length"


# --------------------------------------------------------------------------------------------
# Layout: which ranks form an engine.


def engine_layout(world_size: int, gpus_per_node: int, engine_tp: int) -> list[list[int]]:
    """The engine groups (lists of global ranks, leader first) of a job; see the module docstring.

    ``gpus_per_node = 0`` means a CPU job: one engine on rank 0, whatever the world size.
    """
    if world_size < 1 or engine_tp < 1:
        raise ValueError(f"world_size and engine_tp must be >= 1, got {world_size} and {engine_tp}")
    if gpus_per_node <= 0:
        if engine_tp != 1:
            raise ValueError(f"a CPU engine runs in one process: engine_tensor_parallel_size must be 1, got {engine_tp}")
        return [[0]]
    per_node = min(gpus_per_node, world_size)
    if world_size % per_node:
        raise ValueError(f"world_size {world_size} is not a whole number of nodes of {gpus_per_node} GPUs")
    if per_node % engine_tp:
        raise ValueError(
            f"rollout.engine_tensor_parallel_size={engine_tp} must divide the GPUs per node ({per_node}): "
            "an engine never spans nodes"
        )
    return [list(range(start, start + engine_tp)) for start in range(0, world_size, engine_tp)]


def engine_group(rank: int, world_size: int, gpus_per_node: int, engine_tp: int) -> list[int] | None:
    """The engine group `rank` belongs to, or None when it serves no engine (CPU ranks other than 0)."""
    for group in engine_layout(world_size, gpus_per_node, engine_tp):
        if rank in group:
            return group
    return None


def owns_engine(rank: int, world_size: int, gpus_per_node: int, engine_tp: int) -> bool:
    """True on the ranks that build a `VLLMEngine` (the leaders)."""
    group = engine_group(rank, world_size, gpus_per_node, engine_tp)
    return group is not None and group[0] == rank


def engine_visible_devices(local_rank: int, gpus_per_node: int, engine_tp: int) -> str:
    """CUDA_VISIBLE_DEVICES for one process: its own GPU first (vLLM and the trainer use device 0),
    then, on a leader with t > 1, the other GPUs of its engine group for vLLM's worker processes."""
    if engine_tp == 1 or local_rank % engine_tp:
        return str(local_rank)
    return ",".join(str(g) for g in range(local_rank, local_rank + engine_tp))


# --------------------------------------------------------------------------------------------
# The engine.


def _uses_mla(model_dir: str) -> bool:
    config = Path(model_dir) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("kv_lora_rank") is not None


@contextlib.contextmanager
def _private_torch_distributed() -> Iterator[None]:
    """Let vLLM build its own one-rank torch.distributed world, then give the trainer its own back.

    An in-process vLLM worker calls `init_process_group` only when no default group exists; if the
    trainer's exists it builds its groups over all trainer ranks, which blocks in `new_group` until
    ranks that never build an engine join. So the trainer's default group is hidden while vLLM
    starts and restored afterwards; vLLM keeps references to the groups it made. The group-name
    counter is moved out of the way for vLLM's groups and restored, so the trainer's next groups get
    the same names on every rank.
    """
    from torch.distributed import distributed_c10d as c10d

    global _engine_group_count
    world, count = c10d._world.default_pg, c10d._world.group_count
    c10d._world.default_pg = None
    c10d._world.group_count = _engine_group_count
    try:
        yield
    finally:
        _engine_group_count = c10d._world.group_count  # a later engine numbers on from here
        c10d._world.default_pg = world
        c10d._world.group_count = count


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


class VLLMEngine:
    """A `vllm.LLM` colocated with the trainer. Prompts and responses are token ids (no tokenizer)."""

    def __init__(self, cfg: RolloutConfig, model_dir: str) -> None:
        self.cfg = cfg
        self.model_dir = str(model_dir)
        self.on_gpu = torch.cuda.is_available()
        tp = cfg.engine_tensor_parallel_size
        if not self.on_gpu and tp != 1:
            raise ValueError(f"rollout.engine_tensor_parallel_size={tp}: a CPU engine runs in one process; set it to 1")
        # The engine core runs in this process: no spawned process, and weights are handed over by
        # reference. With t > 1 on GPUs the workers are still separate processes (vLLM's mp executor).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs = dict(
            model=self.model_dir,
            skip_tokenizer_init=True,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=tp,
            enforce_eager=cfg.enforce_eager,
            seed=cfg.seed,
            # Logprobs of the model's own distribution (before temperature/top-p): the quantity the
            # trainer computes, so importance ratios and the parity probe compare like with like.
            logprobs_mode="raw_logprobs",
        )
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.enable_sleep_mode)
            if tp > 1:
                kwargs["weight_transfer_config"] = {"backend": "ipc"}
        else:
            kwargs.update(self._cpu_kwargs())

        # torch._C's original, not `torch.set_num_threads`: an earlier engine in this process may
        # already have replaced that one with vLLM's no-op.
        threads, set_threads = torch.get_num_threads(), torch._C.set_num_threads
        from vllm import LLM
        from vllm.distributed import parallel_state

        with _private_torch_distributed():
            if parallel_state.model_parallel_is_initialized():
                # vLLM keeps its process groups in module globals: a second engine in this process
                # would reuse the first one's, built for another model. Start from a clean slate.
                log.info("a vLLM engine was started in this process before: rebuilding vLLM's process groups")
                parallel_state.destroy_model_parallel()
                parallel_state.destroy_distributed_environment()
            self.llm = LLM(**kwargs)
        # vLLM's CPU worker pins its threads and replaces `torch.set_num_threads` with a no-op for
        # the whole process; the trainer shares the process and needs its threads back.
        torch.set_num_threads = set_threads
        set_threads(threads)
        # vLLM freezes the garbage collector's heap after start (a server optimisation); in a shared
        # process that would pin everything the trainer had allocated so far.
        gc.unfreeze()
        if self.on_gpu and tp > 1:
            self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": {"packed": False}})
        self._sleep_noted = False
        log.info("vLLM engine ready: %s (%s, TP %d)", self.model_dir, "GPU" if self.on_gpu else "CPU", tp)

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
        if _uses_mla(self.model_dir) and self.cfg.dtype in ("float32", "float"):
            # On CPUs with AMX, vLLM picks its AMX MLA kernels, which take bf16/fp16 weights only;
            # the reference CPU MLA backend runs float32.
            kwargs["attention_config"] = {"backend": "CPU_MLA"}
        return kwargs

    @property
    def in_process(self) -> bool:
        """True when vLLM's model lives in this process (CPU, or t = 1): weights go by reference."""
        return self.cfg.engine_tensor_parallel_size == 1

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
    ) -> list[Rollout]:
        """Sample `n` responses per prompt. Returned prompt-major: all n samples of prompt 0 first.

        `logprobs` are the raw logprobs of the sampled tokens: equal to the trainer's at
        temperature 1 and top_p 1; with other settings they are still the untempered policy's.
        Sampling draws from torch's global generator: seed it for a reproducible batch.
        """
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            stop_token_ids=list(stop_token_ids or []),
            logprobs=0,  # the sampled token's logprob only
            detokenize=False,
        )
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=progress)
        rollouts = []
        for i, out in enumerate(outputs):
            for sample in sorted(out.outputs, key=lambda c: c.index):
                if sample.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished a request with {sample.finish_reason!r} (prompt {i})")
                ids = list(sample.token_ids)
                logprobs = [step[tok].logprob for step, tok in zip(sample.logprobs, ids)]
                rollouts.append(Rollout(i, list(out.prompt_token_ids), ids, logprobs, sample.finish_reason))
        return rollouts

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
        """Replace the engine's weights in memory with Hugging Face-named tensors: every tensor of
        the checkpoint (a tied LM head excepted), in one call.

        In-process engines only (CPU, or GPU with t = 1; see `in_process`). The iterable is consumed
        lazily inside one `reload_weights` call, so a generator keeps only what it has yielded and
        vLLM has not yet copied alive. One call, not one per bucket: vLLM rebuilds every fused
        module it receives part of (q/k/v, gate/up, experts) from the parts in *that* call, so a
        module split across calls would be left partly uninitialised (and on CPU the MoE experts are
        re-packed after every call, which assumes they were all loaded).
        """
        if not self.in_process:
            raise RuntimeError("this engine's workers run in other processes: use WeightSync (IPC weight transfer)")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        if not self.on_gpu:
            self.llm.collective_rpc(_refresh_cpu_kernels)
        self.reset_prefix_cache()

    def start_weight_update(self) -> None:
        """Begin an IPC weight update (GPU, t > 1): vLLM prepares layer-by-layer reloading."""
        self.llm.collective_rpc("start_weight_update")

    def update_weights_ipc(self, names: list[str], tensors_meta: list[tuple[str, list[int]]], handles: list[dict]) -> None:
        """Load one bucket from CUDA IPC handles (`{gpu_uuid: rebuild args}` per tensor, one entry
        per GPU of the group); `tensors_meta` holds each tensor's dtype name and shape."""
        update_info = {
            "names": names,
            "dtype_names": [dtype for dtype, _ in tensors_meta],
            "shapes": [shape for _, shape in tensors_meta],
            "ipc_handles": handles,
        }
        self.llm.collective_rpc("update_weights", kwargs={"update_info": update_info})

    def finish_weight_update(self) -> None:
        """End an IPC weight update: vLLM post-processes the layers, then cached prefixes are dropped."""
        self.llm.collective_rpc("finish_weight_update")
        self.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        """Forget cached KV blocks: they were computed with the previous weights."""
        self.llm.reset_prefix_cache()

    def shutdown(self) -> None:
        """Free the engine's memory. The trainer's process groups are left alone (vLLM's own
        teardown would destroy whatever default group it finds)."""
        if self.llm is None:
            return
        with _private_torch_distributed():
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()

