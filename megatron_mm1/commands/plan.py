"""`mm1 plan`: rank the parallel layouts of a config for a GPU count by estimated throughput,
with per-GPU memory, say why every other layout does not fit, and whether the config's own
layout fits."""

from __future__ import annotations

import argparse
import json
from collections import Counter


def _table(result: dict, top: int) -> str:
    rows = [
        "| # | layout | TP | PP | VPP | EP | DP | micro-batch | recompute | weights | grads | optimizer | activations | total GiB | rel. throughput |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, f in enumerate(result["fits"][:top], 1):
        lay, mem = f["layout"], f["memory_gib"]
        rows.append(
            f"| {i} | {f['name']} | {lay['tp']} | {lay['pp']} | {lay['vpp'] or '-'} | {lay['ep']} | {lay['dp']} | "
            f"{lay['micro_batch']} | {lay['recompute']} | {mem['weights']:.1f} | {mem['gradients']:.1f} | "
            f"{mem['optimizer']:.1f} | {mem['activations']:.1f} | {mem['total']:.1f} | {f['relative_throughput']:.2f} |"
        )
    return "\n".join(rows)


def _preset_line(result: dict) -> str:
    """One line on the config's own layout: fits or why not, and what to use instead."""
    own = result["preset_layout"]
    if own["fits"]:
        return f"the config's own layout {own['name']} fits: {own['memory_gib']['total']:.1f} GiB per GPU"
    name = own["name"] or "tp{tp}pp{pp}".format(**own["layout"])  # no name without a DP
    line = f"the config's own layout {name} does NOT fit: {own['reason']}"
    if result["fits"]:
        line += f"; use instead: {' '.join('--set ' + o for o in result['fits'][0]['overrides'])}"
    return line


def run(args: argparse.Namespace) -> int:
    from megatron_mm1.config import load_config
    from megatron_mm1.planner import GPUS, plan

    cfg = load_config(args.config, args.set)
    result = plan(cfg, args.gpus, GPUS[args.gpu_type], args.images_per_seq)
    if args.json:
        print(json.dumps(result))
        return 0 if result["fits"] else 1
    gpu = result["gpu"]
    print(
        f"{args.config} on {args.gpus} x {gpu['name']} ({gpu['memory_gib']} GiB usable, 4 GiB reserved), "
        f"{result['images_per_sequence']} images per sequence, seq {cfg.data.seq_length}, "
        f"global batch {cfg.training.global_batch_size}, "
        f"{'distributed' if result['distributed_optimizer'] else 'replicated'} optimizer (training.distributed_optimizer), "
        f"layer spec {cfg.model.layer_spec}\n"
    )
    print(_preset_line(result) + "\n")
    if result["fits"]:
        print(f"{len(result['fits'])} layouts fit; the best {min(args.top, len(result['fits']))} (memory: most loaded GPU, GiB):\n")
        print(_table(result, args.top))
        print(f"\nuse the first: {' '.join('--set ' + o for o in result['fits'][0]['overrides'])}")
    else:
        print("no layout fits")
    reasons = Counter(r["kind"] for r in result["rejected"])
    print(f"\n{len(result['rejected'])} layouts rejected; most common reasons (--json lists each):")
    for reason, count in reasons.most_common(args.reasons):
        print(f"  {count:4d} x {reason}")
    return 0 if result["fits"] else 1


def add_parser(subparsers) -> None:
    from megatron_mm1.planner import GPUS

    p = subparsers.add_parser(
        "plan",
        help="rank parallel layouts for N GPUs by estimated throughput and memory",
        description="Enumerate TP, PP (virtual), EP, DP, micro-batch and recomputation for N GPUs, "
        "estimate per-GPU memory and relative throughput, rank the layouts that fit and give the "
        "reason each rejected one does not. Every proposed layout passes config validation.",
    )
    p.add_argument("--config", required=True, help="preset name or YAML path")
    p.add_argument("--gpus", type=int, required=True, help="total GPU count")
    p.add_argument("--gpu-type", default="h100-80gb", choices=GPUS, help="GPU model (default h100-80gb)")
    p.add_argument("--images-per-seq", type=int, default=None,
                   help="images per sequence for activation memory (default: model.max_images_per_sequence, the worst case)")
    p.add_argument("--top", type=int, default=10, help="layouts shown (default 10)")
    p.add_argument("--reasons", type=int, default=8, help="rejection reasons shown (default 8)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every layout")
    p.set_defaults(func=run)
