"""MoE routing in the trainer: replay (R2/R3) and the health of the routers.

Why replay. A token's top-k experts are a discrete choice: the engine (other kernels, other
precision) and the trainer can pick different experts for the same token, and the policy moves
between the old-logprob pass and later mini-batches (the aux-loss-free bias changes after every
optimizer step). Where the choice flips, the probability ratio of that token is no longer about the
policy's distribution, and on MoE models such tokens make the ratio explode.

* `r2` records the routing of the trainer's own old-logprob forward and replays it in every update's
  forward (and backward recompute): the ratio is exactly 1 at the first update, and every mini-batch
  keeps the routing the old policy chose.
* `r3` replays the routing the engine chose while sampling (vLLM's `routed_experts`), in the
  old-logprob pass and in the updates: the trainer differentiates the very computation that sampled.

Both drive Megatron-Core's own `RouterReplay` slot in each `TopKRouter` (built when
`TransformerConfig.moe_enable_routing_replay` is set; `models.build` sets it for every MoE model, so
a slot costs nothing until an action is set). We address the routers of one model at a time (the
policy's, never the reference's) instead of Megatron's process-wide list of every slot ever built.

Layouts. The trainer's hidden states are `[S, b, H]`; a router sees `[S * b, H]` (sequence-major),
or this tensor-parallel rank's `S / TP` slice under sequence parallelism. A batch carries routing as
`[B, S, L, k]` (`train.step.Batch.routing`): L the MoE layers of this pipeline stage, in layer order,
expert ids global (expert parallelism shards the experts, not the router's choice).

Health (`RouterHealth`): per MoE layer, how unevenly the update's tokens fell on the experts
(`max / mean` tokens per expert, padding excluded), the norm and the per-step change of the
aux-loss-free bias, and, when a pass replays routing, the share of (token, layer) choices where the
trainer's own top-k differs from the replayed one (engine vs trainer for r3, old vs current policy
for r2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.router_replay import RouterReplayAction
from megatron.core.utils import get_model_config

from megatron_r1 import platform

Tensor = torch.Tensor

_REPLAYING = (RouterReplayAction.REPLAY_FORWARD, RouterReplayAction.REPLAY_BACKWARD)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def moe_routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(0-based decoder layer number, router) of this pipeline stage's MoE layers, in layer order
    (the multi-token-prediction layers are not included: the engine never runs them)."""
    gpt = _unwrap(model)
    decoder = getattr(gpt, "decoder", None)
    if decoder is None:
        return []
    routers = []
    for layer in decoder.layers:
        router = getattr(getattr(layer, "mlp", None), "router", None)
        if router is not None:
            routers.append((layer.layer_number - 1, router))
    return routers


def _replaying_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """This stage's MoE routers, each with its replay slot and the direction hook installed."""
    routers = []
    for number, router in moe_routers(model):
        if router.router_replay is None:
            raise RuntimeError(f"MoE layer {number} was built without a routing-replay slot (TransformerConfig.moe_enable_routing_replay)")
        _install_direction_hook(router)
        routers.append(router)
    return routers


def _install_direction_hook(router: torch.nn.Module) -> None:
    """A replayed forward that runs again inside backward (activation recompute) must take the
    routing of *its* micro-batch: Megatron keeps one queue per slot for that (REPLAY_BACKWARD pops
    the targets in the order they were set, which is the order 1F1B runs backwards in). The hook
    picks the direction from whether autograd is running a backward pass, and, when a
    `RouterHealth` is comparing, counts the tokens whose own choice differs from the replayed one."""
    if getattr(router, "_r1_replay_hook", False):
        return

    def choose(module, args):
        slot = module.router_replay
        if slot is None or slot.router_replay_action not in _REPLAYING:
            return
        in_backward = torch._C._current_graph_task_id() != -1
        slot.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD if in_backward else RouterReplayAction.REPLAY_FORWARD)
        tally = getattr(module, "_r1_tally", None)
        if tally is not None and not in_backward:
            _count_disagreement(module, args[0], slot.target_topk_idx, tally)

    router.register_forward_pre_hook(choose)
    router._r1_replay_hook = True
    router._r1_tally = None
    router._r1_valid = None


@torch.no_grad()
def _count_disagreement(router: torch.nn.Module, hidden: Tensor, target: Tensor, tally: Tensor) -> None:
    """Add (real tokens whose own top-k set differs from `target`, real tokens) to `tally`. Costs
    one router GEMM: the experts never run twice."""
    slot = router.router_replay
    action, slot.router_replay_action = slot.router_replay_action, None  # the router's own choice
    try:
        _, own = router.routing(router.gating(hidden))  # [tokens, experts] bool
    finally:
        slot.router_replay_action = action
    wanted = torch.zeros_like(own).scatter_(1, target.to(own.device), True)
    differs = (own != wanted).any(-1)
    valid = router._r1_valid
    valid = torch.ones_like(differs) if valid is None else valid.to(differs.device)
    tally += torch.tensor([float((differs & valid).sum()), float(valid.sum())], dtype=torch.float64)


def _sequence_parallel(model: torch.nn.Module) -> bool:
    return bool(get_model_config(model).sequence_parallel)


def _local_tokens(per_sequence: Tensor, sequence_parallel: bool) -> Tensor:
    """[b, S, ...] -> the `[S_local * b, ...]` rows this rank's router sees (sequence-major)."""
    per_token = per_sequence.transpose(0, 1)  # [S, b, ...]
    if sequence_parallel:
        tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
        per_token = per_token.chunk(tp, dim=0)[rank]
    return per_token.reshape(-1, *per_token.shape[2:])


def replay(model: torch.nn.Module, routing: Tensor, real_tokens: Tensor | None = None) -> None:
    """Make the next forward of `model` (and its backward recompute) use `routing` `[b, S, L, k]`
    (`real_tokens` `[b, S]` bool: the positions a disagreement count looks at; None: all)."""
    routers, sp = _replaying_routers(model), _sequence_parallel(model)
    if routing.shape[2] != len(routers):
        raise ValueError(f"routing has {routing.shape[2]} MoE layers, this pipeline stage has {len(routers)}")
    device = next(_unwrap(model).parameters()).device
    valid = None if real_tokens is None else _local_tokens(real_tokens.bool(), sp).to(device)
    for j, router in enumerate(routers):
        router.router_replay.set_target_indices(_local_tokens(routing[:, :, j], sp).to(device, torch.long))
        router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        router._r1_valid = valid


def record(model: torch.nn.Module) -> None:
    """Make the next forwards of `model` record their routing (read it with `recorded`)."""
    for router in _replaying_routers(model):
        router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)


def recorded(model: torch.nn.Module, batch: int, seq_len: int) -> Tensor:
    """The routing the last forward of `model` chose, `[b, S, L, k]` int16 on the host (all of the
    sequence: the tensor-parallel slices of sequence parallelism are gathered)."""
    sp, layers = _sequence_parallel(model), []
    for router in _replaying_routers(model):
        rows = router.router_replay.get_recorded_indices()
        if rows is None:
            raise RuntimeError("no routing was recorded: call moe_routing.record before the forward")
        per_token = rows.view(-1, batch, rows.shape[-1])  # [S_local, b, k]
        if sp:
            group = parallel_state.get_tensor_model_parallel_group()
            parts = [torch.empty_like(per_token) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, per_token.contiguous(), group=group)
            per_token = torch.cat(parts, dim=0)
        layers.append(per_token[:seq_len].transpose(0, 1).to("cpu", torch.int16))
    return torch.stack(layers, dim=2)


@contextlib.contextmanager
def cleared_after(model: torch.nn.Module, replaying: bool = True) -> Iterator[None]:
    """Within: passes may replay; after: the routers choose again and no index stays queued."""
    try:
        yield
    finally:
        if replaying:
            stop(model)


def stop(model: torch.nn.Module) -> None:
    """Back to the routers' own choice; drop every recorded and queued index."""
    for _, router in moe_routers(model):
        slot = router.router_replay
        if slot is not None:
            slot.clear_router_replay_action()
            slot.clear_indices()
        router._r1_valid = None


# --------------------------------------------------------------------------------------------
# The engine's routing (rollout/vllm_engine.py maps vLLM's layers to the MoE layers), in the trainer's layout.


def pad_routes(k: int) -> Tensor:
    """The routing given to positions no real token sees (right padding): experts 0..k-1."""
    return torch.arange(k, dtype=torch.int16)


def stage_moe_indices(moe_layer_numbers: list[int], stage_layer_numbers: list[int]) -> list[int]:
    """Positions of this pipeline stage's MoE layers in the model's list of MoE layers."""
    return [moe_layer_numbers.index(n) for n in stage_layer_numbers]


# --------------------------------------------------------------------------------------------
# Health.


class RouterHealth:
    """Per-step MoE metrics of one model: expert load, the aux-loss-free bias, routing agreement.

    Everything is read inside `finalize_model_grads` (`wrap_finalize`), where the model is on its
    device whatever the memory swap does between rollouts: each router's token counts (Megatron
    counts tokens per expert in training forwards, padding excluded when the forward gets a padding
    mask as `train.step` gives it, and zeroes them there when it updates the bias) and the bias before
    the step's first update and after its last.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.routers = moe_routers(model)
        self._mismatch = torch.zeros(2, dtype=torch.float64)  # (token, layer) choices that differ, compared
        self.begin_step()

    @property
    def active(self) -> bool:
        return bool(self.routers)

    def begin_step(self) -> None:
        self._load: list[Tensor | None] = [None] * len(self.routers)
        self._bias_before: list[Tensor | None] | None = None
        self._bias_after: list[Tensor | None] | None = None
        self._mismatch.zero_()

    def _biases(self) -> list[Tensor | None]:
        return [None if r.expert_bias is None else r.expert_bias.detach().double().cpu().clone() for _, r in self.routers]

    def wrap_finalize(self, finalize):
        """`finalize_model_grads` that keeps each router's token counts and bias around Megatron's update."""
        health = self

        def finalize_keeping_counts(*args, **kwargs):
            if health._bias_before is None:
                health._bias_before = health._biases()
            for i, (_, router) in enumerate(health.routers):
                counts = getattr(router, "local_tokens_per_expert", None)
                if counts is not None:
                    counts = counts.detach().double().cpu()
                    health._load[i] = counts if health._load[i] is None else health._load[i] + counts
            out = finalize(*args, **kwargs)
            health._bias_after = health._biases()
            return out

        return finalize_keeping_counts

    @contextlib.contextmanager
    def comparing(self) -> Iterator[None]:
        """Within: forwards that replay routing also count the (real token, MoE layer) choices where
        this model's own routers, now, would pick another top-k set."""
        for _, router in self.routers:
            _install_direction_hook(router)
            router._r1_tally = self._mismatch
        try:
            yield
        finally:
            for _, router in self.routers:
                router._r1_tally = None

    def metrics(self) -> dict[str, float]:
        """The step's metrics, the same on every rank (reduced over the data-parallel ranks and
        gathered over pipeline stages); empty for a dense model."""
        if not self.active:
            return {}
        local: dict[str, float] = {}
        dp_group, dp = parallel_state.get_data_parallel_group(), parallel_state.get_data_parallel_world_size()
        for i, (number, router) in enumerate(self.routers):
            load = self._load[i] if self._load[i] is not None else torch.zeros(router.config.num_moe_experts, dtype=torch.float64)
            if dp > 1:  # counts are this rank's tokens: sum over the data-parallel ranks (on the collective's device)
                load = load.to(platform.device())
                dist.all_reduce(load, group=dp_group)
                load = load.cpu()
            mean = load.mean().item()
            if mean > 0:
                local[f"moe/layer{number}/load_max_over_mean"] = load.max().item() / mean
                local[f"moe/layer{number}/load_min_over_mean"] = load.min().item() / mean
            after = self._bias_after[i] if self._bias_after is not None else None
            if after is not None:
                local[f"moe/layer{number}/bias_norm"] = after.norm().item()
                before = self._bias_before[i]
                local[f"moe/layer{number}/bias_change"] = (after - before).norm().item()
        mismatch = self._mismatch.to(platform.device())
        if dp > 1:
            dist.all_reduce(mismatch, group=dp_group)
        rows = [local]
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            group = parallel_state.get_pipeline_model_parallel_group()
            rows = [None] * dist.get_world_size(group)
            dist.all_gather_object(rows, local, group=group)
            dist.all_reduce(mismatch, group=group)
        out: dict[str, float] = {}
        for row in rows:
            out.update(row)
        for key in ("load_max_over_mean", "bias_change"):
            values = [v for k, v in out.items() if k.endswith("/" + key)]
            if values:
                out[f"moe/{key}"] = max(values)  # the worst layer, for the plot and the guards
        mismatch = mismatch.cpu()
        if mismatch[1] > 0:  # share of (real token, MoE layer) choices where the replayed top-k is not the trainer's own
            out["moe/routing_mismatch"] = (mismatch[0] / mismatch[1]).item()
        return out
