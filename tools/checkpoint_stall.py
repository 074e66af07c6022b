"""How long training waits for its checkpoints, synchronous against checkpoint.async_save.

  .venv/bin/python tools/checkpoint_stall.py --nproc 2 --steps 12 --save-interval 3

Trains the same widened tiny model twice with `mm1 train` (same data, layout and schedule), once
per mode, and reads `checkpoint_s` from metrics.jsonl: the seconds each step boundary spent on
checkpoint work (a save; with async_save, starting the background writers and publishing a
finished save). A save's stall is the sum over the steps of its interval. The last step's
save waits for its writers in both modes and is left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# About 130M LLM parameters: checkpoints of 1.93 GiB with the optimizer state (fp32).
WIDE = ["model.llm.hidden_size=1024", "model.llm.ffn_hidden_size=4096", "model.llm.num_layers=8",
        "model.llm.num_attention_heads=8", "model.llm.num_query_groups=4", "data.seq_length=128",
        "training.global_batch_size=2", "training.micro_batch_size=1", "training.warmup_steps=2"]


def train(data: Path, out: Path, args: argparse.Namespace, async_save: bool) -> list[dict]:
    sets = [*WIDE, f"checkpoint.save_interval={args.save_interval}", f"checkpoint.async_save={str(async_save).lower()}",
            "checkpoint.keep_last=2", *args.set]
    cmd = [sys.executable, "-m", "megatron_mm1.cli", "train", "--config", args.config, "--data", str(data),
           "--out", str(out), "--steps", str(args.steps), "--nproc", str(args.nproc)]
    for item in sets:
        cmd += ["--set", item]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def stalls(rows: list[dict], interval: int) -> list[float]:
    """Checkpoint seconds per save interval, the last (waited-for) save left out."""
    by_step = {r["step"]: r.get("checkpoint_s", 0.0) for r in rows}
    last = max(by_step)
    starts = [s for s in by_step if s % interval == 0 and s + interval <= last]
    return [sum(by_step.get(s + k, 0.0) for k in range(interval)) for s in starts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-interval", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], help="more config overrides")
    parser.add_argument("--work", type=Path, help="folder for the data and runs (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        data = work / "data"
        if not data.is_dir():
            subprocess.run([sys.executable, "-m", "megatron_mm1.cli", "data", "demo", "--out", str(data)],
                           check=True, stdout=subprocess.DEVNULL)
        for async_save in (False, True):
            out = work / ("async" if async_save else "sync")
            rows = train(data, out, args, async_save)
            ckpt = out / "checkpoints" / f"step_{args.steps:07d}"
            size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) / 2**30
            per_save = stalls(rows, args.save_interval)
            step = statistics.median(r["step_time_s"] for r in rows[1:])
            print(f"{'async' if async_save else 'sync':5}  checkpoint {size:.2f} GiB  stall per save "
                  f"{statistics.mean(per_save):6.2f} s (each: {', '.join(f'{s:.2f}' for s in per_save)})  "
                  f"median step {step:.2f} s", flush=True)


if __name__ == "__main__":
    main()
