"""`mm1 train`: pretraining or fine-tuning with the megatron or DeepSpeed engine.

Under torchrun or srun (RANK/WORLD_SIZE or SLURM_PROCID set) each process runs the loop
itself; otherwise `--nproc N` starts N local processes (launch.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_mm1.config import Config


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """--data, --steps and --set as config overrides (later wins)."""
    sets = []
    if args.data:
        data = Path(args.data).resolve()
        sets += [f"data.path={data}", f"data.tokenizer={data / 'tokenizer.model'}"]
    if args.steps is not None:
        sets.append(f"training.steps={args.steps}")
    return sets + args.set


def worker_args(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    argv = ["--config", args.config, "--out", str(Path(args.out).resolve())]
    if args.resume:
        argv += ["--resume", args.resume]
    if args.new_schedule:
        argv.append("--new-schedule")
    for item in overrides:
        argv += ["--set", item]
    return argv


def warn_if_layout_does_not_fit(cfg: Config, world_size: int, local_rank: int) -> None:
    """On a GPU, print the planner's suggestion to stderr when the layout is estimated not to
    fit this GPU's memory at `world_size` processes; never blocks the run."""
    import torch

    if cfg.training.engine != "megatron" or not torch.cuda.is_available():
        return  # the planner models megatron's engine on a GPU
    from megatron_mm1.planner import evaluate_config_layout, fit_warning, measured_gpu

    props = torch.cuda.get_device_properties(local_rank)
    gpu = measured_gpu(props.name, props.total_memory)
    own = evaluate_config_layout(cfg, world_size, gpu)
    if not own["fits"]:
        print(fit_warning(cfg, world_size, gpu, own), file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from megatron_mm1.config import config_to_dict, load_config, validate
    from megatron_mm1.launch import under_launcher
    from megatron_mm1.runtime import dist_env, set_cuda_environment

    overrides = overrides_from_args(args)
    launched = under_launcher()
    env = dist_env()
    world_size = env.world_size if launched else args.nproc
    cfg = load_config(args.config, overrides)
    validate(cfg, world_size=world_size)  # before any process starts
    if cfg.training.engine == "deepspeed":
        from megatron_mm1.config import data_parallel_size
        from megatron_mm1.ds_engine import read_deepspeed_config

        t = cfg.training
        read_deepspeed_config(cfg, t.global_batch_size // (t.micro_batch_size * data_parallel_size(cfg, world_size)))
    if args.dry_run:
        print(json.dumps({"world_size": world_size, "config": config_to_dict(cfg)}, indent=1))
        return 0
    from megatron_mm1.data.mixture import datasets_from_config, validation_datasets
    from megatron_mm1.models.te_spec import check_runs

    check_runs(cfg)  # the layer spec's kernels on this machine (a dry run may plan for another)
    datasets_from_config(cfg.data)  # the training and validation data's manifests, before any process starts
    validation_datasets(cfg.data)
    set_cuda_environment(cfg)  # before the fit check below queries the GPU
    if env.rank == 0:  # under torchrun or srun every process runs this: warn once
        warn_if_layout_does_not_fit(cfg, world_size, env.local_rank)
    if launched or args.nproc == 1:
        from megatron_mm1.train import main

        return main(worker_args(args, overrides))
    from megatron_mm1.launch import launch_local

    return launch_local(args.nproc, "megatron_mm1.train", worker_args(args, overrides))


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="preset name (e.g. mm1-3b, tiny) or YAML path")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, tensorboard/")
    p.add_argument("--data", help="prepared data folder (`mm1 data prepare`); its tokenizer.model is used")
    p.add_argument("--steps", type=int, help="total training steps (training.steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. parallel.tensor_model_parallel_size=2 (repeatable)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune (megatron or DeepSpeed engine), with checkpoints and resume",
        description="Train an MM1 model. Run under torchrun/srun (one process per device), or "
        "give --nproc N to start N local processes. One run per OUT folder. Exit codes: 0 done, 75 "
        "stopped by SIGTERM/SIGUSR1/SIGINT after saving (requeue), 76 hung (requeue), 74 a checkpoint "
        "could not be written (disk full), 3 stopped after repeated NaN/Inf steps, 2 configuration "
        "error, OUT in use or holding another run, or no checkpoint to resume.",
    )
    add_train_arguments(p)
    p.add_argument("--resume", help="'auto' (the newest intact checkpoint in OUT, if any; a damaged one is set "
                   "aside) or a checkpoint folder; without it OUT must not hold a run yet")
    p.add_argument("--new-schedule", action="store_true", help="let a resume change the LR schedule's settings "
                   "(--steps, training.lr, warmup); refused otherwise")
    p.add_argument("--nproc", type=int, default=1, help="local processes to start when not under a launcher (default 1)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config; start nothing")
    p.set_defaults(func=run)
