"""``concord bench NAME [ARGS...]``: run one of the checkout's ``benchmarks/NAME.py``.

concord bench --list
concord bench allreduce_bandwidth --quick
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from concord.errors import UsageError

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def available() -> list[str]:
    """Benchmark names found next to the package (a source checkout)."""
    if not BENCH_DIR.is_dir():
        return []
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark from benchmarks/")
    parser.add_argument("name", nargs="?", help="benchmark name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    names = available()
    if args.list or not args.name:
        print("\n".join(names) if names else f"no benchmarks found in {BENCH_DIR}")
        return 0
    if args.name not in names:
        raise UsageError(
            f"unknown benchmark {args.name!r}; choose one of: {', '.join(names) or '(none)'}"
        )
    script = BENCH_DIR / f"{args.name}.py"
    return subprocess.call([sys.executable, str(script), *args.args])
