"""The ``imix2mix`` command line.

Each group of subcommands lives in its own module under :mod:`imix2mix.commands` and exposes
``register(subparsers)``; handlers return an exit code.  Errors derived from
:class:`~imix2mix.errors.ImixError` are printed as one line, without a stack trace.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from imix2mix.errors import ImixError

# Orchestrating commands (collection, watch) import Prefect and Ray lazily inside their handlers,
# so the library stays usable without them.
COMMAND_MODULES = (
    "imix2mix.commands.scene",
    "imix2mix.commands.edit",
    "imix2mix.commands.pipeline",
    "imix2mix.commands.evaluate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imix2mix",
        description="Consistent instruction editing of sparse multi-view photo sets (InstructMix2Mix).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command group not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ImixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
