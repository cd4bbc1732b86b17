"""Packed sequences (`thd`) for Transformer Engine's fused attention: a micro-batch's rows, each cut after its
last trained token, laid end to end in one row with no padding between them, and the sequence boundaries
(`cu_seqlens`) telling TE's attention and Megatron's rotary embedding where each sequence starts.

The loss functions keep seeing the bucketed layout (`[b, w-1]` target-aligned, `train/step.py`): the model's
output on the packed row is turned into per-token log-probabilities (or values) there, then scattered back to
`[b, w-1]` by `PackedRows.unpack`. On CPU (no TE) the trainer keeps the bucketed layout, whose micro-batches
are already cut to their longest row (`step.token_budget_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

Tensor = torch.Tensor


@dataclass
class PackedRows:
    """One micro-batch packed into a single row of `T` tokens (a multiple of `multiple`)."""

    tokens: Tensor  # [1, T] the rows' tokens end to end, then padding up to the multiple
    position_ids: Tensor  # [1, T] restarting at 0 in every sequence
    params: PackedSeqParams  # qkv_format "thd", cu_seqlens (int32) and the longest sequence
    index: Tensor  # [b, w] long: where position t of row r sits in the packed row (-1: not packed, i.e. cut padding)
    padding: Tensor  # [1, T] bool: the tail padding (for the MoE routers' token counts)

    def unpack(self, values: Tensor, width: int) -> Tensor:
        """`values` `[1, T']` computed on the packed row (token- or target-aligned) -> `[b, width]`, zero where
        a row has no packed position. Target-aligned: packed position j holds the prediction of packed token
        j + 1, which for a position of row r is that row's next token (rows are packed contiguously)."""
        index = self.index[:, :width]
        flat = values.reshape(-1)
        gathered = flat[index.clamp(min=0, max=flat.numel() - 1)]
        return torch.where(index >= 0, gathered, torch.zeros((), dtype=values.dtype, device=values.device))


def pack_rows(tokens: Tensor, lengths: Tensor, segment_ids: Tensor | None = None, multiple: int = 1) -> PackedRows:
    """Pack `tokens` `[b, w]`: row r contributes its first `lengths[r]` tokens. Each row is one sequence, or,
    with `segment_ids` (SFT rows that already hold several documents), one sequence per document. The
    packed length is padded to `multiple` (sequence parallelism, FP8 GEMMs) with a sequence of its own."""
    device = tokens.device
    b, w = tokens.shape
    lengths = lengths.to(torch.long).cpu()
    index = torch.full((b, w), -1, dtype=torch.long)
    pieces, seqlens, positions = [], [], []
    offset = 0
    for r in range(b):
        n = int(lengths[r])
        pieces.append(tokens[r, :n])
        index[r, :n] = torch.arange(offset, offset + n)
        if segment_ids is None:
            spans = [n]
        else:
            docs = segment_ids[r, :n].cpu()
            change = torch.nonzero(docs[1:] != docs[:-1]).flatten() + 1
            bounds = [0, *change.tolist(), n]
            spans = [e - s for s, e in zip(bounds, bounds[1:])]
        for span in spans:
            seqlens.append(span)
            positions.append(torch.arange(span))
        offset += n
    total = offset + (-offset) % multiple
    if total > offset:
        pieces.append(torch.zeros(total - offset, dtype=tokens.dtype, device=device))
        seqlens.append(total - offset)
        positions.append(torch.arange(total - offset))
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seqlens, dtype=torch.int32), 0)
    cu = cu.to(device)
    longest = max(seqlens)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest)
    padding = torch.zeros(1, total, dtype=torch.bool, device=device)
    padding[0, offset:] = True
    return PackedRows(tokens=torch.cat(pieces).unsqueeze(0), position_ids=torch.cat(positions).unsqueeze(0).to(device),
                      params=params, index=index.to(device), padding=padding)
