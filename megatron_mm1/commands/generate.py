"""`mm1 generate`: what a checkpoint says about images and a prompt (megatron_mm1/generate.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from megatron_mm1.config import parse_layout
    from megatron_mm1.generate import Generator, Sampling, dry_run, run_elsewhere
    from megatron_mm1.runtime import shutdown

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    sampling.check()  # before any process starts or model loads
    layout = parse_layout(args.set)
    if args.dry_run:
        print(json.dumps(dry_run(args.checkpoint, layout, args.nproc), indent=1))
        return 0
    code = run_elsewhere(args.checkpoint, layout, args.nproc, args.argv)
    if code is not None:
        return code
    generator = Generator(args.checkpoint, args.tokenizer, layout)
    (result,) = generator.generate([(args.prompt, [Path(p) for p in args.image])], sampling,
                                   progress=sys.stderr.isatty())
    if generator.env.rank == 0:
        if args.json:
            print(json.dumps({"checkpoint": str(generator.path), "prompt": args.prompt, "images": args.image, **result}))
        else:
            print(result["text"])
    shutdown()
    return 0


def add_layout_arguments(p: argparse.ArgumentParser) -> None:
    """--nproc and --set parallel.*: where a checkpoint's model runs (`mm1 generate`, `mm1 eval`)."""
    p.add_argument("--nproc", type=int, default=1, help="local processes to start when not under torchrun or srun "
                   "(default 1: the checkpoint resharded to this one process)")
    p.add_argument("--set", action="append", default=[], metavar="parallel.KEY=VALUE",
                   help="the layout over the processes, e.g. parallel.tensor_model_parallel_size=2 (repeatable; "
                   "unset sizes are 1, the rest of the processes is data parallel)")
    p.add_argument("--dry-run", action="store_true", help="check the layout against the checkpoint for --nproc "
                   "processes, print it and the data-parallel size; start nothing")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt (text and images) with a checkpoint's model",
        description="Continue a prompt with the model of an MM1 checkpoint saved at any layout, loaded "
        "at the layout given (default: one process; fp32; a GPU if there is one). The prompt's <image> "
        "markers say where each --image goes, as in training data. Greedy unless --temperature > 0. No KV "
        "cache: each new token reruns the sequence (see docs/eval.md); for long outputs use "
        "`mm1 convert to-hf` and transformers' generate(), which this command's greedy output equals.",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a run folder or its "
                   "checkpoints/ folder: the newest intact checkpoint")
    p.add_argument("--prompt", required=True, help='e.g. "<image>A photo of" (one <image> per --image)')
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image file (repeatable, in order)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="at most this many tokens (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens "
                   "whose probability reaches this (default 1.0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument("--tokenizer", help="SentencePiece model (default: data.tokenizer of the checkpoint's config)")
    p.add_argument("--json", action="store_true", help="print the prompt, the token ids and the text as JSON")
    add_layout_arguments(p)
    p.set_defaults(func=run)
