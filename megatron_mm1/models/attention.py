"""Attention over packed samples by segment, with no [b, 1, s, s] mask.

A row of the batch holds several packed samples (and trailing padding). Each is a run of equal
`segment_ids` (data/packing.py); a token attends to itself and the earlier tokens of its own run.
`packed_segments` turns the ids into run boundaries once per micro-batch; they travel to the core
attention as megatron-core's `packed_seq_params`, which megatron passes through every layer,
recomputation included. Two layouts:
- 'sbhd' (the `fast` spec): the micro-batch keeps its [s, b] rows and megatron's THD code stays
  off (its unfused rotary embedding for THD runs one slice per sample);
- 'thd' (the `te` spec, as Megatron-LM packs): the micro-batch is one row of b*s tokens, which
  Transformer Engine's attention and fused rotary embedding take with the same boundaries
  (MM1Model flattens the rows; rotary positions then restart at each sample).
The kernels here do only the causal blocks inside each run, about sum(L^2)/2 query-key pairs
instead of s^2:
- every row one run: SDPA with is_causal (flash on CUDA);
- CUDA, bf16/fp16: varlen flash attention (torch.nn.attention.varlen) over the flattened rows;
- otherwise (the CPU, fp32 on CUDA): SDPA with is_causal, one call per run.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.9
    varlen_attn = None


@dataclass
class PackedSegments(PackedSeqParams):
    """Run boundaries of a [b, s] micro-batch. `cu_seqlens_q/kv` are the runs' start offsets in the
    flattened b*s tokens (int32, on the device, as varlen kernels take them); `lengths` holds each
    row's run lengths on the host. `max_seqlen_q/kv` are the row length s: megatron sizes the
    rotary embedding by them, and positions run along the whole row (RoPE depends only on
    relative positions, so a sample's attention is the same wherever it sits)."""

    qkv_format: str = "sbhd"
    lengths: list[list[int]] = field(default_factory=list)

    @property
    def longest_run(self) -> int:
        return max(max(row) for row in self.lengths)

    @property
    def one_run_per_row(self) -> bool:
        return all(len(row) == 1 for row in self.lengths)


def packed_segments(segment_ids: torch.Tensor) -> PackedSegments:
    """[b, s] segment ids -> their runs (one host sync: kernels need the lengths as integers)."""
    b, s = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    offsets = starts.flatten().nonzero().flatten()
    cu_seqlens = torch.cat([offsets, offsets.new_tensor([b * s])]).to(torch.int32)
    bounds = cu_seqlens.tolist()
    lengths: list[list[int]] = [[] for _ in range(b)]
    for start, end in zip(bounds, bounds[1:]):
        lengths[start // s].append(end - start)
    return PackedSegments(
        cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens, max_seqlen_q=s, max_seqlen_kv=s,
        lengths=lengths,
    )


def thd_segments(segment_ids: torch.Tensor) -> PackedSegments:
    """The runs of [b, s] segment ids for the micro-batch flattened to one row of b*s tokens
    (THD): the same boundaries, a row's end always among them; max_seqlen is the longest run,
    as varlen kernels and the THD rotary embedding take it."""
    rows = packed_segments(segment_ids)
    longest = rows.longest_run
    return PackedSegments(
        qkv_format="thd", cu_seqlens_q=rows.cu_seqlens_q, cu_seqlens_kv=rows.cu_seqlens_kv,
        max_seqlen_q=longest, max_seqlen_kv=longest, lengths=[[n for row in rows.lengths for n in row]],
    )


def attention_mask_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """The same attention as a dense BoolTensor [b, 1, s, s], True = masked (megatron-core's
    convention), for the `local` spec's DotProductAttention: i attends j iff j <= i in the same
    run. Padding is a run too, so no row is fully masked (which would give NaN softmaxes)."""
    s = segment_ids.shape[-1]
    starts = torch.ones_like(segment_ids, dtype=torch.int32)
    starts[:, 1:] = (segment_ids[:, 1:] != segment_ids[:, :-1]).int()
    run = starts.cumsum(dim=1)
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return ~((run[:, :, None] == run[:, None, :]) & causal)[:, None]


@functools.cache
def _varlen_parameters() -> frozenset[str]:
    return frozenset(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else frozenset()


def _varlen_options(q: torch.Tensor, k: torch.Tensor, scale: float) -> Optional[dict]:
    """varlen_attn's keywords for a causal call, across torch versions (2.9-2.10 take is_causal;
    later ones window_size, scale and then enable_gqa); None where it cannot run these tensors
    (flash kernels: CUDA, bf16 or fp16)."""
    params = _varlen_parameters()
    if not (params and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)):
        return None
    options: dict = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        options["scale"] = scale
    elif not math.isclose(scale, q.shape[-1] ** -0.5):
        return None
    if q.shape[2] != k.shape[2] and "enable_gqa" in params:
        options["enable_gqa"] = True
    return options


def segment_kernel(q: torch.Tensor, k: torch.Tensor, segments: PackedSegments, scale: Optional[float]) -> str:
    """The kernel `segment_attention` runs for these tensors: causal, varlen or per-run."""
    if segments.one_run_per_row:
        return "causal"
    if _varlen_options(q, k, scale or q.shape[-1] ** -0.5) is not None:
        return "varlen"
    return "per-run"


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    """Causal SDPA on megatron's layout: [s, b, heads, d] (K/V at their groups) -> [s, b, h]."""
    out = F.scaled_dot_product_attention(
        *(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True, scale=scale, enable_gqa=q.shape[2] != k.shape[2]
    )
    return out.permute(2, 0, 1, 3).flatten(2)


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: PackedSegments, scale: Optional[float]
) -> torch.Tensor:
    """Causal attention within each run, on megatron's layout: q [s, b, heads, d], k and v
    [s, b, groups, d] -> [s, b, heads * d]."""
    kernel = segment_kernel(q, k, segments, scale)
    if kernel == "causal":
        return _sdpa(q, k, v, scale)
    s, b, h, d = q.shape
    if kernel == "varlen":
        options = _varlen_options(q, k, scale or d**-0.5)
        if h != k.shape[2] and "enable_gqa" not in options:  # torch < 2.12: K/V at every query head
            k, v = (t.repeat_interleave(h // t.shape[2], dim=2) for t in (k, v))
        flat = [t.transpose(0, 1).reshape(b * s, t.shape[2], d) for t in (q, k, v)]  # THD
        out = varlen_attn(
            *flat, segments.cu_seqlens_q, segments.cu_seqlens_kv, segments.longest_run,
            segments.longest_run, **options,
        )
        return out.view(b, s, h * d).transpose(0, 1)
    # Pieces by split, not by indexing: autograd then joins their gradients in one concatenation,
    # where each indexed slice's backward would fill a zero tensor of the whole input.
    rows = [
        torch.cat([_sdpa(*run, scale) for run in zip(*(t.split(lengths) for t in row))])
        for lengths, *row in zip(segments.lengths, q.split(1, dim=1), k.split(1, dim=1), v.split(1, dim=1))
    ]
    return torch.cat(rows, dim=1)


class SDPAttention(MegatronModule):
    """Core attention through torch's fused kernels; a drop-in for megatron-core's
    DotProductAttention (same constructor and forward, same [s, b, heads, dim] -> [s, b, h]).
    The decoder's causal attention comes with `PackedSegments`; the vision encoder's
    bidirectional one with no mask."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        assert config.context_parallel_size == 1, "SDPAttention has no context parallelism"
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        # The varlen and per-run kernels have no dropout; MM1 trains without it.
        assert dropout == 0.0, "SDPAttention has no attention dropout"
        self.attn_mask_type = attn_mask_type
        # None: SDPA's own 1/sqrt(head_dim), as DotProductAttention. (Megatron's query-key layer
        # scaling divides the scores by the layer number and multiplies them back in the fp32
        # softmax, a no-op on the result, so it needs no counterpart here.)
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSegments] = None,
    ) -> torch.Tensor:
        assert attention_mask is None and attention_bias is None, "SDPAttention takes segments, not masks"
        if (attn_mask_type or self.attn_mask_type) != AttnMaskType.no_mask:
            assert isinstance(packed_seq_params, PackedSegments), "causal attention needs PackedSegments"
            if packed_seq_params.qkv_format == "thd":  # megatron took the batch dim off: [t, heads, d]
                query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            return segment_attention(query, key, value, packed_seq_params, self.softmax_scale)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3).flatten(2)


def dense_mask_inputs(segment_ids: torch.Tensor) -> dict:
    return {"attention_mask": attention_mask_from_segments(segment_ids)}


def segment_inputs(segment_ids: torch.Tensor) -> dict:
    return {"attention_mask": None, "packed_seq_params": packed_segments(segment_ids)}


def thd_inputs(segment_ids: torch.Tensor) -> dict:
    return {"attention_mask": None, "packed_seq_params": thd_segments(segment_ids)}
