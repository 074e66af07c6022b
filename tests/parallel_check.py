"""Loss and gradients of one step at a parallel layout, for comparison with one process.

  python tests/parallel_check.py reference --config tiny --out DIR
  torchrun --nproc-per-node N tests/parallel_check.py run --config tiny --out DIR --tag T --set ... [--packing thd]
  python tests/parallel_check.py compare --config tiny --out DIR --tag T

`reference` saves the weights and one process's loss and gradients; `run` loads the weights at
its layout, runs the same global batch (split over DP ranks as gradient-accumulation
micro-batches are split in the reference) and saves its loss and gradients as a megatron-core
distributed checkpoint; `compare` reloads both at one process and prints the relative errors.
`--packing thd` packs the config's layer spec as THD, the `te` spec's packing (models/specs.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from megatron_mm1.config import load_config
from megatron_mm1.checkpoint import load_model, save_model, save_sharded
from megatron_mm1.engine import forward_backward, grads_sharded_state_dict, wrap_ddp
from megatron_mm1.models.mm1 import build_model
from megatron_mm1.models.specs import PACKING
from megatron_mm1.runtime import init_runtime, shutdown
from megatron_mm1.synthetic import synthetic_microbatch

NUM_MICROBATCHES = 4
# Images per row of each micro-batch: none, one and several, at random positions.
IMAGE_COUNTS = [[0, 1], [3, 0], [1, 2], [2, 2]]


def global_batch(cfg):
    return [
        synthetic_microbatch(cfg, seed=100 + i, images_per_row=IMAGE_COUNTS[i][: cfg.training.micro_batch_size])
        for i in range(NUM_MICROBATCHES)
    ]


def step(cfg, model, out: Path, tag: str) -> None:
    from megatron.core import parallel_state

    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    share = NUM_MICROBATCHES // dp
    batches = global_batch(cfg)[dp_rank * share : (dp_rank + 1) * share]
    metrics = forward_backward(model, batches, cfg, num_microbatches=share)
    save_sharded(grads_sharded_state_dict(model), out / f"{tag}_grads")
    if torch.distributed.get_rank() == 0:
        (out / f"{tag}_loss.json").write_text(json.dumps(metrics))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["reference", "run", "compare"])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tag", nargs="*", default=[])
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--packing", choices=sorted(set(PACKING.values())))
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    if args.packing:
        PACKING[cfg.model.layer_spec] = args.packing  # read by MM1Model and the pipeline's shapes
    cfg.training.global_batch_size = NUM_MICROBATCHES * cfg.training.micro_batch_size
    init_runtime(cfg)
    torch.manual_seed(0)
    model = wrap_ddp(build_model(cfg))
    if args.mode == "reference":
        save_model(model, args.out / "weights")
        step(cfg, model, args.out, "reference")
    elif args.mode == "run":
        load_model(model, args.out / "weights")
        step(cfg, model, args.out, args.tag[0])
    else:
        load_model(model, args.out / "reference_grads")
        ref = {
            k: p.detach().clone() for k, p in model[0].module.named_parameters()
        }
        report = {}
        for tag in args.tag:
            load_model(model, args.out / f"{tag}_grads")
            errors = {
                name: float((p.detach() - ref[name]).norm() / ref[name].norm().clamp(min=1e-12))
                for name, p in model[0].module.named_parameters()
            }
            worst = sorted(errors, key=errors.get)[-3:]
            ref_loss = json.loads((args.out / "reference_loss.json").read_text())
            loss = json.loads((args.out / f"{tag}_loss.json").read_text())
            report[tag] = {
                "grad_rel_err": errors[worst[-1]],
                "worst": {name: errors[name] for name in worst},
                "loss": loss["loss"],
                "reference_loss": ref_loss["loss"],
                "loss_rel_err": abs(loss["loss"] - ref_loss["loss"]) / abs(ref_loss["loss"]),
            }
        print("REPORT " + json.dumps(report))
    shutdown()


if __name__ == "__main__":
    main()
