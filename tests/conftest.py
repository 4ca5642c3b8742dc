"""Shared fixtures: every test's leftover child processes are reaped."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and not _is_helper(entry):
            found.append(int(entry.name))
    return found


def _is_helper(entry: Path) -> bool:
    """multiprocessing's resource tracker outlives tests on purpose."""
    try:
        return b"resource_tracker" in (entry / "cmdline").read_bytes()
    except OSError:
        return True


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


@pytest.fixture(autouse=True)
def reap_children():
    """Kill any process a test left behind (and fail loudly in the log if there was one)."""
    yield
    leftovers = _descendants(os.getpid())
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in leftovers:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
