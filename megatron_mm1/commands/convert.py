"""`mm1 convert`: MM1 checkpoints <-> Hugging Face transformers folders (docs/convert.md)."""

from __future__ import annotations

import argparse
import json

# --verify fails beyond these (fp32 comparison of the same weights).
MAX_ABS_DIFF = 1e-4
MIN_TOP1 = 1.0


def run_to_hf(args: argparse.Namespace) -> int:
    from megatron_mm1.hf.export import to_hf
    from megatron_mm1.hf.hf_io import parse_size

    out = to_hf(
        args.checkpoint, args.out, text_only=args.text_only, tokenizer=args.tokenizer,
        max_shard_bytes=parse_size(args.max_shard_size), progress=not args.quiet,
    )
    print(f"wrote {out}")
    if not args.verify:
        return 0
    from megatron_mm1.hf.verify import verify

    metrics = verify(args.checkpoint, out, text_only=args.text_only)
    ok = metrics["max_abs_diff"] <= MAX_ABS_DIFF and metrics["top1_agreement"] >= MIN_TOP1
    print("verify " + json.dumps(metrics) + (" OK" if ok else " FAILED"))
    if not ok:
        print(f"verify: beyond tolerance (max abs diff <= {MAX_ABS_DIFF}, top-1 agreement {MIN_TOP1:.0%})")
    return 0 if ok else 1


def run_from_hf(args: argparse.Namespace) -> int:
    from megatron_mm1.hf.importer import from_hf

    out = from_hf(
        args.hf, args.out, vision_dir=args.vision, config=args.config, overrides=args.set,
        progress=not args.quiet,
    )
    print(f"wrote {out}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert checkpoints to and from Hugging Face transformers",
        description="Convert MM1 checkpoints (any parallel layout) to Hugging Face folders and back.",
    )
    sub = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)

    to = sub.add_parser(
        "to-hf",
        help="MM1 checkpoint -> Hugging Face folder",
        description="Write an MM1 checkpoint as a Hugging Face folder: the full model "
        "(AutoModelForImageTextToText, trust_remote_code) or, with --text-only, the LLM as a "
        "native causal LM (AutoModelForCausalLM).",
    )
    to.add_argument("--checkpoint", required=True, help="a checkpoint folder (config.yaml + model/), or a run folder "
                    "or its checkpoints/ folder: the newest intact checkpoint")
    to.add_argument("--out", required=True, help="Hugging Face folder to create (must not exist)")
    to.add_argument("--text-only", action="store_true", help="export the LLM alone, no remote code")
    to.add_argument("--tokenizer", help="SentencePiece model (default: data.tokenizer of the checkpoint's config)")
    to.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    to.add_argument("--verify", action="store_true", help="compare logits with the checkpoint's; exit 1 beyond tolerance")
    to.add_argument("--quiet", action="store_true", help="no progress bar")
    to.set_defaults(func=run_to_hf)

    fr = sub.add_parser(
        "from-hf",
        help="Hugging Face folder(s) -> MM1 checkpoint",
        description="Initialise an MM1 checkpoint from an exported MM1 folder, or from a native "
        "causal LM folder (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE) plus "
        "optionally a CLIP, SigLIP or SigLIP2 vision folder; parts without a source are freshly initialised. "
        "Inexact sources are refused by name (see docs/convert.md).",
    )
    fr.add_argument("--hf", required=True, help="MM1 folder (from to-hf) or native causal-LM folder")
    fr.add_argument("--out", required=True, help="checkpoint folder to create (must not exist)")
    fr.add_argument("--vision", help="vision folder for the encoder: CLIP, SigLIP or SigLIP2 (the vision model, e.g. "
                    "CLIPVisionModel, or the composite one, e.g. SiglipModel)")
    fr.add_argument("--config", help="base config for a native LLM folder (preset or YAML; default mm1-3b)")
    fr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    fr.add_argument("--quiet", action="store_true", help="no progress bar")
    fr.set_defaults(func=run_from_hf)
