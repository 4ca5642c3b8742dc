"""``concord bench``: lists the checkout's benchmarks and rejects unknown names with exit 2."""

from __future__ import annotations

from concord.cli import main
from concord.jobs.bench import BENCH_DIR, available


def test_lists_the_benchmarks_of_the_checkout(capsys):
    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == available()
    assert listed == sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))
    assert listed  # the checkout ships benchmarks


def test_unknown_benchmark_is_exit_2(capsys):
    assert main(["bench", "no-such-benchmark"]) == 2
    assert "unknown benchmark 'no-such-benchmark'" in capsys.readouterr().err
