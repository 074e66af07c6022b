"""`mm1 generate`: what a checkpoint says about images and a prompt (megatron_mm1/generate.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from megatron_mm1.generate import Generator, check_sampling

    check_sampling(args.max_new_tokens, args.temperature, args.top_p)  # before loading the model
    generator = Generator(args.checkpoint, args.tokenizer)
    result = generator(args.prompt, [Path(p) for p in args.image], args.max_new_tokens, args.temperature,
                       args.top_p, args.seed, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps({"checkpoint": str(generator.path), "prompt": args.prompt, "images": args.image, **result}))
    else:
        print(result["text"])
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt (text and images) with a checkpoint's model",
        description="Continue a prompt with the model of an MM1 checkpoint saved at any layout, "
        "resharded to this one process (fp32; a GPU if there is one). The prompt's <image> markers "
        "say where each --image goes, as in training data. Greedy unless --temperature > 0. No KV "
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
    p.set_defaults(func=run)
