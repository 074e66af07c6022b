"""A few bf16 training steps through the training engine, for comparison across layouts.

  python tests/bf16_check.py --config tiny --data DEMO --out DIR --tag reference --initial save --set ...
  torchrun --nproc-per-node 2 tests/bf16_check.py --config tiny --data DEMO --out DIR --tag dp2 [--initial load] --set ...

Every run trains STEPS steps through `build_engine(...).train_step`, as `mm1 train` does, on
the same global batches: NUM_MICROBATCHES micro-batches a step of the demo corpus DEMO, as one
process's loader packs them, split over data-parallel ranks in contiguous shares (as gradient
accumulation splits them in one process). The reference saves its starting weights into
DIR/initial (--initial save); a run at another layout builds the same ones from the same seed,
except experts split over ranks (other RNG streams), which --initial load loads as fine-tuning
does.

Each run writes DIR/TAG.json: its layout and precision as built, and each step's metrics; and
saves its final state with the engine's own save (weights in DIR/TAG/model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

STEPS = 4
NUM_MICROBATCHES = 4


def setup(engine) -> dict:
    """What the engine was built with, as the comparison must know it."""
    from megatron.core import parallel_state

    ddp = engine.model[0].ddp_config
    return {
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
        "param_dtypes": sorted({str(p.dtype) for c in engine.model for p in c.parameters()}),
        "distributed_optimizer": ddp.use_distributed_optimizer,
        "overlap_grad_reduce": ddp.overlap_grad_reduce,
        "overlap_param_gather": ddp.overlap_param_gather,
    }


def main() -> None:
    from megatron.core import parallel_state

    from megatron_mm1.checkpoint import save_model
    from megatron_mm1.config import load_config
    from megatron_mm1.data import build_loader
    from megatron_mm1.device import to_device
    from megatron_mm1.engine_base import build_engine
    from megatron_mm1.runtime import init_runtime, quiet_third_party_warnings, shutdown

    quiet_third_party_warnings()
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--initial", choices=["save", "load"])
    ap.add_argument("--set", nargs="*", default=[])
    args = ap.parse_args()
    data = [f"data.path={args.data}", f"data.tokenizer={args.data / 'tokenizer.model'}"]
    # Warmup 0: step 1 already updates at the peak LR (a warmup from 0 would leave the first
    # update, the first that the parameter all-gather must carry, at zero).
    cfg = load_config(args.config, [*data, "training.bf16=true", f"training.steps={STEPS}", "training.warmup_steps=0", *args.set])
    cfg.training.global_batch_size = NUM_MICROBATCHES * cfg.training.micro_batch_size
    init_runtime(cfg)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    share = NUM_MICROBATCHES // dp
    engine = build_engine(cfg, share)
    if args.initial == "save":
        save_model(engine.model, args.out / "initial" / "model")
    elif args.initial == "load":
        engine.load(args.out / "initial", load_optimizer=False)
    loader = iter(build_loader(cfg, num_workers=0))  # data-parallel rank 0 of 1: whole global batches
    steps = []
    for _ in range(STEPS):
        batches = [next(loader) for _ in range(NUM_MICROBATCHES)][dp_rank * share : (dp_rank + 1) * share]
        steps.append(engine.train_step([to_device(b) for b in batches]))
    engine.save(args.out / args.tag)
    if torch.distributed.get_rank() == 0:
        (args.out / f"{args.tag}.json").write_text(json.dumps({"setup": setup(engine), "steps": steps}))
    shutdown()


if __name__ == "__main__":
    main()
