"""The `thd` packing of a micro-batch (train/packed.py) on CPU: which tokens go where, the sequence boundaries
TE's attention gets, and the way back to the rows' layout. Transformer Engine's attention itself needs a GPU
(tests/gpu/test_cuda_paths.py::test_packed_thd_micro_batches_equal_the_padded_ones); here the logits come from
a position-free model (an embedding and a projection), for which packed and bucketed log-probabilities must
agree exactly wherever a row has a target, through the same `token_logprobs` the trainer uses."""

from __future__ import annotations

import pytest
import torch

from megatron_r1.train.packed import pack_rows
from megatron_r1.train.step import needed_widths, token_logprobs


@pytest.fixture(scope="module", autouse=True)
def _one_rank(one_rank):  # token_logprobs is vocab-parallel: it needs Megatron's model-parallel state
    return one_rank


def rows():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 50, (3, 10), generator=g)
    mask = torch.zeros(3, 10)
    mask[0, 3:7] = 1  # needs 7 columns
    mask[1, 2:10] = 1  # all 10
    mask[2, 4:5] = 1  # 5
    return tokens, mask


def test_rows_are_cut_after_their_last_target_and_laid_end_to_end():
    tokens, mask = rows()
    packed = pack_rows(tokens, needed_widths(mask), multiple=8)
    assert packed.tokens.shape == (1, 24)  # 7 + 10 + 5 = 22, padded to 24
    assert torch.equal(packed.tokens[0, :22], torch.cat([tokens[0, :7], tokens[1, :10], tokens[2, :5]]))
    assert packed.params.qkv_format == "thd" and packed.params.cu_seqlens_q.tolist() == [0, 7, 17, 22, 24]
    assert packed.params.cu_seqlens_q.dtype == torch.int32 and packed.params.max_seqlen_q == 10
    assert packed.position_ids[0].tolist() == [*range(7), *range(10), *range(5), 0, 1]
    assert packed.padding[0].tolist() == [False] * 22 + [True] * 2
    assert packed.index[0].tolist() == [*range(7), -1, -1, -1] and packed.index[2, :5].tolist() == list(range(17, 22))


def test_documents_of_a_packed_sft_row_are_sequences_of_their_own():
    tokens = torch.arange(1, 13).reshape(2, 6)
    segments = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    mask = torch.tensor([[0, 1, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    packed = pack_rows(tokens, needed_widths(mask), segments)
    assert packed.params.cu_seqlens_q.tolist() == [0, 2, 5, 11]
    assert packed.position_ids[0].tolist() == [0, 1, 0, 1, 2, *range(6)]


def test_unpacked_logprobs_equal_the_bucketed_ones_wherever_a_row_has_a_target():
    tokens, mask = rows()
    g = torch.Generator().manual_seed(1)
    embed, head = torch.randn(50, 16, generator=g), torch.randn(16, 50, generator=g)
    logits = lambda t: embed[t] @ head  # noqa: E731  (no positions, no attention: packing cannot change it)
    bucketed = token_logprobs(logits(tokens)[:, :-1], tokens[:, 1:])
    packed = pack_rows(tokens, needed_widths(mask), multiple=4)
    flat = token_logprobs(logits(packed.tokens)[:, :-1], packed.tokens[:, 1:])
    unpacked = packed.unpack(flat, tokens.shape[1] - 1)
    target_mask = mask[:, 1:].bool()
    assert unpacked.shape == bucketed.shape
    torch.testing.assert_close(unpacked[target_mask], bucketed[target_mask])
    values = logits(packed.tokens)[..., 0]  # a value head: token-aligned
    torch.testing.assert_close(packed.unpack(values, 10)[mask.bool()], logits(tokens)[..., 0][mask.bool()])
