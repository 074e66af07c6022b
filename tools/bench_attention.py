"""Attention kernels on packed rows: forward + backward time and peak memory of one row of
`--tokens` tokens holding 1 or more equal samples, at a preset's head shapes (MM1-3B's by default).

  .venv/bin/python tools/bench_attention.py --tokens 4096 --samples 1,8 --json

Implementations:
- segments: the fast spec's (models/attention.py): the samples' boundaries, only the causal
  blocks inside each sample (varlen flash attention on GPU, one SDPA call per sample on CPU);
- dense-mask SDPA: torch SDPA with an additive [1, 1, s, s] block-diagonal causal mask (what the
  fast spec ran before segments);
- local: megatron-core's DotProductAttention with its boolean mask (the local spec).
With work proportional to sum(L^2), 8 samples cost 1/8 of 1; a dense mask costs s^2 either way.

Peak memory: on a GPU, torch.cuda.max_memory_allocated above what the inputs hold; on the CPU,
the growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs after
returning freed memory with malloc_trim) during one forward + backward.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F


def _host_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def peak_bytes(run: Callable[[], None]) -> int:
    """Memory one call of `run` needs above what is held before it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _host_status("VmRSS")
    run()
    return _host_status("VmHWM") - base


def timed(run: Callable[[], None]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def implementations(cfg, segment_ids: torch.Tensor, device: torch.device) -> dict[str, tuple[Callable, str]]:
    """name -> (attention(q, k, v) on [s, b, heads, d] tensors -> [s, b, h], the kernel it runs)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_mm1.models.attention import SDPAttention, attention_mask_from_segments, packed_segments
    from megatron_mm1.models.mm1 import llm_transformer_config
    from megatron_mm1.models.specs import DECODER_MASK

    config = llm_transformer_config(cfg)
    fast = SDPAttention(config, 1, DECODER_MASK["fast"], "self")
    local = DotProductAttention(config, 1, DECODER_MASK["local"], "self").to(device)
    segments = packed_segments(segment_ids)
    mask = attention_mask_from_segments(segment_ids)

    def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3).flatten(2)

    return {
        "segments": (lambda q, k, v: fast(q, k, v, None, packed_seq_params=segments), "see kernel"),
        "dense-mask SDPA": (dense_sdpa, "SDPA with a mask"),
        "local": (lambda q, k, v: local(q, k, v, mask), "baddbmm, softmax, bmm"),
    }


def cases(cfg, tokens: int, samples: int, dtype: torch.dtype, chosen: list[str]) -> list[tuple[dict, Callable]]:
    """(description, one forward + backward) of each chosen implementation on one row of
    `tokens` tokens cut into `samples` equal samples."""
    from megatron_mm1.models.attention import packed_segments, segment_kernel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    llm = cfg.model.llm
    segment_ids = torch.arange(tokens, device=device).div(tokens // samples, rounding_mode="floor")[None] + 1
    torch.manual_seed(0)
    q = torch.randn(tokens, 1, llm.num_attention_heads, llm.head_dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (
        torch.randn(tokens, 1, llm.num_query_groups, llm.head_dim, device=device, dtype=dtype, requires_grad=True)
        for _ in range(2)
    )
    grad = torch.randn(tokens, 1, llm.num_attention_heads * llm.head_dim, device=device, dtype=dtype)
    out = []
    for name, (attention, kernel) in implementations(cfg, segment_ids.int(), device).items():
        if name not in chosen:
            continue

        def step(attention=attention) -> None:
            for t in (q, k, v):
                t.grad = None
            attention(q, k, v).backward(grad)

        if name == "segments":
            kernel = segment_kernel(q, k, packed_segments(segment_ids), None)
        out.append(({"implementation": name, "kernel": kernel, "samples": samples, "tokens": tokens}, step))
    return out


def bench(cfg, tokens: int, samples: list[int], dtype: torch.dtype, repeats: int, chosen: list[str]) -> list[dict]:
    """Each case's median time over `repeats` rounds that run every case once, after one
    untimed round (compilation, caches): the machine's drift then touches every case alike."""
    runs = [case for n in samples for case in cases(cfg, tokens, n, dtype, chosen)]
    times: list[list[float]] = [[] for _ in runs]
    for round_ in range(repeats + 1):
        for i, (_, step) in enumerate(runs):
            t = timed(step)
            if round_:
                times[i].append(t)
    return [
        {**row, "ms": 1e3 * statistics.median(t), "peak_mib": peak_bytes(step) / 2**20}
        for (row, step), t in zip(runs, times)
    ]


def main() -> None:
    from megatron_mm1.config import load_config
    from megatron_mm1.runtime import quiet_third_party_warnings, single_process

    names = ["segments", "dense-mask SDPA", "local"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="mm1-3b", help="preset name or YAML path (its LLM's head shapes)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens in the row (default 4096)")
    parser.add_argument("--samples", default="1,8", help="comma-separated sample counts per row (default 1,8)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--only", default=",".join(names), help=f"comma-separated subset of: {', '.join(names)}")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    samples = [int(n) for n in args.samples.split(",")]
    chosen = args.only.split(",")
    if unknown := set(chosen) - set(names):
        parser.error(f"--only: unknown {sorted(unknown)}; choose from {names}")
    if any(n < 1 or args.tokens % n for n in samples):
        parser.error(f"--samples: each count must divide --tokens {args.tokens} into equal samples")
    quiet_third_party_warnings()
    cuda = torch.cuda.is_available()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    cfg = single_process(load_config(args.config, [f"training.bf16={dtype == torch.bfloat16}"]))
    rows = bench(cfg, args.tokens, samples, dtype, args.repeats, chosen)
    # Each implementation's time over its time at the first sample count (the time ratio).
    for row in rows:
        first = next(r for r in rows if r["implementation"] == row["implementation"])
        row["time_ratio"] = row["ms"] / first["ms"]
    llm = cfg.model.llm
    header = {
        "config": args.config, "heads": llm.num_attention_heads, "query_groups": llm.num_query_groups,
        "head_dim": llm.head_dim, "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "repeats": args.repeats,
    }
    if args.json:
        print(json.dumps({**header, "results": rows}, indent=1))
        return
    print(f"{args.config} heads ({llm.num_attention_heads} heads, {llm.num_query_groups} query groups, head dim "
          f"{llm.head_dim}), one row of {args.tokens} tokens, {header['dtype']}, {header['device']}; forward + "
          f"backward, median of {args.repeats}\n")
    print("| implementation | kernel | samples | ms | time ratio | peak MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['implementation']} | {r['kernel']} | {r['samples']} | {r['ms']:.1f} | {r['time_ratio']:.3f} "
              f"| {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
