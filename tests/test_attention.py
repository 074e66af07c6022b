"""Attention over packed samples: the dense mask of the `local` spec and the segment kernels of
`fast` (models/attention.py) compute the same block-diagonal causal attention."""

import pytest
import torch
import torch.nn.functional as F

from megatron_mm1.models.attention import (
    attention_mask_from_segments,
    packed_segments,
    segment_attention,
)

# Row 0: three samples and padding; row 1: one sample filling the row; row 2: one sample, padding.
SEGMENTS = torch.tensor(
    [[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.int32
)


def runs_of(row: list[int]) -> list[int]:
    """Run id of each position: a new run starts wherever the segment id changes."""
    return [sum(a != b for a, b in zip(row[: i + 1], [None] + row[:i])) for i in range(len(row))]


def test_attention_mask_is_block_diagonal_causal():
    masked = attention_mask_from_segments(SEGMENTS)
    assert masked.shape == (3, 1, 8, 8) and masked.dtype == torch.bool
    for b, row in enumerate(SEGMENTS.tolist()):
        run = runs_of(row)
        for i in range(8):
            for j in range(8):
                assert masked[b, 0, i, j].item() == (not (j <= i and run[i] == run[j])), (b, i, j)
    assert not masked.all(dim=-1).any()  # every query attends to something

    # Functionally: changing one packed sample leaves the other's attention output unchanged.
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 8, 16) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=~masked)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :3], v2[0, :, :3] = torch.randn(2, 3, 16), torch.randn(2, 3, 16)  # sample 1 of row 0
    out2 = F.scaled_dot_product_attention(q, k2, v2, attn_mask=~masked)
    assert torch.allclose(out[0, :, 3:], out2[0, :, 3:])
    assert not torch.allclose(out[0, :, :3], out2[0, :, :3])
    # and within a sample attention is causal: a later position never changes an earlier one
    v3 = v.clone()
    v3[0, :, 4] = 100.0
    out3 = F.scaled_dot_product_attention(q, k, v3, attn_mask=~masked)
    assert torch.allclose(out[0, :, 3], out3[0, :, 3]) and not torch.allclose(out[0, :, 4], out3[0, :, 4])


def test_packed_segments_are_the_runs_of_each_row():
    segments = packed_segments(SEGMENTS)
    assert segments.lengths == [[3, 2, 1, 2], [8], [5, 3]]
    assert segments.cu_seqlens_q.tolist() == [0, 3, 5, 6, 8, 16, 21, 24]
    assert segments.cu_seqlens_q.dtype == torch.int32 and segments.longest_run == 8
    # megatron sizes the rotary embedding by max_seqlen: the whole row, whose positions it covers
    assert segments.max_seqlen_q == segments.max_seqlen_kv == 8
    assert segments.qkv_format == "sbhd"  # keeps megatron's THD code paths off
    assert not segments.one_run_per_row and packed_segments(SEGMENTS[1:2]).one_run_per_row


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("rows", [[0, 1, 2], [1]], ids=["packed", "one-sample"])
def test_segment_attention_equals_the_dense_mask_forward_and_backward(heads, groups, rows):
    seg = SEGMENTS[rows]
    torch.manual_seed(1)
    q = torch.randn(len(rows), heads, 8, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(len(rows), groups, 8, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    scale = 0.3
    dense = F.scaled_dot_product_attention(
        q, k, v, attn_mask=~attention_mask_from_segments(seg), scale=scale, enable_gqa=heads != groups
    ).permute(2, 0, 1, 3).flatten(2)  # megatron's [s, b, h]
    packed = segment_attention(*(t.permute(2, 0, 1, 3) for t in (q, k, v)), packed_segments(seg), scale)
    torch.testing.assert_close(packed, dense)
    grad = torch.randn_like(dense)
    expected = torch.autograd.grad(dense, (q, k, v), grad)
    got = torch.autograd.grad(packed, (q, k, v), grad)
    for name, a, b in zip("qkv", got, expected):
        torch.testing.assert_close(a, b, msg=lambda m: f"d{name}: {m}")
