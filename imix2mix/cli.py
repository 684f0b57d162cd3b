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
from imix2mix.logs import quiet_third_party_notices

# Orchestrating commands (collection, watch) import Prefect and Ray lazily inside their handlers,
# so the library stays usable without them.
COMMAND_MODULES = (
    "imix2mix.commands.scene",
    "imix2mix.commands.edit",
    "imix2mix.commands.pipeline",
    "imix2mix.commands.evaluate",
    "imix2mix.commands.manifests",
)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default, unless its help already names it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


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
    for command in subparsers.choices.values():
        command.formatter_class = DefaultsHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_third_party_notices()
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
