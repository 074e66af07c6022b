"""The training loop on megatron-core: DDP, megatron's optimizer and LR schedule, the data
pipeline, megatron's pipeline schedules. Run one process per device (torchrun)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from megatron_mm1.config import Config, data_parallel_size, load_config


def build_optimizer(cfg: Config, model: list):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.training
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.lr * t.min_lr_ratio,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            clip_grad=t.grad_clip,
            bf16=t.bf16,
            params_dtype=torch.bfloat16 if t.bf16 else torch.float32,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.lr * t.min_lr_ratio,
        lr_warmup_steps=min(t.warmup_steps, t.steps - 1),
        lr_decay_steps=t.steps,
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def next_microbatches(loader, count: int) -> list[dict]:
    """The step's micro-batches: read on TP rank 0 (`loader`), broadcast to its TP peers."""
    from megatron.core import parallel_state

    batches = [next(loader) for _ in range(count)] if loader is not None else None
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        box = [batches]
        torch.distributed.broadcast_object_list(
            box,
            src=parallel_state.get_tensor_model_parallel_src_rank(),
            group=parallel_state.get_tensor_model_parallel_group(),
        )
        batches = box[0]
    return batches


def train(cfg: Config, out: Path) -> list[dict]:
    """Train for cfg.training.steps; rank 0 writes one JSON line per step to out/metrics.jsonl."""
    from megatron.core import parallel_state
    from tqdm import tqdm

    from megatron_mm1.data import build_loader
    from megatron_mm1.engine import forward_backward, wrap_ddp
    from megatron_mm1.models.mm1 import build_model
    from megatron_mm1.runtime import init_runtime

    env = init_runtime(cfg)
    dp = data_parallel_size(cfg, env.world_size)
    num_microbatches = cfg.training.global_batch_size // (cfg.training.micro_batch_size * dp)
    model = wrap_ddp(build_model(cfg))
    optimizer, scheduler = build_optimizer(cfg, model)
    # Data is produced only where needed: TP rank 0 of each pipeline stage reads this DP rank's
    # share and hands it to its TP peers; only the first stage (the vision side) decodes images.
    loader = None
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        loader = iter(build_loader(cfg, parallel_state.get_data_parallel_rank(), dp, images=first_stage))
    is_logger = env.rank == 0
    if is_logger:
        out.mkdir(parents=True, exist_ok=True)
    history = []
    bar = tqdm(range(1, cfg.training.steps + 1), desc="train", disable=not is_logger)
    for step in bar:
        start = time.perf_counter()
        batches = next_microbatches(loader, num_microbatches)
        metrics = forward_backward(model, batches, cfg, num_microbatches)
        ok, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        row = {
            "step": step,
            **metrics,
            "lr": scheduler.get_lr(optimizer.param_groups[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "step_time_s": time.perf_counter() - start,
        }
        history.append(row)
        if is_logger:
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    return history


def main() -> None:
    from megatron_mm1.runtime import quiet_third_party_warnings, shutdown

    quiet_third_party_warnings()
    ap = argparse.ArgumentParser(description="training worker (run under torchrun)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    train(load_config(args.config, args.set), args.out)
    shutdown()


if __name__ == "__main__":
    main()
