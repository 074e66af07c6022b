"""`mm1 submit`: render slurm/train.sbatch for a run, check it, and sbatch it (docs/slurm.md)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from megatron_mm1.config import ConfigError
    from megatron_mm1.planner import GPUS, evaluate_config_layout, fit_warning
    from megatron_mm1.run_folder import refuse_if_locked
    from megatron_mm1.slurm import Job, check, cluster_has_gpus, render, submit

    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be >= 1")
    device = args.device
    if device == "auto":
        device = "cpu" if cluster_has_gpus() is False else "gpu"
    out = Path(args.out).resolve()
    data = Path(args.data).resolve() if args.data else None
    job = Job(
        config=args.config, out=out, nodes=args.nodes, gpus_per_node=args.gpus_per_node, device=device,
        data=data, steps=args.steps, sets=args.set, time=args.time, partition=args.partition,
        account=args.account, qos=args.qos, max_restarts=args.max_restarts,
        rdzv_timeout=args.rdzv_timeout, job_name=args.job_name,
    )
    cfg = check(job.config, job.world_size, data, args.steps, args.set)  # before anything is submitted
    if not args.dry_run:
        refuse_if_locked(out)
    script = render(job)
    what = "GPUs" if device == "gpu" else "CPU processes"
    summary = f"{args.config}: {args.nodes} nodes x {args.gpus_per_node} {what} = world size {job.world_size}, valid"
    if device == "gpu" and cfg.training.engine == "megatron":  # the planner models megatron's engine on GPUs
        gpu = GPUS[args.gpu_type]
        own = evaluate_config_layout(cfg, job.world_size, gpu)
        summary += (f"; planner (mm1 plan): layout {own['name']} ~{own['memory_gib']['total']:.1f} GiB per GPU, "
                    f"{'fits' if own['fits'] else 'does NOT fit'} {gpu.memory_gib} GiB of a {gpu.name}")
        if not own["fits"]:
            print(fit_warning(cfg, job.world_size, gpu, own), file=sys.stderr)  # a warning: submit anyway
    if args.dry_run:
        print(f"# {summary}", file=sys.stderr)
        print(script, end="")
        return 0
    (out / "logs").mkdir(parents=True, exist_ok=True)
    path = out / "train.sbatch"
    path.write_text(script)
    job_id = submit(path)
    with open(out / "submit.txt", "a") as record:
        record.write(f"{job_id}: {shlex.join(['mm1', *sys.argv[1:]])}\n")
    print(f"submitted job {job_id} ({summary})")
    print(f"  script:  {path}")
    print(f"  logs:    {out / 'logs' / job_id}.out (Slurm), {out / 'logs' / job_id}-restart<k>.log (each start)")
    print(f"  records: {out / 'config.yaml'}, {out / 'command.sh'}, {out / 'exit.json'}")
    print(f"  follow:  squeue -j {job_id}; tail -f {out / 'logs' / job_id}-restart0.log")
    print(f"  stop:    scancel --signal=USR1 --batch {job_id} (save, then requeue); scancel {job_id} (at once)")
    print(job_id)
    return 0


def add_parser(subparsers) -> None:
    from megatron_mm1.commands.train import add_train_arguments
    from megatron_mm1.planner import GPUS

    p = subparsers.add_parser(
        "submit",
        help="render the Slurm script for a training run, check it, and submit it",
        description="Render slurm/train.sbatch for CONFIG on NODES x GPUS_PER_NODE processes, check "
        "that the layout fits the world size and that the data and tokenizer exist, then sbatch it "
        "(or print it with --dry-run). The job checkpoints and requeues itself before its time "
        "limit and resumes from the newest checkpoint. See docs/slurm.md.",
    )
    add_train_arguments(p)
    p.add_argument("--nodes", type=int, required=True, help="nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node, one process each (on clusters without GPUs: processes per node)")
    p.add_argument("--gpu-type", choices=GPUS, default="h100-80gb", help="GPU model of the nodes, for the planner's memory check of the layout (default h100-80gb)")
    p.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto", help="gpu: request GPUs; cpu: CPU processes (gloo); auto: cpu when sinfo shows no GPU GRES (default)")
    p.add_argument("--time", help="time limit of one allocation, e.g. 04:00:00 or 2-00:00:00 (default: the template's)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--qos", help="Slurm quality of service")
    p.add_argument("--max-restarts", type=int, help="requeues allowed (time limits, preemptions, failures; default: the template's, 20)")
    p.add_argument("--rdzv-timeout", type=int, help="seconds for every process to reach the rendezvous (default: the template's, 600)")
    p.add_argument("--job-name", help="Slurm job name (default mm1-CONFIG)")
    p.add_argument("--dry-run", action="store_true", help="check and print the sbatch script; submit nothing")
    p.set_defaults(func=run)
