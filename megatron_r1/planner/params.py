"""Parameter counts from the code that builds the model.

`count_parameters` builds a probe of the model with `models.build.gpt_model` on the meta device (no
memory, under two seconds even for DeepSeek-V3): the embedding, the output layer, one decoder layer
of each kind (dense, MoE) and the MTP block, in a 1-rank layout. Each parameter is then classified
the way Megatron shards it: `tensor_model_parallel` weights split over TP (experts over the expert
TP group), expert weights over EP, the rest (norms, routers) replicated. From those classes
`rank_parameters` gives any rank's count for any TP/PP/EP layout, uneven pipeline stages included;
tests check it against the count of the real built shards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from megatron_r1.config import ModelConfig, ParallelConfig


@dataclass
class Block:
    """Parameters of one module group at TP = EP = 1, by how Megatron shards them."""

    tp_sharded: int = 0  # split over tensor-parallel ranks
    replicated: int = 0  # the same on every TP rank (norms, routers, MoE expert bias)
    expert_tp_sharded: int = 0  # all experts' weights; split over EP, then expert-TP
    expert_replicated: int = 0  # all experts' unsharded tensors; split over EP

    @property
    def total(self) -> int:
        return self.tp_sharded + self.replicated + self.expert_tp_sharded + self.expert_replicated

    def add(self, name: str, param: torch.nn.Parameter) -> None:
        sharded = bool(getattr(param, "tensor_model_parallel", False))
        if ".experts." in name:  # routed experts (shared experts are `shared_experts`, TP-sharded like an MLP)
            if sharded:
                self.expert_tp_sharded += param.numel()
            else:
                self.expert_replicated += param.numel()
        elif sharded:
            self.tp_sharded += param.numel()
        else:
            self.replicated += param.numel()

    def on_rank(self, tp: int, ep: int, etp: int) -> tuple[int, int]:
        """(non-expert, expert) parameters this block puts on one rank."""
        return self.tp_sharded // tp + self.replicated, self.expert_tp_sharded // (ep * etp) + self.expert_replicated // ep


@dataclass
class ParamCounts:
    """The whole model's parameters at TP = EP = 1, grouped so that any layout can be derived."""

    embedding: Block
    output: Block  # empty when the embedding is tied to the output layer
    final_norm: Block
    layers: list[Block]  # one per decoder layer (layers of one kind share one Block)
    mtp: Block  # multi-token prediction block (built on the last stage; reported apart)
    tied: bool = False
    moe_layers: list[bool] = field(default_factory=list)

    @property
    def total(self) -> int:
        """The main model (without MTP)."""
        return self.embedding.total + self.output.total + self.final_norm.total + sum(b.total for b in self.layers)


def count_parameters(model: ModelConfig) -> ParamCounts:
    """Build a meta-device probe of `model` (one layer per kind) and classify its parameters.

    Needs Megatron's parallel state for one rank (`distributed.init_distributed(ParallelConfig())`);
    the probe's stage owns the embedding, the output layer and the MTP block.
    """
    from megatron_r1.models.build import gpt_model, moe_layers, transformer_config

    kinds = moe_layers(model)
    first_moe = kinds.index(True) if True in kinds else None
    # Probe layers: the first dense layer (if any) and the first MoE layer (if any).
    probe_layers = sorted({i for i in (kinds.index(False) if False in kinds else None, first_moe) if i is not None})
    probe = dataclasses.replace(
        model,
        num_layers=probe_layers[-1] + 1,
        first_k_dense_layers=min(model.first_k_dense_layers, probe_layers[-1]),
    )
    config = transformer_config(probe, ParallelConfig(), check_fp8=False)
    with torch.device("meta"):
        gpt = gpt_model(config, probe)

    embedding, output, final_norm, mtp = Block(), Block(), Block(), Block()
    per_layer: dict[int, Block] = {}
    for name, param in gpt.named_parameters():
        if name.startswith("embedding."):
            embedding.add(name, param)
        elif name.startswith("output_layer."):
            output.add(name, param)
        elif name.startswith("decoder.final_layernorm."):
            final_norm.add(name, param)
        elif name.startswith("mtp."):
            mtp.add(name, param)
        elif name.startswith("decoder.layers."):
            per_layer.setdefault(int(name.split(".")[2]), Block()).add(name, param)
        else:
            raise RuntimeError(f"parameter {name!r} is not classified by the planner; extend planner/params.py")
    dense_block = per_layer.get(kinds.index(False)) if False in kinds else None
    moe_block = per_layer.get(first_moe) if first_moe is not None else None
    layers = [moe_block if is_moe else dense_block for is_moe in kinds]
    return ParamCounts(embedding, output, final_norm, layers, mtp, tied=model.tie_embeddings, moe_layers=kinds)


def active_parameters(counts: ParamCounts, model: ModelConfig) -> int:
    """Parameters used per token: every non-expert weight plus top-k of each MoE layer's routed experts."""
    if not model.num_experts:
        return counts.total
    routed = sum(b.expert_tp_sharded + b.expert_replicated for b in counts.layers)
    return counts.total - routed + routed * model.moe_router_topk // model.num_experts


@dataclass(frozen=True)
class RankParams:
    """Parameters on one rank of one pipeline stage."""

    dense: int  # sharded over TP, replicated over DP (their optimizer state splits over DP)
    expert: int  # sharded over EP x expert-TP (their optimizer state splits over expert-DP)
    layers: int  # decoder layers on this stage

    @property
    def total(self) -> int:
        return self.dense + self.expert


def rank_parameters(counts: ParamCounts, parallel: ParallelConfig, stage: int, mtp: bool = True) -> RankParams:
    """What one rank of pipeline stage `stage` holds (exactly what `build_model` builds there)."""
    tp = parallel.tensor_model_parallel_size
    ep = parallel.expert_model_parallel_size
    etp = parallel.expert_tensor_parallel_size or tp
    per_stage = parallel.layers_per_stage(len(counts.layers))
    start = sum(per_stage[:stage])
    blocks = counts.layers[start : start + per_stage[stage]]
    first, last = stage == 0, stage == len(per_stage) - 1
    if first:
        blocks = [counts.embedding, *blocks]
    if last:
        blocks = [*blocks, counts.final_norm, counts.output if not counts.tied else Block()]
        if counts.tied and not first:  # the last stage keeps its own copy of the tied embedding
            blocks.append(counts.embedding)
        if mtp:
            blocks.append(counts.mtp)
    dense = expert = 0
    for block in blocks:
        d, e = block.on_rank(tp, ep, etp)
        dense, expert = dense + d, expert + e
    return RankParams(dense=dense, expert=expert, layers=per_stage[stage])
