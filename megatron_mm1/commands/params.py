"""`mm1 params`: parameter counts of a config, from its arithmetic (no model is built)."""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from megatron_mm1.arithmetic import model_parameters
    from megatron_mm1.config import load_config, validate

    cfg = load_config(args.config, args.set)
    validate(cfg)  # the counts of a config that cannot be built would mean nothing
    counts = model_parameters(cfg)
    if args.json:
        print(json.dumps(counts))
    else:
        for name, value in counts.items():
            print(f"{name:>10}: {value:>16,d}  ({value / 1e9:.2f}B)")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "params",
        help="count parameters (total, llm, vision, connector, active)",
        description="Count a config's parameters from its shapes (megatron_mm1/arithmetic.py, which "
        "the tests check against real models): nothing is built or allocated.",
    )
    p.add_argument("--config", required=True, help="preset name (e.g. mm1-3b) or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. model.llm.num_layers=24 (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
