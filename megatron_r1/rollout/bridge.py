"""The channel between the two sides of a disaggregated job (`placement.py`), and the schedule both follow.

Two kinds of traffic, two paths:

* **Messages** (a step's scored rollouts, evaluations, the start handshake, control) go through the
  job's store as pickled values under `megatron_r1/async/<key>`: every trainer rank can read a
  batch, a value waits for its reader, and neither side blocks the other by posting.
* **Weights** go over the bridge group (trainer rank 0 + every rollout rank; gloo on CPU, NCCL on
  GPU) as broadcasts, bucketed: per bucket a size header, the names/dtypes/shapes, then one flat
  byte buffer that the receivers cut into views. Before each stream the trainer posts
  `weights/<version>`, so a rollout rank only enters a broadcast that will come (and can leave
  when the trainer has stopped instead).

Waiting is never blind: every wait polls for the other side's failure (`fail` posts it) and for
the trainer's end of the run, and gives up after `parallel.timeout_minutes`. A rank that dies
outright is named by the job-wide heartbeat.

`AsyncSchedule` is the bounded-staleness contract: batch `i` is sampled with the weights after
update `i - k` (version `max(0, i - k)`), so generation of batch `i + 1 .. i + k` overlaps the update
on batch `i`; which versions cross the bridge (those a later batch or an evaluation needs) is
decided here once, for both sides.
"""

from __future__ import annotations

import base64
import dataclasses
import pickle
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron_r1 import platform
from megatron_r1.placement import Disaggregated

_PREFIX = "megatron_r1/async/"
_ERROR, _FINISHED = "error", "finished"
_ALIGN = 16  # bytes: every tensor of a bucket starts aligned, so it can be a view of the buffer


class RemoteFailure(RuntimeError):
    """The other side of the job failed or ended first; the message says which rank and why."""


@dataclasses.dataclass(frozen=True)
class AsyncSchedule:
    """Which weights sample which batch (staleness `k`), and which versions cross the bridge."""

    steps: int
    max_staleness: int
    eval_every: int = 0

    def generation_version(self, step: int) -> int:
        """The policy version (updates applied) that samples the batch of `step`."""
        return max(0, step - self.max_staleness)

    def is_eval(self, version: int) -> bool:
        return version == self.steps or bool(self.eval_every) and version % self.eval_every == 0

    def weights_needed(self, version: int) -> bool:
        """Whether the rollout side needs version `version` (1 .. steps): to sample a later batch,
        or to evaluate it."""
        return version + self.max_staleness < self.steps or self.is_eval(version)

    def versions_before(self, step: int, received: int) -> list[int]:
        """The versions the rollout side must receive, after `received`, before sampling `step`
        (`step = steps`: the ones left at the end)."""
        last = self.steps if step >= self.steps else self.generation_version(step)
        return [v for v in range(received + 1, last + 1) if self.weights_needed(v)]


class Bridge:
    """This process's end of the channel (either side)."""

    def __init__(self, job: Disaggregated, timeout_s: float, poll_s: float = 0.02) -> None:
        self.job = job
        self.role = job.role
        self.store = dist.PrefixStore(_PREFIX, job.store)
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.device = platform.device()

    # -- messages --------------------------------------------------------------------------------

    def put(self, key: str, value: Any) -> None:
        self.store.set(key, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))

    def get(self, key: str, what: str) -> Any:
        """The value posted under `key`, waiting for it (`what` names it in errors)."""
        self.wait_for(key, what)
        return pickle.loads(self.store.get(key))

    def wait_for(self, key: str, what: str) -> None:
        """Wait until `key` is posted; RemoteFailure when the other side failed or finished first."""
        deadline = time.monotonic() + self.timeout_s
        while not self.store.check([key]):
            self.raise_if_ended(what)
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {self.timeout_s:.0f}s for {what} (parallel.timeout_minutes); the other side is alive but stuck")
            time.sleep(self.poll_s)

    def raise_if_ended(self, what: str = "") -> None:
        if self.store.check([_ERROR]):
            raise RemoteFailure(pickle.loads(self.store.get(_ERROR)))
        if self.role.side == "rollout" and self.store.check([_FINISHED]):
            status = pickle.loads(self.store.get(_FINISHED))
            raise RemoteFailure(f"the trainer ended the run ({status['message']}) while this rank waited for {what}")

    def fail(self, message: str) -> None:
        """Tell the other side this process failed (best effort: the store may be gone)."""
        try:
            if not self.store.check([_ERROR]):
                self.put(_ERROR, message)
        except Exception:
            pass

    def finish(self, status: int, message: str) -> None:
        """Trainer: the run ended (0 done, 75 preempted); the rollout side leaves with the same status."""
        self.put(_FINISHED, {"status": status, "message": message})

    def finished(self) -> dict | None:
        return pickle.loads(self.store.get(_FINISHED)) if self.store.check([_FINISHED]) else None

    # -- weights ---------------------------------------------------------------------------------

    def send_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                     after: Any = None) -> dict[str, float]:
        """Trainer: stream every tensor to the rollout ranks, then the object `after`. Every trainer
        rank calls it (the producer's gathers are collective); trainer rank 0 sends."""
        from megatron_r1.rollout.weight_sync import bucketed

        sender = self.job.bridge is not None
        if sender:
            self.put(f"weights/{version}", {"version": version})
        start, sent, buckets = time.perf_counter(), 0, 0
        for bucket in bucketed(named_tensors, bucket_bytes):
            if sender:
                sent += self._send_bucket(bucket)
                buckets += 1
            bucket.clear()
        if sender:
            self._broadcast(torch.zeros(2, dtype=torch.int64, device=self.device))  # end of the stream
            self._send_object({"version": version, "after": after})
        seconds = time.perf_counter() - start
        return {"sync/seconds": seconds, "sync/buckets": float(buckets), "sync/mb_sent": sent / 2**20,
                "sync/gb_per_s": sent / max(seconds, 1e-9) / 1e9}

    def receive_weights(self, version: int) -> tuple[Iterator[tuple[str, torch.Tensor]], dict]:
        """Rollout rank: the stream of version `version`, as a lazy iterator of named tensors, and a
        dict that holds the trailing object under "after" once the iterator is exhausted."""
        self.wait_for(f"weights/{version}", f"the weights of version {version}")
        tail: dict = {}

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            while True:
                sizes = torch.zeros(2, dtype=torch.int64, device=self.device)
                self._broadcast(sizes)
                header_bytes, payload_bytes = (int(x) for x in sizes.tolist())
                if header_bytes == 0:
                    break
                header = pickle.loads(self._receive_bytes(header_bytes).cpu().numpy().tobytes())
                payload = self._receive_bytes(payload_bytes)
                for name, dtype, shape, offset, nbytes in header:
                    yield name, payload[offset : offset + nbytes].view(getattr(torch, dtype)).view(shape)
                del payload
            message = self._receive_object()
            if message["version"] != version:
                raise RuntimeError(f"expected the weights of version {version}, the trainer sent version {message['version']}")
            tail["after"] = message["after"]

        return stream(), tail

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        header, offset = [], 0
        for name, tensor in bucket:
            nbytes = tensor.numel() * tensor.element_size()
            header.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        payload = torch.empty(offset, dtype=torch.uint8, device=self.device)
        for (name, tensor), (_, _, _, start, nbytes) in zip(bucket, header):
            payload[start : start + nbytes].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
        head = _as_bytes(pickle.dumps(header), self.device)
        self._broadcast(torch.tensor([head.numel(), payload.numel()], dtype=torch.int64, device=self.device))
        self._broadcast(head)
        self._broadcast(payload)
        return payload.numel()

    def _send_object(self, obj: Any) -> None:
        data = _as_bytes(pickle.dumps(obj), self.device)
        self._broadcast(torch.tensor([data.numel()], dtype=torch.int64, device=self.device))
        self._broadcast(data)

    def _receive_object(self) -> Any:
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._broadcast(size)
        return pickle.loads(self._receive_bytes(int(size)).cpu().numpy().tobytes())

    def _receive_bytes(self, n: int) -> torch.Tensor:
        buffer = torch.empty(n, dtype=torch.uint8, device=self.device)
        self._broadcast(buffer)
        return buffer

    def _broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self.job.bridge.broadcast([tensor], opts).wait()


def pack(value: Any) -> str:
    """A message as text, for a checkpoint's JSON extra state."""
    return base64.b64encode(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).decode()


def unpack(text: str) -> Any:
    return pickle.loads(base64.b64decode(text))


def _as_bytes(data: bytes, device) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
