"""The ``concord`` command: ``run`` (launcher), ``train`` (the main job), ``data``, ``bench``.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` and
``main(args) -> int``; this file only dispatches. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from concord.errors import ConcordError, UsageError

#: subcommand -> module that implements it
COMMANDS = {
    "run": "concord.launch.command",
    "train": "concord.jobs.train",
    "data": "concord.data.command",
    "bench": "concord.jobs.bench",
}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"concord: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="concord", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"concord: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("concord: interrupted", file=sys.stderr)
        return 130
    except ConcordError as exc:
        print(f"concord: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
