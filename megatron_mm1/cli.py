"""The `mm1` command. Each subcommand lives in its own module and registers itself here.

Heavy imports (torch, megatron-core) happen inside the subcommands so `mm1 --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, function adding the subcommand's parser); each parser sets `func`.
SUBCOMMANDS = [
    ("megatron_mm1.commands.params", "add_parser"),
    ("megatron_mm1.commands.train", "add_parser"),
    ("megatron_mm1.commands.demo", "add_parser"),
    ("megatron_mm1.data.cli", "add_parser"),
    ("megatron_mm1.commands.plan", "add_parser"),
    ("megatron_mm1.commands.benchmark", "add_parser"),
    ("megatron_mm1.commands.convert", "add_parser"),
    ("megatron_mm1.commands.checkpoint", "add_parser"),
    ("megatron_mm1.commands.submit", "add_parser"),
    ("megatron_mm1.commands.eval", "add_parser"),
    ("megatron_mm1.commands.generate", "add_parser"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm1",
        description="Train, convert and benchmark MM1-style multimodal LLMs on megatron-core.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, fn in SUBCOMMANDS:
        getattr(importlib.import_module(module), fn)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_mm1.config import ConfigError, RunRefused
    from megatron_mm1.runtime import dist_env, quiet_third_party_warnings

    quiet_third_party_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to run the same command in more processes
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        if not isinstance(e, RunRefused) or dist_env().rank == 0:
            print(f"mm1 {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
