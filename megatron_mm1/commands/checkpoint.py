"""`mm1 checkpoint verify`: check checkpoints against the sizes and SHA-256 checksums recorded
when they were saved, as `mm1 train --resume auto` does before it loads one."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from megatron_mm1.checkpoint import checkpoint_folders, read_manifest, verify_checkpoint

    results = []
    for ckpt in checkpoint_folders(Path(args.path)):
        progress = not args.quiet and not args.json and sys.stderr.isatty()
        problems = verify_checkpoint(ckpt, workers=args.workers, progress=progress)
        size = 0 if problems else sum(entry["bytes"] for entry in read_manifest(ckpt).values())
        results.append({"checkpoint": str(ckpt), "intact": not problems, "bytes": size, "problems": problems})
        if not args.json:
            status = f"intact ({size / 2**20:,.1f} MiB)" if not problems else "DAMAGED: " + "; ".join(problems)
            print(f"{ckpt}: {status}", flush=True)
    intact = [r["checkpoint"] for r in results if r["intact"]]
    if args.json:
        print(json.dumps({"checkpoints": results, "resume_auto": intact[0] if intact else None}, indent=1))
    elif len(results) > 1:
        print(f"--resume auto would resume from {intact[0]}" if intact else "--resume auto finds no intact checkpoint")
    return 0 if len(intact) == len(results) else 1


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "checkpoint",
        help="check checkpoints against the sizes and checksums recorded when they were saved",
        description="Checkpoint tools.",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    v = sub.add_parser(
        "verify",
        help="check every file of a checkpoint (or of each checkpoint of a run) against its manifest",
        description="Check every file of a checkpoint against the size and SHA-256 recorded in its "
        "manifest.json when it was saved, as `mm1 train --resume auto` does before loading it. PATH "
        "is one checkpoint (RUN/checkpoints/step_*), or a run folder or its checkpoints/ folder: then "
        "each checkpoint, in the order --resume auto tries them. Exit code 0 when every checkpoint "
        "checked is intact, 1 when any is damaged, 2 when PATH holds none.",
    )
    v.add_argument("path", metavar="PATH")
    v.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="files checked at once (default: up to 8)")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=run)
