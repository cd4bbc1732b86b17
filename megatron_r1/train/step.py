"""Megatron forward/backward over micro-batches: the one implementation behind pretraining, SFT and RL.

Data layout. A `Batch` holds right-padded sequences `tokens [B, S]` and a token-aligned
`loss_mask [B, S]` (1 on the tokens the model is trained to predict, e.g. the response). The model
predicts token t+1 from tokens[:t+1], so losses work on *targets* `tokens[:, 1:]` and on
target-aligned tensors of width S-1: `logprobs[:, t] = log p(tokens[:, t+1] | tokens[:, :t+1])`,
the layout `compute_logprobs` returns (and so the layout of old/ref logprobs).

Loss normalisation (the convention every `loss_fn` follows):

* A `loss_fn(logprobs, entropy, micro) -> (loss, metrics)` is called once per micro-batch and
  returns that micro-batch's *share* of the whole batch's loss: it divides by a denominator of the
  whole batch, `micro.num_tokens` (masked targets) or `micro.num_sequences`, never by a count of
  its own micro-batch. Summed over micro-batches, the shares are the full-batch loss, so neither
  the loss nor the gradient depends on `micro_batch_size`.
* Megatron's schedules divide a `(loss, metrics)` return by the number of micro-batches (their
  legacy "mean over micro-batches" mode; the `(loss, num_tokens, metrics)` mode would divide by the
  micro-batch's own token count instead). We hand Megatron `loss * num_microbatches`, so its
  division cancels and the gradient is exactly that of the sum of the shares.
* Data parallelism: each DP rank runs its own `Batch`, and Megatron's DDP *averages* gradients over
  the DP group. So that the average is the global token mean (and not a mean of per-rank means),
  `micro.num_tokens` and `micro.num_sequences` are the counts over *all* DP ranks divided by the DP
  size. With DP = 1 they are simply the batch's counts.
* Metrics are different: each value in `metrics` is a plain mean over the micro-batch (e.g. the
  clip fraction of its masked targets). `forward_backward` averages them over micro-batches and DP
  ranks weighted by masked-target counts, which makes a per-token mean exact for the whole batch.
  The reported `loss` is the sum of the shares, averaged over DP ranks: the global loss.

Every rank returns the same metrics (the last pipeline stage computes them; they are broadcast).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.utils import get_model_config

from megatron_r1 import platform
from megatron_r1.distributed import even_bounds
from megatron_r1.config import ConfigError
from megatron_r1.train import moe_routing
from megatron_r1.train.packed import PackedRows, pack_rows
from megatron_r1.train.optim import current_lr

Tensor = torch.Tensor


@dataclass
class Batch:
    """Right-padded sequences and what the loss needs about them (this data-parallel rank's part).

    Per-token tensors (`old_logprobs`, `ref_logprobs`, 2-D `extras`) are target-aligned `[B, S-1]`,
    as `compute_logprobs` returns them; a token-aligned `[B, S]` one (value t belongs to
    tokens[:, t]) is shifted to the targets before the loss sees it. `extras` holds anything else
    a custom loss needs, per sequence `[B]` or per token.
    """

    tokens: Tensor  # [B, S] int64
    loss_mask: Tensor  # [B, S], 1 on tokens that are predicted (token-aligned)
    advantages: Tensor | None = None  # [B] per sequence (GRPO)
    old_logprobs: Tensor | None = None  # [B, S-1] log-probs of the policy that sampled (off-policy ratio)
    ref_logprobs: Tensor | None = None  # [B, S-1] log-probs of the reference model (KL penalty)
    extras: dict[str, Tensor] = field(default_factory=dict)
    segment_ids: Tensor | None = None  # [B, S] packed rows: document number of each token (1, 2, ...; 0: padding)
    # [B, S, L, k] MoE routing to replay (R2/R3, `train.moe_routing`): for each token, the top-k experts
    # of each MoE layer of this pipeline stage. Token-aligned: never shifted to the targets.
    routing: Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"Batch.tokens must be [B, S], got shape {tuple(self.tokens.shape)}")
        if self.loss_mask.shape != self.tokens.shape:
            raise ValueError(f"Batch.loss_mask {tuple(self.loss_mask.shape)} must match tokens {tuple(self.tokens.shape)}")
        if self.tokens.shape[1] < 2:
            raise ValueError("sequences need at least 2 tokens (one input, one target)")
        if self.segment_ids is not None and self.segment_ids.shape != self.tokens.shape:
            raise ValueError(f"Batch.segment_ids {tuple(self.segment_ids.shape)} must match tokens {tuple(self.tokens.shape)}")
        if self.routing is not None and (self.routing.dim() != 4 or self.routing.shape[:2] != self.tokens.shape):
            raise ValueError(f"Batch.routing {tuple(self.routing.shape)} must be [B, S, layers, top-k] with [B, S] = {tuple(self.tokens.shape)}")
        for name, value in self._row_tensors().items():
            if value.shape[0] != self.tokens.shape[0]:
                raise ValueError(f"Batch.{name} has {value.shape[0]} rows, tokens have {self.tokens.shape[0]}")

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def _row_tensors(self) -> dict[str, Tensor]:
        """Every per-sequence/per-token tensor (not the tokens and mask), by name."""
        named = {f: getattr(self, f) for f in ("advantages", "old_logprobs", "ref_logprobs")}
        named.update({f"extras[{k!r}]": v for k, v in self.extras.items()})
        return {k: v for k, v in named.items() if v is not None}

    def rows(self, index: slice | Tensor) -> Batch:
        """The sequences `index` (a slice or a tensor of row numbers) selects, with everything that belongs to them."""

        def pick(value):
            return None if value is None else value[index]

        return replace(
            self,
            tokens=self.tokens[index],
            loss_mask=self.loss_mask[index],
            advantages=pick(self.advantages),
            old_logprobs=pick(self.old_logprobs),
            ref_logprobs=pick(self.ref_logprobs),
            extras={k: v[index] for k, v in self.extras.items()},
            segment_ids=pick(self.segment_ids),
            routing=pick(self.routing),
        )

    def columns(self, width: int) -> Batch:
        """The first `width` positions of every row (per-token tensors cut alike: token-aligned to
        `width`, target-aligned to `width - 1`; per-sequence ones untouched)."""
        if width >= self.seq_len:
            return self
        S = self.seq_len

        def cut(value):
            if value is None or value.dim() < 2:
                return value
            return value[:, : width - (S - value.shape[1])]

        return replace(
            self,
            tokens=self.tokens[:, :width],
            loss_mask=self.loss_mask[:, :width],
            old_logprobs=cut(self.old_logprobs),
            ref_logprobs=cut(self.ref_logprobs),
            extras={k: cut(v) for k, v in self.extras.items()},
            segment_ids=cut(self.segment_ids),
            routing=cut(self.routing),
        )

    def split(self, parts: int) -> list[Batch]:
        """`parts` contiguous mini-batches of near-equal size (e.g. PPO-style updates per rollout)."""
        bounds = torch.linspace(0, self.size, parts + 1).round().long().tolist()
        return [self.rows(slice(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]


@dataclass
class MicroBatch(Batch):
    """What a loss function sees: one micro-batch (on the compute device) and whole-batch denominators.

    Per-token fields are target-aligned `[b, S-1]`; `loss_mask` stays token-aligned like the
    `Batch`'s, and `mask` is its target-aligned float view.
    """

    num_tokens: float = 1.0  # masked targets in the whole batch (summed over DP ranks, / DP size)
    num_sequences: float = 1.0  # sequences in the whole batch (summed over DP ranks, / DP size)
    thd: PackedRows | None = None  # the same rows packed end to end for TE's fused attention (GPU; train/packed.py)

    @property
    def targets(self) -> Tensor:
        """[b, S-1]: the token each position predicts."""
        return self.tokens[:, 1:]

    @property
    def mask(self) -> Tensor:
        """[b, S-1] float: 1 where the target is trained on."""
        return self.loss_mask[:, 1:].float()


LossFn = Callable[[Tensor, Tensor | None, MicroBatch], tuple[Tensor, dict[str, Tensor | float]]]


# --------------------------------------------------------------------------------------------
# Vocab-parallel log-probabilities and entropy.


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) from vocab-parallel logits `[..., V/TP]`; exact under tensor parallelism.

    Megatron's `vocab_parallel_cross_entropy` (= -logprob) all-reduces the max and the sum of
    exponentials over the TP group. It works in place on an fp32 copy, so `logits` is untouched.
    """
    work = logits.clone() if logits.dtype == torch.float32 else logits.float()
    return -tensor_parallel.vocab_parallel_cross_entropy(work, targets)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of the full softmax from vocab-parallel logits `[..., V/TP]` -> `[...]`, differentiable.

    H = log Z - sum_i p_i z_i with z = logits - max; the max and both sums run over the TP group.
    """
    z = logits.float()
    group = parallel_state.get_tensor_model_parallel_group()
    max_z = z.detach().amax(dim=-1, keepdim=True)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(max_z, op=dist.ReduceOp.MAX, group=group)
    z = z - max_z  # a constant shift: no gradient needed through the max
    exp_z = z.exp()
    # Each rank holds part of the vocabulary: sum the partial sums (identity in the backward pass,
    # since every TP rank computes the same downstream loss from the reduced value).
    sum_exp = reduce_from_tensor_model_parallel_region(exp_z.sum(dim=-1), group)
    sum_exp_z = reduce_from_tensor_model_parallel_region((exp_z * z).sum(dim=-1), group)
    return sum_exp.log() - sum_exp_z / sum_exp


# --------------------------------------------------------------------------------------------
# Micro-batches.


def _num_microbatches(batch_size: int, micro_batch_size: int) -> int:
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    micro_batch_size = min(micro_batch_size, batch_size)
    n = -(-batch_size // micro_batch_size)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1 and batch_size % micro_batch_size:
        # Pipeline stages exchange activations of a fixed [S, micro_batch_size, hidden] shape.
        raise ValueError(
            f"with pipeline parallelism the batch ({batch_size}) must split evenly into micro-batches of {micro_batch_size}"
        )
    return n


def data_parallel_share(n: int, fix: str = "use a larger batch") -> slice:
    """The rows of an `n`-row batch this trainer data-parallel rank trains on (contiguous,
    near-equal; the loss denominators are global, so the split does not change the gradient)."""
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    if n < dp:
        raise ValueError(f"a batch of {n} rows cannot feed {dp} data-parallel ranks; {fix}")
    return slice(*even_bounds(n, dp, rank))


def _dp_mean_denominators(batch: Batch) -> tuple[float, float]:
    """Whole-batch masked-target and sequence counts, summed over DP ranks and divided by DP size."""
    counts = torch.tensor(
        [float(batch.loss_mask[:, 1:].sum()), float(batch.size)], dtype=torch.float64, device=platform.device()
    )
    dp = parallel_state.get_data_parallel_world_size()
    if dp > 1:
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        counts /= dp
    return max(counts[0].item(), 1e-8), counts[1].item()


def _to_targets(value: Tensor | None, seq_len: int, device: torch.device) -> Tensor | None:
    """Move to the device; shift a token-aligned per-token tensor [b, S] to the targets [b, S-1]."""
    if value is None:
        return None
    if value.dim() >= 2 and value.shape[1] == seq_len:
        value = value[:, 1:]
    return value.to(device)


def _micro_batches(parts: list[Batch], num_tokens: float, num_sequences: float, thd_multiple: int = 0) -> Iterator[MicroBatch]:
    """The parts on the compute device; with `thd_multiple`, each also packed (`train/packed.py`, padded to that multiple)."""
    device = platform.device()
    for part in parts:
        S = part.seq_len
        thd = None
        if thd_multiple:
            segments = None if part.segment_ids is None else part.segment_ids.to(device)
            thd = pack_rows(part.tokens.to(device, torch.long), needed_widths(part.loss_mask), segments, thd_multiple)
        yield MicroBatch(
            tokens=part.tokens.to(device, torch.long),
            loss_mask=part.loss_mask.to(device),
            advantages=_to_targets(part.advantages, S, device),
            old_logprobs=_to_targets(part.old_logprobs, S, device),
            ref_logprobs=_to_targets(part.ref_logprobs, S, device),
            extras={k: _to_targets(v, S, device) for k, v in part.extras.items()},
            segment_ids=None if part.segment_ids is None else part.segment_ids.to(device),
            routing=part.routing,  # stays on the host: `moe_routing.replay` cuts this rank's tokens out of it
            num_tokens=num_tokens,
            num_sequences=num_sequences,
            thd=thd,
        )


def packs_sequences(batch: Batch, max_tokens: int) -> bool:
    """Whether the training step packs micro-batches (`thd`): with Transformer Engine on a GPU, for a token
    budget or rows that hold several documents (SFT packing), unless MoE routing is replayed (its
    `[b, S, layers, k]` routes follow the bucketed layout). Elsewhere the rows stay bucketed."""
    return (platform.has_transformer_engine() and platform.device().type == "cuda" and batch.routing is None
            and (max_tokens > 0 or batch.segment_ids is not None))


def _fixed_parts(batch: Batch, micro_batch_size: int) -> list[Batch]:
    """Consecutive micro-batches of `micro_batch_size` rows, each as wide as the whole batch."""
    return [batch.rows(slice(start, start + micro_batch_size)) for start in range(0, batch.size, micro_batch_size)]


def needed_widths(loss_mask: Tensor) -> Tensor:
    """[B] int: the columns each row needs for its loss, its last trained position + 1 (at least 2).
    Causal attention never lets a trained token see a later position, so everything after it can
    be cut without changing a logprob, a value or a gradient."""
    last, any_trained = _last_trained(loss_mask)
    return torch.where(any_trained, last + 1, torch.full_like(last, 2)).clamp(min=2)


def _last_trained(loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """[b] index of each row's last trained position (0 when it has none), [b] whether it has one."""
    trained = loss_mask > 0
    return trained.shape[1] - 1 - trained.flip(1).int().argmax(dim=1), trained.any(dim=1)


def token_budget_plan(widths: list[int], max_tokens: int, rows_per_unit: int = 1, multiple: int = 1,
                      packed: bool = False) -> list[list[int]]:
    """Row indices of each micro-batch under a token budget. Units of `rows_per_unit` consecutive rows
    (a reward model's chosen/rejected pair stays together) are sorted longest first and cut into runs,
    one micro-batch each, of at most `max_tokens` positions (a unit wider than that gets one of its own).
    Bucketed (CPU), a run is as wide as its first unit (rounded up to `multiple`), so it holds rows x that
    width; packed (`thd`, GPU), it holds the sum of its rows' widths. Of all such cuts, the one with the
    fewest positions is chosen, counting each micro-batch as `_MICRO_BATCH_COST` of the budget more (its
    fixed cost: launches, the weights read once more): long rows do not carry short ones at their width,
    and short rows are not split into needlessly many micro-batches."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if len(widths) % rows_per_unit:
        raise ValueError(f"{len(widths)} rows do not form units of {rows_per_unit}")
    units = [list(range(i, i + rows_per_unit)) for i in range(0, len(widths), rows_per_unit)]
    order = sorted(range(len(units)), key=lambda u: -max(widths[r] for r in units[u]))  # stable for equal widths
    width = [-(-max(widths[r] for r in units[u]) // multiple) * multiple for u in order]
    real = [0]
    for u in order:
        real.append(real[-1] + sum(widths[r] for r in units[u]))
    overhead = _MICRO_BATCH_COST * max_tokens
    # cost[j]: the cheapest cut of the first j units; start[j]: where its last run begins.
    n = len(order)
    cost, start = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for i in range(n):  # a run starting at unit i
        for j in range(i + 1, n + 1):
            held = real[j] - real[i] if packed else (j - i) * rows_per_unit * width[i]
            if held > max_tokens and j > i + 1:
                break
            if cost[i] + held + overhead < cost[j]:
                cost[j], start[j] = cost[i] + held + overhead, i
    plan, j = [], n
    while j > 0:
        i = start[j]
        plan.append([r for u in order[i:j] for r in units[u]])
        j = i
    return plan[::-1]


# The fixed cost of one more micro-batch, as a share of the token budget (`token_budget_plan`).
_MICRO_BATCH_COST = 0.1


def _budget_parts(batch: Batch, max_tokens: int, rows_per_unit: int, multiple: int, packed: bool) -> list[Batch]:
    """Micro-batches under a token budget (`token_budget_plan`), each cut to the columns its rows need."""
    widths = needed_widths(batch.loss_mask).tolist()
    parts = []
    for rows in token_budget_plan(widths, max_tokens, rows_per_unit, multiple, packed):
        width = min(batch.seq_len, -(-max(widths[r] for r in rows) // multiple) * multiple)
        parts.append(batch.rows(torch.tensor(rows)).columns(width))
    return parts


def _check_token_budget(max_tokens: int) -> None:
    """Micro-batches of varying shape: pipeline stages and expert groups exchange one fixed shape
    (the config refuses the combination at load; this guards direct callers)."""
    if max_tokens > 0 and (parallel_state.get_pipeline_model_parallel_world_size() > 1
                           or parallel_state.get_expert_model_parallel_world_size() > 1):
        raise ValueError("a token budget per micro-batch needs pipeline and expert parallel size 1")


def _sequence_multiple(config) -> int:
    """What the sequence length must be a multiple of: under sequence parallelism Megatron cuts it
    over the TP ranks, and FP8 GEMMs need Megatron's alignment for the recipe (16; 32 for MXFP8)."""
    multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
    if getattr(config, "fp8", None):
        from megatron.core.fp8_utils import get_fp8_align_size

        multiple *= get_fp8_align_size(config.fp8_recipe)
    return multiple


def padded_to_multiple(batch: Batch, multiple: int, at_least: int = 0) -> Batch:
    """`batch` with trailing padding columns (token 0, loss mask 0) up to a multiple of `multiple`
    (and to at least `at_least` columns). Causal attention never lets a real token see them, so
    logprobs and losses are unchanged."""
    width = max(batch.seq_len, at_least)
    extra = width - batch.seq_len + (-width) % multiple
    if extra == 0:
        return batch

    def pad(value: Tensor | None) -> Tensor | None:
        if value is None or value.dim() < 2:
            return value
        return torch.nn.functional.pad(value, (0, 0) * (value.dim() - 2) + (0, extra))

    routing = pad(batch.routing)
    if routing is not None:
        routing[:, batch.seq_len :] = moe_routing.pad_routes(routing.shape[-1])
    return replace(
        batch,
        tokens=pad(batch.tokens),
        loss_mask=pad(batch.loss_mask),
        old_logprobs=pad(batch.old_logprobs),
        ref_logprobs=pad(batch.ref_logprobs),
        extras={k: pad(v) for k, v in batch.extras.items()},
        segment_ids=pad(batch.segment_ids),  # padding is document 0
        routing=routing,
    )


def _expert_parallel_shape(batch: Batch) -> int:
    """With expert parallelism every MoE layer exchanges tokens between the ranks of an expert group
    (Megatron's dispatchers gather equal-sized token blocks), and those ranks hold different
    data-parallel batches: they must run the same number of micro-batches of the same shape. Returns
    the sequence width all of them pad to (the widest), after checking the row counts agree."""
    if parallel_state.get_expert_model_parallel_world_size() <= 1:
        return 0
    shape = torch.tensor([batch.seq_len, batch.size, -batch.size], dtype=torch.long, device=platform.device())
    dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
    if shape[1] != -shape[2]:
        raise ConfigError(
            f"with expert parallelism every data-parallel rank needs the same number of sequences (here {-int(shape[2])} to {int(shape[1])}); "
            "make the batch (grpo.prompts_per_step x rollout.n_samples_per_prompt) a multiple of the data-parallel size"
        )
    return int(shape[0])


def packed_attention(segment_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(position ids, attention mask) of packed rows: each document attends causally to itself only.

    Positions restart at 0 in every document. The mask is `[b, 1, S, S]` boolean in Megatron's
    convention (True hides the key). Rotary embeddings depend only on the distance between query
    and key, and the mask keeps every pair inside one document, so a packed document gets the
    logits it would get alone (up to float rounding of the larger rotation angles).
    """
    b, S = segment_ids.shape
    index = torch.arange(S, device=segment_ids.device).expand(b, S)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    causal = torch.ones(S, S, dtype=torch.bool, device=segment_ids.device).tril()
    return index - first, ~(same & causal).unsqueeze(1)


def padding_after_last_target(loss_mask: Tensor) -> Tensor:
    """[b, S] True on the positions after a row's last trained token: right padding, which no
    trained token sees (a row with no trained token keeps every position)."""
    last, any_trained = _last_trained(loss_mask)
    return (torch.arange(loss_mask.shape[1], device=loss_mask.device) > last.unsqueeze(1)) & any_trained.unsqueeze(1)


def _forward(model: torch.nn.Module, tokens: Tensor, segment_ids: Tensor | None = None, micro: MicroBatch | None = None,
             training: bool = False) -> Tensor:
    """Logits `[b, S, V/TP]` on the last pipeline stage, hidden states (sent onward) elsewhere.

    MoE models: a micro-batch's `routing` is replayed (`train.moe_routing`); a training forward
    tells the routers which positions are padding, so that the expert load the aux-loss-free bias
    balances counts real tokens only."""
    kwargs = {}
    packed = micro.thd if micro is not None else None
    if micro is not None and get_model_config(model).num_moe_experts:
        if micro.routing is not None:
            moe_routing.replay(model, micro.routing, micro.loss_mask > 0)
        if training:
            padding = padding_after_last_target(micro.loss_mask) if packed is None else packed.padding
            if get_model_config(model).sequence_parallel and not parallel_state.is_pipeline_first_stage(ignore_virtual=True):
                # Megatron cuts the mask to this rank's sequence-parallel slice on the first stage only.
                tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
                padding = padding.chunk(tp, dim=1)[rank].contiguous()
            kwargs["padding_mask"] = padding
    if packed is not None:  # one row of sequences end to end; TE's attention keeps each to itself
        return model(packed.tokens, packed.position_ids, attention_mask=None, packed_seq_params=packed.params, **kwargs)
    if segment_ids is not None:
        if platform.has_transformer_engine():
            # TE's causal attention ignores a dense mask; packed rows there need THD `packed_seq_params`.
            raise ConfigError("packed rows with Transformer Engine go through the thd layout (train/packed.py), which this call did not use")
        position_ids, mask = packed_attention(segment_ids)
        return model(tokens, position_ids, attention_mask=mask, **kwargs)
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    # No attention mask: the batch is right-padded, so causal attention never lets a real token see padding.
    return model(tokens, position_ids, attention_mask=None, **kwargs)


# --------------------------------------------------------------------------------------------
# Forward/backward.

_WEIGHT, _LOSS = "__weight__", "loss"  # keys of the per-micro-batch records Megatron collects for us


def forward_backward(
    ddp_model: torch.nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    micro_batch_size: int,
    forward_only: bool = False,
    with_entropy: bool = False,
    head: str = "lm",
    max_tokens: int = 0,
    rows_per_unit: int = 1,
) -> dict[str, float]:
    """Run `loss_fn` over `batch` in micro-batches; accumulate gradients (unless `forward_only`).

    Micro-batches: `micro_batch_size` consecutive rows each, as wide as the batch; or, with
    `max_tokens > 0` (`memory.max_tokens_per_microbatch`), rows sorted longest first and grouped
    under that many tokens, each micro-batch cut to its longest row (`token_budget_plan`; units of
    `rows_per_unit` rows stay together). The losses divide by whole-batch denominators, so the
    gradient is the same either way; only the padding the forward and backward run on differs.

    `head="lm"`: the loss_fn gets target log-probabilities `[b, S-1]` (the contract above).
    `head="value"`: a reward model's per-token scalars `[b, S]` instead (`models.reward_model`),
    token-aligned, and no entropy.

    Gradients land in the DDP buffers and are reduced over data-parallel ranks after the last
    micro-batch, so call this once per optimizer step (after `zero_grad_buffer`), as `train_step` does.
    `with_entropy` computes the per-target entropy for the loss (bonus or metric); else it is None.
    Returns the loss_fn's metrics (token-weighted means over the batch and DP ranks), `loss` (the
    whole-batch loss), `num_tokens` (masked targets over all DP ranks), `sequence_tokens` (positions up
    to each row's last trained token, over all DP ranks: the real tokens) and `padding_share` (the share
    of the positions the model ran on that are not real tokens).
    """
    config = get_model_config(ddp_model)
    if parallel_state.get_context_parallel_world_size() != 1:
        raise ValueError("parallel.context_parallel_size > 1 is not supported by the training step (the batch would need splitting along the sequence); set it to 1")
    if config.calculate_per_token_loss:
        raise ValueError("set calculate_per_token_loss=False: losses arrive already normalised (see module docstring)")
    _check_token_budget(max_tokens)
    multiple = _sequence_multiple(config)
    batch = padded_to_multiple(batch, multiple, _expert_parallel_shape(batch))
    thd_multiple = multiple if packs_sequences(batch, max_tokens) else 0
    if max_tokens > 0:
        parts = _budget_parts(batch, max_tokens, rows_per_unit, multiple, packed=bool(thd_multiple))
    else:
        micro_batch_size = min(micro_batch_size, batch.size)
        _num_microbatches(batch.size, micro_batch_size)  # checks the split
        parts = _fixed_parts(batch, micro_batch_size)
    num_microbatches = len(parts)
    num_tokens, num_sequences = _dp_mean_denominators(batch)
    real_tokens, held_tokens = _token_counts(batch, parts, thd_multiple)

    if head not in ("lm", "value"):
        raise ValueError(f"head must be 'lm' or 'value', got {head!r}")

    def loss_closure(micro: MicroBatch, logits: Tensor) -> tuple[Tensor, dict]:
        packed = micro.thd
        if head == "value":
            values = logits[..., 0].float()
            loss, metrics = loss_fn(values if packed is None else packed.unpack(values, micro.seq_len), None, micro)
        else:
            logits = logits[:, :-1]  # the last position predicts past the sequence
            targets = micro.targets if packed is None else packed.tokens[:, 1:]
            logprobs = token_logprobs(logits, targets)
            entropy = token_entropy(logits) if with_entropy else None
            if packed is not None:  # back to the rows' layout [b, S-1] the loss functions read
                logprobs = packed.unpack(logprobs, micro.seq_len - 1)
                entropy = None if entropy is None else packed.unpack(entropy, micro.seq_len - 1)
            loss, metrics = loss_fn(logprobs, entropy, micro)
        # Metrics are weighted by this micro-batch's masked targets; kept as tensors (no device sync
        # per micro-batch) and reduced once in _reduce_metrics.
        weight = micro.mask.sum().double()
        reported = {k: torch.as_tensor(v).detach().double().mean() * weight for k, v in metrics.items()}
        reported[_WEIGHT] = weight
        reported[_LOSS] = loss.detach().double()
        # Megatron divides what we return by num_microbatches; undo it (the loss is already a share).
        return loss * num_microbatches, reported

    def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
        micro = next(data_iterator)
        return _forward(model, micro.tokens, micro.segment_ids, micro, training=not forward_only), partial(loss_closure, micro)

    with torch.no_grad() if forward_only else torch.enable_grad(), moe_routing.cleared_after(ddp_model, batch.routing is not None):
        per_micro = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=_micro_batches(parts, num_tokens, num_sequences, thd_multiple),
            model=[ddp_model],
            num_microbatches=num_microbatches,
            seq_length=parts[0].seq_len,  # used by pipeline schedules only, where every part has the batch's shape
            micro_batch_size=parts[0].size,
            forward_only=forward_only,
        )
    metrics = _reduce_metrics(per_micro)
    metrics["num_tokens"] = num_tokens * parallel_state.get_data_parallel_world_size()
    metrics["sequence_tokens"] = real_tokens
    metrics["padding_share"] = 1.0 - real_tokens / held_tokens if held_tokens > 0 else 0.0
    return metrics


def _token_counts(batch: Batch, parts: list[Batch], thd_multiple: int = 0) -> tuple[float, float]:
    """(positions up to each row's last trained token, positions the micro-batches hold), summed over
    DP ranks: the real tokens of the step, and what the forward and backward actually ran on (packed:
    each micro-batch's real tokens rounded up to `thd_multiple`)."""
    if thd_multiple:
        held = sum(-(-int(needed_widths(p.loss_mask).sum()) // thd_multiple) * thd_multiple for p in parts)
    else:
        held = sum(p.size * p.seq_len for p in parts)
    counts = torch.tensor([float(needed_widths(batch.loss_mask).sum()), float(held)], dtype=torch.float64, device=platform.device())
    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    return counts[0].item(), counts[1].item()


def _reduce_metrics(per_micro: list[dict[str, Tensor]]) -> dict[str, float]:
    """Token-weighted means over micro-batches and DP ranks (the loss: a sum, then a DP mean);
    then every pipeline stage gets the last stage's result."""
    metrics: dict[str, float] | None = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        keys = sorted({k for m in per_micro for k in m} | {_WEIGHT, _LOSS})
        sums = torch.zeros(len(keys), dtype=torch.float64, device=platform.device())
        for m in per_micro:
            for i, k in enumerate(keys):
                if k in m:
                    sums[i] += m[k].to(sums)
        dp = parallel_state.get_data_parallel_world_size()
        if dp > 1:
            dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        totals = dict(zip(keys, sums.tolist()))
        weight = totals.pop(_WEIGHT)
        metrics = {k: v / weight if weight > 0 else 0.0 for k, v in totals.items()}
        metrics[_LOSS] = totals[_LOSS] / dp
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        box = [metrics]
        dist.broadcast_object_list(
            box,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        metrics = box[0]
    return metrics


def sequence_logprobs(model: torch.nn.Module, sequences: list[list[int]], pad_id: int, micro_batch_size: int) -> list[Tensor]:
    """Per sequence, the logprob of every token given the ones before it (``len(seq) - 1`` values):
    the trainer's side of the weight-sync parity probe (collective over the trainer's ranks)."""
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = torch.tensor(s)
    lp = compute_logprobs(model, tokens, micro_batch_size)
    return [lp[i, : len(s) - 1].cpu() for i, s in enumerate(sequences)]


@torch.no_grad()
def compute_logprobs(model: torch.nn.Module, tokens: Tensor, micro_batch_size: int, routing: Tensor | None = None,
                     record_routing: bool = False, real_tokens: Tensor | None = None):
    """Forward-only log p(tokens[:, t+1] | tokens[:, :t+1]) -> `[B, S-1]` float32, on every rank.

    Takes the DDP wrapper or the bare GPTModel. Exact under TP (vocab-parallel reduction); with
    pipeline parallelism the last stage's result is broadcast, so every rank returns the same tensor.
    MoE models: `routing` `[B, S, L, k]` is replayed (`train.moe_routing`); `record_routing=True`
    returns `(logprobs, routing)` with the routing this pass chose, `[B, S, L, k]` for this pipeline
    stage's MoE layers. `real_tokens` `[B, S]` marks the positions a routing comparison counts.
    """
    return _forward_only(model, tokens, micro_batch_size, lambda micro, logits: token_logprobs(logits[:, :-1], micro.targets),
                         routing=routing, record_routing=record_routing, real_tokens=real_tokens)


@torch.no_grad()
def compute_values(model: torch.nn.Module, tokens: Tensor, micro_batch_size: int) -> Tensor:
    """Forward-only per-token scalars of a reward model (`head="value"`) -> `[B, S]` float32, on every rank."""
    return _forward_only(model, tokens, micro_batch_size, lambda micro, values: values[..., 0].float(), width_offset=0)


def _forward_only(model: torch.nn.Module, tokens: Tensor, micro_batch_size: int,
                  per_micro: Callable[[MicroBatch, Tensor], Tensor], width_offset: int = 1, routing: Tensor | None = None,
                  record_routing: bool = False, real_tokens: Tensor | None = None):
    """`per_micro(micro, model output)` over micro-batches of `tokens`, concatenated, `[B, S - width_offset]`
    float32 on every rank (the last pipeline stage computes it and broadcasts it); with
    `record_routing`, also the routing each micro-batch chose (see `compute_logprobs`)."""
    width = tokens.shape[1]
    mask = torch.zeros_like(tokens) if real_tokens is None else real_tokens.to(tokens.dtype)
    batch = Batch(tokens=tokens, loss_mask=mask, routing=routing)
    batch = padded_to_multiple(batch, _sequence_multiple(get_model_config(model)), _expert_parallel_shape(batch))
    num_microbatches = _num_microbatches(batch.size, micro_batch_size)
    micro_batch_size = min(micro_batch_size, batch.size)
    chosen: list[Tensor] = []

    def collect(micro: MicroBatch, output: Tensor) -> tuple[Tensor, dict]:
        values = per_micro(micro, output)
        return torch.zeros((), device=values.device), {"values": values}

    def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
        micro = next(data_iterator)
        if record_routing:
            moe_routing.record(model)
        output = _forward(model, micro.tokens, micro=micro)
        if record_routing:
            chosen.append(moe_routing.recorded(model, micro.size, micro.seq_len))
        return output, partial(collect, micro)

    was_training = model.training
    model.eval()
    try:
        with moe_routing.cleared_after(model, routing is not None or record_routing):
            per_micro = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=_micro_batches(_fixed_parts(batch, micro_batch_size), 1.0, 1.0),
                model=[model],
                num_microbatches=num_microbatches,
                seq_length=batch.seq_len,
                micro_batch_size=micro_batch_size,
                forward_only=True,
            )
    finally:
        model.train(was_training)

    out = torch.empty(batch.size, batch.seq_len - width_offset, dtype=torch.float32, device=platform.device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        out = torch.cat([m["values"] for m in per_micro]).float()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            out,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    out = out[:, : width - width_offset]
    if record_routing:
        return out, torch.cat(chosen)[:, :width]
    return out


# --------------------------------------------------------------------------------------------
# One optimizer step, and the language-model loss.


def train_step(
    ddp_model: torch.nn.Module,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    batch: Batch,
    loss_fn: LossFn,
    micro_batch_size: int,
    with_entropy: bool = False,
    head: str = "lm",
    max_tokens: int = 0,
    rows_per_unit: int = 1,
) -> dict[str, float]:
    """zero grads -> forward/backward over micro-batches (`forward_backward`: `micro_batch_size` rows
    each, or a token budget `max_tokens`) -> clip + Adam step -> advance the lr schedule.

    Metrics: everything `forward_backward` returns, plus `grad_norm` (before clipping), `lr` (the
    rate this step used), `update_successful` (0 when fp16 loss scaling skipped the step; the
    schedule then does not advance, as in Megatron-LM) and `nonfinite` (1 when the loss or a
    gradient on any rank was inf/nan: the update is skipped on every rank, the weights stay as they
    were, and the caller decides how many such steps in a row to tolerate).
    """
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    lr = current_lr(optimizer)
    metrics = forward_backward(ddp_model, batch, loss_fn, micro_batch_size, with_entropy=with_entropy, head=head,
                               max_tokens=max_tokens, rows_per_unit=rows_per_unit)
    if not _all_finite(ddp_model, metrics["loss"]):
        # Adam would carry a single nan into every weight; skip the step on every rank alike.
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        metrics.update(grad_norm=float("nan"), lr=lr, update_successful=0.0, nonfinite=1.0)
        return metrics
    update_successful, grad_norm, _num_zeros = optimizer.step()
    if update_successful:
        scheduler.step(1)
    metrics.update(
        grad_norm=float("nan") if grad_norm is None else float(grad_norm),
        lr=lr,
        update_successful=float(bool(update_successful)),
        nonfinite=0.0,
    )
    return metrics


def _all_finite(ddp_model: torch.nn.Module, loss: float) -> bool:
    """The loss and every gradient this rank holds are finite, on all ranks (one scalar all-reduce)."""
    flag = torch.tensor([0.0 if torch.isfinite(torch.tensor(loss)) else 1.0], device=platform.device())
    for param in ddp_model.parameters():  # accumulated on the device: no host sync per parameter
        grad = getattr(param, "main_grad", None)
        grad = param.grad if grad is None else grad
        if grad is not None:
            flag += (~torch.isfinite(grad)).any()
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def lm_loss_fn(logprobs: Tensor, entropy: Tensor | None, micro: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-mean negative log-likelihood over the masked targets of the whole batch (pretraining, SFT)."""
    nll = -(logprobs * micro.mask).sum() / micro.num_tokens
    return nll, {}
