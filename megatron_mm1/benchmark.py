"""Training-step benchmark on synthetic data (run one process per device under torchrun;
`mm1 benchmark` launches it per layout).

Each step is one global batch through megatron-core's pipeline schedule plus the optimizer,
timed after warm-up. Throughput counts text + image tokens without padding; FLOPs come from
megatron_mm1.flops (whole model, causal convention). A few extra steps run with timing probes
(synchronising on GPU) for the breakdown between vision, LLM forward, LLM backward and the
optimizer; the headline step times are taken without probes.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

from megatron_mm1.config import Config, data_parallel_size, load_config
from megatron_mm1.device import device, synchronize, to_device
from megatron_mm1.planner import GPUS, gpu_type


def device_peak(peak_tflops: Optional[float]) -> tuple[str, Optional[float], str]:
    """(device name, peak TFLOP/s or None, where the peak came from)."""
    if not torch.cuda.is_available():
        name = "cpu"
        source = "--peak-tflops" if peak_tflops else "none: no peak for a CPU, pass --peak-tflops for an MFU"
        return name, peak_tflops, source
    name = torch.cuda.get_device_name()
    if peak_tflops:
        return name, peak_tflops, "--peak-tflops"
    key = gpu_type(name)
    if key is None:
        return name, None, "none: unknown GPU, pass --peak-tflops"
    return name, GPUS[key].peak_tflops, f"table: {GPUS[key].family} bf16 dense"


def _sync() -> float:
    synchronize()
    return time.perf_counter()


class _Mark(torch.autograd.Function):
    """Identity whose backward calls `callback`: the moment backward reaches this tensor."""

    @staticmethod
    def forward(ctx, x, callback):
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback()
        return grad, None


class Probes:
    """Timing probes on a model chunk: vision (encoder + connector) forward and backward, LLM
    forward. Off unless `active`."""

    def __init__(self, chunks: list) -> None:
        self.active = False
        self.totals: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        for mm1 in chunks:
            self._time_forward(mm1.llm, "llm_forward")
            if mm1.vision is None:
                continue
            self._time_forward(mm1.vision, "vision_forward", begin_only=True)
            self._time_forward(mm1.connector, "vision_forward", end_only=True)
            mm1.connector.register_forward_hook(lambda m, i, out: _Mark.apply(out, self._vision_backward_begins))
            # Backward ends at the earliest trained vision parameter: the patch convolution.
            first = next((p for p in mm1.vision_parameters() if p.requires_grad), None)
            if first is not None:
                first.register_hook(lambda g: self._end("vision_backward"))

    def _time_forward(self, module, name: str, begin_only: bool = False, end_only: bool = False) -> None:
        if not end_only:
            module.register_forward_pre_hook(lambda *a: self._begin(name))
        if not begin_only:
            module.register_forward_hook(lambda *a: self._end(name))

    def _vision_backward_begins(self) -> None:
        self._begin("vision_backward")

    def _begin(self, name: str) -> None:
        if self.active:
            self._start[name] = _sync()

    def _end(self, name: str) -> None:
        if self.active and name in self._start:
            self.totals[name] += _sync() - self._start.pop(name)


def _microbatches(cfg: Config, dp_rank: int, count: int, images_per_sequence: int, samples_per_row: int) -> list[dict]:
    """This DP rank's synthetic micro-batches, on the host."""
    from megatron_mm1.synthetic import synthetic_microbatch

    rows = [images_per_sequence] * cfg.training.micro_batch_size
    return [synthetic_microbatch(cfg, 1000 * dp_rank + i, rows, samples_per_row) for i in range(count)]


def check_mix(cfg: Config, images_per_sequence: int, samples_per_row: int) -> None:
    """Refuse a mix the synthetic batch cannot hold (it places images in whole N-token slots
    of the unpadded 7/8 of each row, never the first)."""
    from megatron_mm1.config import ConfigError

    s, n = cfg.data.seq_length, cfg.model.connector.num_image_tokens
    slots = (s - s // 8) // n - 1
    if not 0 <= images_per_sequence <= slots:
        raise ConfigError(
            f"--images-per-seq {images_per_sequence}: a {s}-token synthetic sequence holds 0 to {slots} "
            f"images of {n} tokens; lower it or raise data.seq_length"
        )
    if samples_per_row < 1:
        raise ConfigError("--samples-per-row must be >= 1")


def run_benchmark(
    cfg: Config,
    steps: int,
    warmup: int,
    images_per_sequence: int,
    samples_per_row: int = 2,
    peak_tflops: Optional[float] = None,
    probe_steps: int = 2,
) -> dict:
    """Benchmark this process's rank; every rank returns the same report. The engine is the
    one training builds (training.engine, distributed optimizer, overlaps), stepped as training
    steps it."""
    from megatron.core import parallel_state

    from megatron_mm1 import flops
    from megatron_mm1.engine_base import build_engine
    from megatron_mm1.runtime import init_runtime

    check_mix(cfg, images_per_sequence, samples_per_row)
    env = init_runtime(cfg)
    dp = data_parallel_size(cfg, env.world_size)
    num_microbatches = cfg.training.global_batch_size // (cfg.training.micro_batch_size * dp)
    engine = build_engine(cfg, num_microbatches)
    probes = Probes(engine.model_chunks())
    # The same micro-batches every step: generating them is not part of a training step.
    host = _microbatches(
        cfg, parallel_state.get_data_parallel_rank(), num_microbatches, images_per_sequence, samples_per_row
    )
    batches = [to_device(b) for b in host]
    # Work of one global step: this DP rank's share, summed over the DP group.
    work = torch.tensor(
        [
            sum(flops.batch_flops(cfg, b) for b in host),
            sum(flops.batch_tokens(b) for b in host),
            sum(int(b["images"].shape[0]) for b in host),
        ],
        dtype=torch.float64,
        device=device(),
    )
    torch.distributed.all_reduce(work, group=parallel_state.get_data_parallel_group())
    step_flops, step_tokens, step_images = work.tolist()

    def step() -> tuple[float, float, float]:
        """The engine's train_step, in its two halves, timed."""
        start = _sync()
        metrics = engine.forward_backward(batches)
        middle = _sync()
        engine.optimizer_step(metrics)
        end = _sync()
        return end - start, middle - start, end - middle

    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = torch.tensor([step()[0] for _ in range(steps)], dtype=torch.float64, device=device())
    # A step ends when the slowest rank ends.
    torch.distributed.all_reduce(times, op=torch.distributed.ReduceOp.MAX)
    if torch.cuda.is_available():
        peak_memory = torch.cuda.max_memory_allocated() / 2**30
        memory_kind = "max_memory_allocated"
    else:
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        memory_kind = "peak RSS of the process (CPU)"
    memory = torch.tensor([peak_memory], dtype=torch.float64, device=device())
    torch.distributed.all_reduce(memory, op=torch.distributed.ReduceOp.MAX)

    probes.active = True
    fb_total = opt_total = 0.0
    for _ in range(probe_steps):
        _, fb, opt = step()
        fb_total, opt_total = fb_total + fb, opt_total + opt
    t = probes.totals
    vision = t["vision_forward"] + t["vision_backward"]
    breakdown = {
        "vision_forward": t["vision_forward"],
        "vision_backward": t["vision_backward"],
        "llm_forward": t["llm_forward"],
        # Everything else of forward_backward: LLM backward, loss, pipeline waits, DP reduction.
        "llm_backward_and_comm": fb_total - vision - t["llm_forward"],
        "optimizer": opt_total,
    }
    breakdown = {k: v / max(probe_steps, 1) for k, v in breakdown.items()}

    median = statistics.median(times.tolist())
    world = env.world_size
    device_name, peak, peak_source = device_peak(peak_tflops)
    tflops = step_flops / median / world / 1e12
    p = cfg.parallel
    return {
        "config": {"llm_layers": cfg.model.llm.num_layers, "layer_spec": cfg.model.layer_spec},
        "layout": {
            "tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
            "vpp": p.virtual_pipeline_model_parallel_size, "ep": p.expert_model_parallel_size,
            "etp": p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
            "sp": p.sequence_parallel, "dp": dp, "world_size": world,
        },
        "device": device_name,
        "mix": {
            "images_per_sequence": images_per_sequence, "samples_per_row": samples_per_row,
            "seq_length": cfg.data.seq_length, "padding_per_row": cfg.data.seq_length // 8,
            "micro_batch_size": cfg.training.micro_batch_size, "microbatches_per_rank": num_microbatches,
            "global_batch_size": cfg.training.global_batch_size,
        },
        "steps": steps,
        "warmup": warmup,
        "step_times_s": times.tolist(),
        "step_time_s": {
            "median": median, "min": min(times.tolist()), "max": max(times.tolist()),
            "stdev": statistics.stdev(times.tolist()) if steps > 1 else 0.0,
        },
        "tokens_per_step": int(step_tokens),
        "images_per_step": int(step_images),
        "flops_per_step": step_flops,
        "tokens_per_s_per_gpu": step_tokens / median / world,
        "images_per_s_per_gpu": step_images / median / world,
        "tflops_per_gpu": tflops,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "mfu": tflops / peak if peak else None,
        "peak_memory_gib": float(memory[0]),
        "memory_kind": memory_kind,
        "breakdown_s": breakdown,
        "breakdown_steps": probe_steps,
        "breakdown_rank": "global rank 0 (first pipeline stage: holds the vision side)",
    }


def main() -> None:
    from megatron_mm1.runtime import quiet_third_party_warnings, shutdown

    quiet_third_party_warnings()
    ap = argparse.ArgumentParser(description="benchmark worker (run under torchrun; see `mm1 benchmark`)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--images-per-seq", type=int, required=True)
    ap.add_argument("--samples-per-row", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    report = run_benchmark(
        load_config(args.config, args.set), args.steps, args.warmup, args.images_per_seq,
        args.samples_per_row, args.peak_tflops,
    )
    if torch.distributed.get_rank() == 0:
        args.out.write_text(json.dumps(report))
    shutdown()


if __name__ == "__main__":
    main()
