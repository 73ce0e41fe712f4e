"""The ``fastcam`` command (SPEC §6). Subcommands register themselves in ``COMMANDS``."""

from __future__ import annotations

import argparse
import sys

from fastcam.cli import bench, demo, explain, info, train

COMMANDS = {"demo": demo, "train": train, "explain": explain, "bench": bench, "info": info}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcam", description="fused class attention maps and their loss")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command].run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
