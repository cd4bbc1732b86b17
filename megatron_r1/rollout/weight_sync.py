"""Move the trainer's new weights into the rollout engine after every update, and prove they arrived.

The producer is a generator of ``(hf_name, full_tensor)`` pairs that the model adapters build one at
a time from the Megatron shards (gathers across TP/EP, broadcast across PP). `bucketed` groups that
stream into buckets of a bounded size, and `WeightSync` hands them to the engine without ever
holding the whole model a second time:

* in-process engine (CPU; GPU with engine TP 1): all buckets flow lazily through *one*
  `reload_weights` call (`VLLMEngine.load_weights`), each tensor dropped as soon as vLLM has copied
  it. One call per bucket is not safe in vLLM 0.32: a call rebuilds every fused module (q/k/v,
  gate/up, experts) it touches from the parts in that call alone, so a bucket boundary that splits
  one would leave the rest of it uninitialised. Peak extra memory: about one bucket plus one tensor
  on the producer side, plus the one module vLLM is rebuilding.
* out-of-process workers (GPU, engine TP > 1): one bucket at a time through vLLM's weight-transfer
  API with CUDA IPC handles gathered from every GPU of the engine group (see `vllm_engine`).

`ParityProbe` then scores a fixed batch with the engine and with the trainer and fails loudly when
they disagree: a stale or misnamed tensor shows up as a logprob gap long before it shows up as a
bad reward curve.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_r1.rollout.vllm_engine import VLLMEngine

NamedTensor = tuple[str, torch.Tensor]
MB = 1 << 20


class WeightSyncError(RuntimeError):
    """The engine does not compute what the trainer computes after a weight sync."""


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def bucketed(named_tensors: Iterable[NamedTensor], bucket_bytes: int) -> Iterator[list[NamedTensor]]:
    """Group a stream of tensors, in order, into buckets of at most `bucket_bytes` bytes.

    A tensor larger than a bucket travels alone. Lazy: a bucket is yielded as soon as the next
    tensor would overflow it, so at most one bucket plus one tensor of the stream is alive here.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    bucket: list[NamedTensor] = []
    size = 0
    for item in named_tensors:
        nbytes = tensor_bytes(item[1])
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        del item  # the bucket is the only holder: a drained bucket frees its tensors
        size += nbytes
        if size >= bucket_bytes:  # full (or one oversized tensor): send it now
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


@dataclass(frozen=True)
class SyncStats:
    """What one sync moved and how fast."""

    bytes: int
    seconds: float
    buckets: int
    tensors: int
    gb_per_s: float  # 1e9 bytes per second, including the producer's gathers


class WeightSync:
    """Streams HF-named tensors into an engine, bucket by bucket.

    `engine` is None on ranks without one: they only drive the producer (their part of the
    gathers). For an engine whose workers run in other processes (GPU, engine TP > 1), every rank
    of the engine group passes `group`, the process group of exactly those ranks, leader first.
    """

    def __init__(self, engine: VLLMEngine | None, bucket_mb: float, group: dist.ProcessGroup | None = None) -> None:
        self.engine = engine
        self.bucket_bytes = max(1, int(bucket_mb * MB))
        self.group = group
        if engine is not None and not engine.in_process and group is None:
            raise ValueError("an engine with out-of-process workers needs the engine group's process group")

    def sync(self, named_tensors: Iterable[NamedTensor]) -> SyncStats:
        """Load every tensor of `named_tensors` into the engine; the engine's prefix cache is reset."""
        counts = {"bytes": 0, "buckets": 0, "tensors": 0}

        def counted() -> Iterator[list[NamedTensor]]:
            for bucket in bucketed(named_tensors, self.bucket_bytes):
                counts["buckets"] += 1
                counts["tensors"] += len(bucket)
                counts["bytes"] += sum(tensor_bytes(t) for _, t in bucket)
                yield bucket

        start = time.perf_counter()
        if self.group is not None and dist.get_world_size(self.group) > 1:
            self._sync_ipc(counted())
        elif self.engine is not None:
            self.engine.load_weights(_drain(counted()))
        else:
            for _ in _drain(counted()):  # no engine here: only take part in the gathers
                pass
        seconds = time.perf_counter() - start
        return SyncStats(
            bytes=counts["bytes"],
            seconds=seconds,
            buckets=counts["buckets"],
            tensors=counts["tensors"],
            gb_per_s=counts["bytes"] / max(seconds, 1e-9) / 1e9,
        )

    def _sync_ipc(self, buckets: Iterator[list[NamedTensor]]) -> None:
        """GPU, engine TP > 1: each rank shares its copy of a bucket by CUDA IPC; the leader loads it."""
        from torch.multiprocessing.reductions import reduce_tensor

        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        leader = self.engine is not None
        if leader:
            self.engine.start_weight_update()
        for bucket in buckets:
            # Handles do not keep storage alive: hold the tensors until every worker has copied them.
            tensors = [t.detach().contiguous() for _, t in bucket]
            torch.cuda.synchronize()  # the producer's gathers may still be in flight
            mine = [{uuid: reduce_tensor(t)[1]} for t in tensors]
            gathered: list = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(gathered, mine, group=self.group)
            if leader:
                handles = [{k: v for rank in gathered for k, v in rank[i].items()} for i in range(len(tensors))]
                meta = [(str(t.dtype).removeprefix("torch."), list(t.shape)) for t in tensors]
                self.engine.update_weights_ipc([name for name, _ in bucket], meta, handles)
            dist.barrier(group=self.group)
            del tensors, bucket
        if leader:
            self.engine.finish_weight_update()


def _drain(buckets: Iterator[list[NamedTensor]]) -> Iterator[NamedTensor]:
    """Flatten buckets, popping each tensor as it goes, so a consumed tensor is referenced by
    nobody here while the next bucket is being produced."""
    for bucket in buckets:
        bucket.reverse()
        while bucket:
            yield bucket.pop()


# --------------------------------------------------------------------------------------------
# The parity probe.


def _broadcast(obj, src: int):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class ParityProbe:
    """Scores a fixed probe batch with the engine and the trainer; raises when they disagree.

    The batch is `prompts`, each extended by a greedy continuation the engine generates on the
    first check, so it covers the kind of tokens the policy actually produces.
    `trainer_logprobs_fn(sequences)` returns, per sequence, the trainer's logprob of every token
    given the ones before it (``len(seq) - 1`` values). In a distributed job every rank calls
    `check` (the trainer side is collective); the engine rank `src_rank` (the only one with an
    engine, the others pass None) shares the sequences and the verdict, so all ranks raise together.
    """

    def __init__(
        self,
        engine: VLLMEngine | None,
        trainer_logprobs_fn: Callable[[list[list[int]]], Sequence[torch.Tensor]],
        prompts: Sequence[Sequence[int]],
        threshold: float,
        continuation_tokens: int = 16,
        src_rank: int = 0,
    ) -> None:
        if not prompts:
            raise ValueError("the parity probe needs at least one prompt")
        self.engine = engine
        self.trainer_logprobs_fn = trainer_logprobs_fn
        self.prompts = [list(p) for p in prompts]
        self.threshold = threshold
        self.continuation_tokens = continuation_tokens
        self.src_rank = src_rank
        self._sequences: list[list[int]] | None = None

    def sequences(self) -> list[list[int]]:
        """The probe batch: prompts plus their greedy continuations (made once)."""
        if self._sequences is None:
            seqs = None
            if self.engine is not None:
                out = self.engine.generate(self.prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=self.continuation_tokens)
                seqs = [r.prompt_ids + r.response_ids for r in out]
            self._sequences = _broadcast(seqs, self.src_rank)
        return self._sequences

    def check(self) -> dict[str, float]:
        """Compare engine and trainer logprobs on the probe batch; returns `sync/*` metrics."""
        start = time.perf_counter()
        seqs = self.sequences()
        engine_lp = self.engine.prompt_logprobs(seqs) if self.engine is not None else None
        trainer_lp = self.trainer_logprobs_fn(seqs)
        verdict = _compare(seqs, engine_lp, trainer_lp) if self.engine is not None else None
        stats, (seq_index, token) = _broadcast(verdict, self.src_rank)
        stats["sync/probe_seconds"] = time.perf_counter() - start
        if stats["sync/logprob_abs_diff_max"] > self.threshold:
            raise WeightSyncError(
                f"logprob parity probe failed after the weight sync: max |vLLM - trainer| = "
                f"{stats['sync/logprob_abs_diff_max']:.3g} > rollout.probe_threshold={self.threshold:g} "
                f"(mean {stats['sync/logprob_abs_diff_mean']:.3g} over {int(stats['sync/probe_tokens'])} tokens; "
                f"worst: probe sequence {seq_index}, token {token}). "
                "The engine is not running the trainer's weights: a tensor was probably not exported or got "
                "a wrong Hugging Face name (compare the adapter's names with the checkpoint's), or "
                "rollout.dtype differs from the trainer's precision. Raise the threshold only for a numerical gap."
            )
        return stats


def _compare(
    seqs: list[list[int]], engine_lp: Sequence[torch.Tensor], trainer_lp: Sequence[torch.Tensor]
) -> tuple[dict[str, float], tuple[int, int]]:
    """Metrics of |engine - trainer| over all scored tokens, and where the worst one sits."""
    if len(trainer_lp) != len(seqs):
        raise ValueError(f"trainer_logprobs_fn returned {len(trainer_lp)} results for {len(seqs)} probe sequences")
    diffs = []
    for i, (seq, a, b) in enumerate(zip(seqs, engine_lp, trainer_lp)):
        b = torch.as_tensor(b).detach().float().cpu().flatten()
        if b.numel() != len(seq) - 1:
            raise ValueError(
                f"trainer_logprobs_fn gave {b.numel()} logprobs for probe sequence {i} of {len(seq)} tokens; "
                f"expected {len(seq) - 1} (one per token after the first)"
            )
        diffs.append((a - b).abs())
    flat = torch.cat(diffs)
    worst = int(flat.argmax())
    seq_index = 0
    while worst >= diffs[seq_index].numel():
        worst -= diffs[seq_index].numel()
        seq_index += 1
    stats = {
        "sync/logprob_abs_diff_max": float(flat.max()),
        "sync/logprob_abs_diff_mean": float(flat.mean()),
        "sync/probe_tokens": float(flat.numel()),
    }
    return stats, (seq_index, worst + 1)  # the scored token's position in its sequence
