"""`mm1 demo`: generate the embedded demo corpus and train a tiny MM1 on it with 4 processes
in a TP2 x PP2 layout (CPU and gloo without a GPU)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEMO_SETTINGS = [
    "parallel.tensor_model_parallel_size=2",
    "parallel.pipeline_model_parallel_size=2",
    "parallel.sequence_parallel=true",
    "training.lr=3e-3",
    "training.warmup_steps=10",
    "training.weight_decay=0.0",
]


def run(args: argparse.Namespace) -> int:
    from megatron_mm1.config import load_config, validate
    from megatron_mm1.data.demo import make_demo
    from megatron_mm1.launch import launch_local

    out = Path(args.out).resolve()
    data = out / "data"
    overrides = [
        *DEMO_SETTINGS,
        f"training.steps={args.steps}",
        f"data.path={data}",
        f"data.tokenizer={data / 'tokenizer.model'}",
        *args.set,
    ]
    validate(load_config(args.config, overrides), world_size=args.nproc)  # before any work
    if not (data / "tokenizer.model").exists():
        print(f"generating the demo corpus in {data}")
        make_demo(data, progress=True)
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    print(f"training {args.config} for {args.steps} steps on {args.nproc} processes (TP2 x PP2)")
    start = time.time()
    sets = [x for item in overrides for x in ("--set", item)]
    code = launch_local(args.nproc, "megatron_mm1.train", ["--config", args.config, "--out", str(out), *sets])
    if code != 0:
        print(f"mm1 demo: training exited with code {code}", file=sys.stderr)
        return code
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / min(5, len(rows))
    print(
        f"\ndone in {time.time() - start:.0f}s: loss {first:.3f} at step 1 -> {last:.3f} "
        f"(mean of the last 5 steps), {100 * (first - last) / first:.0f}% lower"
    )
    print(f"metrics: {metrics}")
    print("next: `mm1 params --config mm1-3b` for the full-size model; `mm1 data --help` to prepare your own data")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a tiny MM1 on generated data with 4 processes (TP2 x PP2)",
        description="Generate the embedded demo corpus (no download) and train a tiny MM1 on it "
        "in a real TP2 x PP2 layout: 4 processes, gloo on CPU.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--config", default="tiny", help="preset or YAML (default: tiny)")
    p.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    p.add_argument("--nproc", type=int, default=4, help="processes (default: 4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.set_defaults(func=run)
