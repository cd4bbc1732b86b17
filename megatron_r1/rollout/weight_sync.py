"""Move the trainer's new weights into this rank's engine worker after every update, and prove they arrived.

The producer is a generator of ``(hf_name, full_tensor)`` pairs that the model adapters build one at
a time from the Megatron shards (gathers across the trainer's TP/EP groups, broadcasts across its
pipeline stages). Every rank runs it in step with the others and feeds the stream, in buckets of
bounded size, into its *own* vLLM worker, in its own process (`VLLMEngine.load_weights`): vLLM's
weight loaders keep the worker's engine-TP shard of each tensor and drop the rest. Nothing is
serialised, nothing crosses a process boundary beyond the trainer's own gathers, and the model is
never held a second time.

All buckets flow lazily through *one* `reload_weights` call, each tensor dropped as soon as vLLM
has copied it. One call per bucket is not safe in vLLM 0.32: a call rebuilds every fused module
(q/k/v, gate/up, experts) it touches from the parts in that call alone, so a bucket boundary that
split one would leave the rest of it uninitialised. Peak extra memory: about one bucket plus one
tensor on the producer side, plus the one module vLLM is rebuilding.

`ParityProbe` then scores a fixed batch with every engine and with the trainer and fails loudly
when they disagree: a stale or misnamed tensor shows up as a logprob gap long before it shows up
as a bad reward curve.

`refit` is the whole hand-over after an update: free the trainer's leftovers and move its state out,
wake the engine, stream, move the policy's weights out, wake its KV cache, probe.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_r1.models.hf.base import export_hf_tensors
from megatron_r1.rollout.vllm_engine import VLLMEngine
from megatron_r1.train.memory import TrainerSwap, free_for_engine
from megatron_r1.train.metrics import PhaseTimer

NamedTensor = tuple[str, torch.Tensor]
log = logging.getLogger(__name__)

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
    """What one sync moved on this rank and how fast."""

    bytes: int  # full tensors streamed into this rank's worker (vLLM keeps its shard of each)
    seconds: float
    buckets: int
    tensors: int
    gb_per_s: float  # 1e9 bytes per second, including the producer's gathers
    received_bytes: int = 0  # bytes this rank received from others in the trainer's gathers
    peak_extra_bytes: int = 0  # CUDA: allocator peak above the start; CPU: most bucket bytes alive at once


class WeightSync:
    """Streams HF-named tensors into this rank's engine worker, bucket by bucket."""

    def __init__(self, engine: VLLMEngine, bucket_mb: float) -> None:
        self.engine = engine
        self.bucket_bytes = max(1, int(bucket_mb * MB))

    def sync(self, named_tensors: Iterable[NamedTensor], traffic: dict[str, int] | None = None) -> SyncStats:
        """Load every tensor of `named_tensors` into the worker; its prefix cache is reset.
        `traffic` is the dict the producer counts its received bytes in (`export_hf_tensors`)."""
        counts = {"bytes": 0, "buckets": 0, "tensors": 0, "peak": 0}
        on_cuda = torch.cuda.is_available()
        base = torch.cuda.memory_allocated() if on_cuda else 0
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()

        def counted() -> Iterator[list[NamedTensor]]:
            for bucket in bucketed(named_tensors, self.bucket_bytes):
                nbytes = sum(tensor_bytes(t) for _, t in bucket)
                counts["buckets"] += 1
                counts["tensors"] += len(bucket)
                counts["bytes"] += nbytes
                counts["peak"] = max(counts["peak"], nbytes)
                yield bucket

        start = time.perf_counter()
        self.engine.load_weights(_drain(counted()))
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base if on_cuda else counts["peak"]
        return SyncStats(
            bytes=counts["bytes"],
            seconds=seconds,
            buckets=counts["buckets"],
            tensors=counts["tensors"],
            gb_per_s=counts["bytes"] / max(seconds, 1e-9) / 1e9,
            received_bytes=int((traffic or {}).get("received", 0)),
            peak_extra_bytes=int(peak),
        )


def _drain(buckets: Iterator[list[NamedTensor]]) -> Iterator[NamedTensor]:
    """Flatten buckets, popping each tensor as it goes, so a consumed tensor is referenced by
    nobody here while the next bucket is being produced."""
    for bucket in buckets:
        bucket.reverse()
        while bucket:
            yield bucket.pop()


# --------------------------------------------------------------------------------------------
# The parity probe.

# Default failure thresholds on |logprob_engine - logprob_trainer| per engine dtype: (mean, max).
# float32: the same math in two implementations; measured on CPU after a correct sync (tiny
# Qwen2): mean ~1e-6, max ~1e-5. bfloat16/float16: kernels and reduction orders differ; NeMo-RL
# measured mean 0.032 / max 0.097 for a correct bf16 DeepSeek-V3 sync. A stale or misnamed tensor
# moves the mean far beyond these; `rollout.probe_mean_threshold` / `probe_max_threshold` override.
PROBE_THRESHOLDS = {
    "float32": (1e-4, 1e-3),
    "bfloat16": (0.1, 1.0),
    "float16": (0.05, 0.5),
}
# FP8 engine weights (`rollout.quantization: fp8`) over a bf16 trainer: quantization error on top of the
# kernel differences. Not measured here (FP8 needs a GPU): twice the bfloat16 defaults, loose enough for
# a correct sync and still far below what a stale or misnamed tensor gives; measure and set your own.
FP8_PROBE_THRESHOLDS = (0.2, 2.0)


def probe_thresholds(cfg, engine_dtype: str | None = None) -> tuple[float, float]:
    """(mean, max) failure thresholds for a `RolloutConfig`: its overrides, else the default of the
    dtype the engine runs in (`VLLMEngine.dtype`; `cfg.dtype` when that is explicit)."""
    dtype = engine_dtype or cfg.dtype
    mean, worst = PROBE_THRESHOLDS.get(dtype, PROBE_THRESHOLDS["bfloat16"])
    if getattr(cfg, "quantization", "none") == "fp8":
        mean, worst = FP8_PROBE_THRESHOLDS
    return (
        mean if cfg.probe_mean_threshold is None else cfg.probe_mean_threshold,
        worst if cfg.probe_max_threshold is None else cfg.probe_max_threshold,
    )


def _broadcast(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _all_gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class ParityProbe:
    """Scores a fixed probe batch with every rank's engine and with the trainer; raises on every
    rank when any engine disagrees.

    The batch is `prompts`, each extended by a greedy continuation generated on the first check,
    so it covers the kind of tokens the policy actually produces (rank 0's sequences are shared, so
    every rank scores the same batch). `trainer_logprobs_fn(sequences)` returns, per sequence, the
    trainer's logprob of every token given the ones before it (``len(seq) - 1`` values); it is
    collective, like everything else here: every rank calls `check` together.

    A check fails when the mean |engine - trainer| over the batch exceeds `mean_threshold` or the
    largest one exceeds `max_threshold`, on any rank; the error names the ranks and engines.
    """

    def __init__(
        self,
        engine: VLLMEngine,
        trainer_logprobs_fn: Callable[[list[list[int]]], Sequence[torch.Tensor]],
        prompts: Sequence[Sequence[int]],
        mean_threshold: float,
        max_threshold: float,
        continuation_tokens: int = 16,
    ) -> None:
        if not prompts:
            raise ValueError("the parity probe needs at least one prompt")
        self.engine = engine
        self.trainer_logprobs_fn = trainer_logprobs_fn
        self.prompts = [list(p) for p in prompts]
        self.mean_threshold = mean_threshold
        self.max_threshold = max_threshold
        self.continuation_tokens = continuation_tokens
        self._sequences: list[list[int]] | None = None

    def sequences(self) -> list[list[int]]:
        """The probe batch: prompts plus their greedy continuations (made once)."""
        if self._sequences is None:
            # Every engine generates (engines step together), rank 0's result is used everywhere.
            out = self.engine.generate(self.prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=self.continuation_tokens)
            self._sequences = _broadcast([r.prompt_ids + r.response_ids for r in out])
        return self._sequences

    def check(self, between: Callable[[], None] | None = None) -> dict[str, float]:
        """Compare engine and trainer logprobs on the probe batch; returns `sync/*` metrics. The
        trainer scores first; `between()` runs before the engine does (the refit moves the trainer's
        weights out and wakes the engine's KV cache there). Make the batch (`sequences`) while the
        engine can generate: before the first sleep."""
        start = time.perf_counter()
        seqs = self.sequences()
        trainer_lp = self.trainer_logprobs_fn(seqs)
        if between is not None:
            between()
        engine_lp = self.engine.prompt_logprobs(seqs)
        stats, where = _compare(seqs, engine_lp, trainer_lp)
        engine_index = getattr(getattr(self.engine, "layout", None), "engine_index", 0)
        per_rank = _all_gather((stats, where, engine_index))
        worst_rank = max(range(len(per_rank)), key=lambda r: per_rank[r][0]["sync/logprob_abs_diff_max"])
        result = {
            "sync/logprob_abs_diff_max": max(r[0]["sync/logprob_abs_diff_max"] for r in per_rank),
            "sync/logprob_abs_diff_mean": max(r[0]["sync/logprob_abs_diff_mean"] for r in per_rank),  # the worst engine's
            "sync/probe_tokens": stats["sync/probe_tokens"],
            "sync/probe_seconds": time.perf_counter() - start,
        }
        failing = [
            r for r, (st, _, _) in enumerate(per_rank)
            if st["sync/logprob_abs_diff_mean"] > self.mean_threshold or st["sync/logprob_abs_diff_max"] > self.max_threshold
        ]
        if failing:
            st, (seq_index, token), engine_index = per_rank[worst_rank]
            raise WeightSyncError(
                f"logprob parity probe failed after the weight sync on rank(s) {failing} "
                f"(engine(s) {sorted({per_rank[r][2] for r in failing})}): |vLLM - trainer| mean "
                f"{st['sync/logprob_abs_diff_mean']:.3g} (threshold {self.mean_threshold:g}), max "
                f"{st['sync/logprob_abs_diff_max']:.3g} (threshold {self.max_threshold:g}) on rank {worst_rank}, "
                f"worst at probe sequence {seq_index}, token {token}, over {int(st['sync/probe_tokens'])} tokens. "
                "That engine is not running the trainer's weights: a tensor was probably not exported or got "
                "a wrong Hugging Face name (compare the adapter's names with the checkpoint's), or "
                "rollout.dtype differs from the trainer's precision. Raise rollout.probe_mean_threshold / "
                "probe_max_threshold only for a numerical gap."
            )
        return result


def probe_due(version: int, probe_every: int) -> bool:
    """Whether the fixed probe checks refit `version`: the first refit of a run (and a resumed run's
    refit 0), then every `probe_every`-th; never with 0. Between probes every colocated step is
    checked for free on the batch it trains on (`SampledCheck`)."""
    return bool(probe_every) and (version <= 1 or version % probe_every == 0)


class SampledCheck:
    """The parity check every synchronous step gets for nothing. The update scores the tokens the engine
    sampled with the very weights that sampled them (the last refit), so the mean |log pi_trainer -
    log pi_engine| over the batch's response tokens (`train/mismatch_abs_diff`, from `algorithms.mismatch`,
    the same on every rank) measures what the fixed probe measures, on every token of the batch.

    Sampled tokens include rare ones, where a correct bf16 engine differs most, so a gap above the probe's
    mean threshold is not yet an error: `after_update` warns and has this step's refit probed
    (`probe_every`), and the probe, strict on its fixed batch, decides (`WeightSyncError`). With the probe
    off (`rollout.probe_every: 0`) there is nothing to decide, and the gap itself raises. Before anything
    of the step is saved either way. A gap that is not finite belongs to the loop's non-finite guard
    (`optimizer.max_nonfinite_steps`), as the probe's nan does."""

    def __init__(self, mean_threshold: float, probing: bool) -> None:
        self.mean_threshold = mean_threshold
        self.probing = probing
        self.flagged_step: int | None = None  # the step whose refit must be probed

    def after_update(self, train_metrics: dict, step: int) -> None:
        gap = train_metrics.get("mismatch_abs_diff")
        if gap is None or not math.isfinite(gap) or gap <= self.mean_threshold:
            return
        what = (f"step {step}: the trainer and the engine disagree on the tokens the engine sampled: mean "
                f"|logprob_vllm - logprob_trainer| {gap:.3g} over the batch's response tokens (threshold "
                f"{self.mean_threshold:g})")
        if not self.probing:
            raise WeightSyncError(
                f"{what}. The engine is not running the trainer's weights (from the last refit, or the checkpoint it "
                "loaded): a tensor was probably not exported or got a wrong Hugging Face name, or rollout.dtype differs from the "
                "trainer's precision. Raise rollout.probe_mean_threshold only for a numerical gap."
            )
        log.warning("%s; the parity probe checks this step's refit", what)
        self.flagged_step = step

    def probe_every(self, step: int, default: int) -> int:
        """`rollout.probe_every` for the refit after `step`'s update: 1 (probe it) when that step was flagged."""
        if self.flagged_step == step:
            self.flagged_step = None
            return 1
        return default


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


def refit(engine, model, model_cfg, syncer, probe, step: int, probe_every: int, reference=None,
          swap: TrainerSwap | None = None, timer: PhaseTimer | None = None) -> dict:
    """Refit every rank's own worker (asleep on entry: nothing but its process holds device memory),
    in the order that keeps device memory lowest and never holds the trainer's state beside the
    engine's KV cache: free what the trainer does not need (cached blocks, FP8 weight caches) and
    move its state out (`swap`: gradients, optimizer, reference model), wake the engine's weights,
    stream the new policy in (bucketed), score the parity probe's trainer side, move the policy's
    weights out (`swap` mode all), wake the KV cache, score the probe's engine side. Timed as the
    phases `swap` and `sync` when a `timer` is given."""
    timer = timer or PhaseTimer()
    with timer("swap"):
        free_for_engine(model, reference)
        if swap is not None:
            swap.offload_state()
            swap.restore_weights()  # out since the engine started, and the stream reads them
    with timer("sync"):
        engine.wake_up(["weights"])
        traffic = {"received": 0}
        s = syncer.sync(export_hf_tensors(model, model_cfg, traffic), traffic)
    stats = {
        "sync/seconds": s.seconds,
        "sync/gb_per_s": s.gb_per_s,
        "sync/buckets": float(s.buckets),
        "sync/mb_loaded_per_rank": s.bytes / 2**20,
        "sync/mb_received_per_rank": s.received_bytes / 2**20,
        "sync/peak_extra_mb": s.peak_extra_bytes / 2**20,
    }

    def make_room() -> None:
        with timer("swap"):
            if swap is not None:
                swap.offload_weights()
        engine.wake_up(["kv_cache"])

    with timer("sync"):
        if probe is not None and probe_due(step, probe_every):
            stats.update(probe.check(between=make_room))
        else:
            make_room()
    return stats
