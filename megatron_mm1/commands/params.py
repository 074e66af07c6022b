"""`mm1 params`: parameter counts of a config without allocating the model."""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from megatron_mm1.config import load_config
    from megatron_mm1.params import count_parameters

    counts = count_parameters(load_config(args.config, args.set))
    if args.json:
        print(json.dumps(counts))
    else:
        for name, value in counts.items():
            print(f"{name:>10}: {value:>16,d}  ({value / 1e9:.2f}B)")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "params",
        help="count parameters (total, llm, vision, connector, active) on the meta device",
        description="Count a config's parameters from a model built on the meta device: "
        "nothing is allocated, no GPU is used.",
    )
    p.add_argument("--config", required=True, help="preset name (e.g. mm1-3b) or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. model.llm.num_layers=24 (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
