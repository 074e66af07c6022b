"""Where the fast layer spec pays: each op it replaces, timed forward + backward against the
local spec's at one LLM layer's real shapes, with the bytes each keeps for backward.

  .venv/bin/python tools/bench_fast_ops.py --config mm1-3b --tokens 2048

Runs on the GPU when there is one (bf16 by default), else on the CPU (fp32 by default). The
attention gets two packed samples per sequence: local as megatron's block-diagonal causal mask,
fast as their boundaries (tools/bench_attention.py compares the attention kernels alone).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F


class Op(torch.nn.Module):
    """A function as a module, so that saved_bytes can attribute what it saves."""

    def __init__(self, fn: Callable, *params: torch.nn.Module) -> None:
        super().__init__()
        self.fn, self.params = fn, torch.nn.ModuleList(params)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fn(*inputs)


def ops(cfg, device: torch.device, dtype: torch.dtype) -> list[tuple[str, str, Op, list[torch.Tensor]]]:
    """(op, spec, module, inputs) for the local and fast version of each replaced op."""
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_mm1.models.attention import SDPAttention, attention_mask_from_segments, packed_segments
    from megatron_mm1.models.mm1 import llm_transformer_config
    from megatron_mm1.models.specs import DECODER_MASK, CompiledRMSNorm

    llm, s = cfg.model.llm, cfg.data.seq_length
    h, f, heads, groups = llm.hidden_size, llm.ffn_hidden_size, llm.num_attention_heads, llm.num_query_groups
    d = h // heads

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    def eager_swiglu(y: torch.Tensor) -> torch.Tensor:  # megatron's MLP without the fusion
        a, b = torch.chunk(y, 2, dim=-1)
        return F.silu(a) * (b + 0.0)

    norms = [torch.nn.RMSNorm(h, eps=1e-5, device=device, dtype=dtype),
             CompiledRMSNorm(h, eps=1e-5, device=device, dtype=dtype)]
    config = llm_transformer_config(cfg)
    attention = [cls(config, layer_number=1, attn_mask_type=DECODER_MASK[spec], attention_type="self").to(device)
                 for cls, spec in ((DotProductAttention, "local"), (SDPAttention, "fast"))]
    segment_ids = torch.ones(1, s, dtype=torch.int32, device=device)
    segment_ids[:, s // 2:] = 2  # two packed samples
    mask, segments = attention_mask_from_segments(segment_ids), packed_segments(segment_ids)
    qkv = [leaf(s, 1, heads, d), leaf(s, 1, groups, d), leaf(s, 1, groups, d)]
    x, y = leaf(s, 1, h), leaf(s, 1, 2 * f)
    return [
        ("RMSNorm", "local", Op(norms[0], norms[0]), [x]),
        ("RMSNorm", "fast", Op(norms[1], norms[1]), [x]),
        ("SwiGLU", "local", Op(eager_swiglu), [y]),
        ("SwiGLU", "fast", Op(lambda t: bias_swiglu_impl(t, None)), [y]),
        ("attention", "local", Op(lambda q, k, v: attention[0](q, k, v, mask), attention[0]), qkv),
        ("attention", "fast", Op(lambda q, k, v: attention[1](q, k, v, None, packed_seq_params=segments), attention[1]), qkv),
    ]


def time_op(module: Op, inputs: list[torch.Tensor], repeats: int) -> float:
    """Median seconds of forward + backward, after two untimed runs (compilation, caches)."""
    times = []
    for i in range(repeats + 2):
        for t in inputs:
            t.grad = None
        if inputs[0].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = module(*inputs)
        out.backward(torch.ones_like(out))
        if inputs[0].is_cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from megatron_mm1.config import load_config
    from megatron_mm1.runtime import quiet_third_party_warnings, single_process
    from megatron_mm1.saved_tensors import saved_bytes

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="mm1-3b", help="preset name or YAML path (its LLM's shapes)")
    parser.add_argument("--tokens", type=int, default=2048, help="sequence length (default 2048)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per op (default 5)")
    args = parser.parse_args()
    quiet_third_party_warnings()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    overrides = [f"data.seq_length={args.tokens}", "model.max_images_per_sequence=1", f"training.bf16={dtype == torch.bfloat16}"]
    cfg = single_process(load_config(args.config, overrides))
    llm = cfg.model.llm
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{args.config} layer shapes (hidden {llm.hidden_size}, ffn {llm.ffn_hidden_size}, {llm.num_attention_heads} "
          f"heads, {llm.num_query_groups} query groups), {args.tokens} tokens, {dtype}, {name}; forward + backward, "
          f"median of {args.repeats}\n")
    print("| op | spec | ms | saved for backward MiB |")
    print("|---|---|---|---|")
    for op, spec, module, inputs in ops(cfg, device, dtype):
        seconds = time_op(module, inputs, args.repeats)
        kept = saved_bytes([torch.nn.ModuleDict({"op": module})], lambda: module(*inputs))[0].get("op", 0)
        print(f"| {op} | {spec} | {1e3 * seconds:.2f} | {kept / 2**20:.1f} |")


if __name__ == "__main__":
    main()
