"""The thin half of the launcher: start the planned processes, watch them, stop them.

``launch(config)`` hosts the job's TCPStore (node 0), starts every process of ``plan()`` in
its own process group with its output prefixed, and waits. The job succeeds when every
worker exits 0 (servers and the data server are then stopped: they serve until told). When
any process exits non-zero or dies by a signal, the others get SIGTERM, then SIGKILL after
``GRACE_S``, and one line names the culprit; ``max_restarts`` restarts the whole group.
SIGINT/SIGTERM to the launcher stop everything the same way (exit 130/143).
"""

from __future__ import annotations

import importlib.util
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from concord.comm.rendezvous import new_secret
from concord.comm.spin import usable_cores
from concord.errors import UsageError
from concord.launch import nodes
from concord.launch.output import forward
from concord.launch.plan import LaunchConfig, ProcessSpec, plan

#: seconds between SIGTERM and SIGKILL when stopping processes
GRACE_S = 3.0
#: how often the launcher looks at the other nodes' reports while its processes run
POLL_S = 0.25


def describe_exit(spec: ProcessSpec, code: int) -> str:
    """``worker 1 exited with code 3`` / ``worker 1 was killed by signal SIGKILL (9)``."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "signal"
        return f"{spec.name} was killed by signal {name} ({-code})"
    return f"{spec.name} exited with code {code}"


def exit_status(code: int) -> int:
    """The launcher's exit status for a child's return code (shell style for signals)."""
    return 128 - code if code < 0 else (code or 1)


class Group:
    """The processes of one attempt on this node, each in its own process group."""

    def __init__(self, specs: list[ProcessSpec]) -> None:
        self.specs = specs
        self.procs: list[subprocess.Popen] = []
        self.exits: queue.Queue[tuple[int, int]] = queue.Queue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for index, spec in enumerate(self.specs):
            proc = subprocess.Popen(
                spec.argv,
                env=spec.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group: stop() kills its children too
            )
            self.procs.append(proc)
            self._threads.append(forward(proc.stdout, spec.name, "stdout"))
            self._threads.append(forward(proc.stderr, spec.name, "stderr"))
            waiter = threading.Thread(target=self._wait, args=(index, proc), daemon=True)
            waiter.start()
            self._threads.append(waiter)

    def _wait(self, index: int, proc: subprocess.Popen) -> None:
        self.exits.put((index, proc.wait()))

    def running(self) -> int:
        return sum(proc.poll() is None for proc in self.procs)

    def stop(self, grace: float = GRACE_S) -> int:
        """SIGTERM every process group, SIGKILL what is left after ``grace``; returns how many
        processes were still running. Safe to call twice."""
        alive = self.running()
        for proc in self.procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:  # also reaps grandchildren left in a finished leader's group
            _signal_group(proc, signal.SIGKILL)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for thread in self._threads:
            thread.join(timeout=5)
        return alive


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended: ``message`` is None on success."""

    status: int
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.message is None


def _others(count: int) -> str:
    return f"; stopped the other {count} process{'es' if count != 1 else ''}" if count else ""


def watch(group: Group, peers: nodes.Nodes, attempt: int, timeout: float) -> Outcome:
    """Wait until all workers exited 0 (then stop the servers) or something failed."""
    workers = sum(spec.role == "worker" for spec in group.specs)
    finished_at: float | None = None
    while True:
        try:
            index, code = group.exits.get(timeout=POLL_S)
        except queue.Empty:
            remote = peers.failure(attempt)
            if remote is not None:
                stopped = group.stop()
                return Outcome(1, f"{remote}; stopped the {stopped} local process(es)")
            if finished_at is not None:
                waiting = peers.missing(attempt, "done")
                if not waiting:
                    group.stop()
                    return Outcome(0)
                if time.monotonic() - finished_at > timeout:
                    stopped = group.stop()
                    return Outcome(
                        1,
                        f"node(s) {waiting} did not finish within {timeout:g}s "
                        f"after this node's workers did{_others(stopped)}",
                    )
            continue
        spec = group.specs[index]
        if code != 0 or spec.role != "worker":
            what = describe_exit(spec, code)
            if code == 0:
                what += " before the workers finished"
            peers.report_failure(attempt, what)
            return Outcome(exit_status(code), what + _others(group.stop()))
        workers -= 1
        if workers == 0:
            peers.mark(attempt, "done")
            finished_at = time.monotonic()
            if not peers.missing(attempt, "done") or peers.node_rank > 0:
                group.stop()  # servers and the data server serve until told
                return Outcome(0)


class _Interrupted(BaseException):
    """SIGINT/SIGTERM reached the launcher."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """Turns the first SIGINT/SIGTERM into ``_Interrupted``, except inside ``deferred()``."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.fired = False
        self.deferring = False

    def handler(self, signum: int, frame: object) -> None:
        if self.fired:
            return  # already stopping: let the cleanup finish
        if self.deferring:
            self.pending = signum
            return
        self.fired = True
        raise _Interrupted(signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold signals while processes start, so none is left half-started."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None and not self.fired:
            self.fired = True
            raise _Interrupted(self.pending)


@contextmanager
def _catch_signals() -> Iterator[_Signals]:
    state = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    old = {sig: signal.signal(sig, state.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def check_program(config: LaunchConfig, cwd: str | None = None) -> None:
    """Fail fast (UsageError) on a script that does not exist or a module that is not found."""
    cwd = cwd or os.getcwd()
    if config.is_module:
        _find_module(config.program[1], cwd)
    else:
        script = config.program[0]
        if not os.path.isfile(os.path.join(cwd, script)):
            raise UsageError(f"script {script!r} does not exist (looked in {cwd}); check the path")
    if config.node_rank == 0 and config.servers:
        _find_module(config.server_module, cwd)
    if config.node_rank == 0 and config.data_server is not None:
        _find_module(config.data_module, cwd)


def _find_module(name: str, cwd: str) -> None:
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)  # `python -m` searches the current folder first
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    finally:
        if added:
            sys.path.remove(cwd)
    if not found:
        raise UsageError(
            f"cannot find module {name!r} (searched {cwd} and the installed packages); check "
            "the name, or run from the folder that holds it"
        )


def _say(message: str) -> None:
    print(f"concord: {message}", file=sys.stderr, flush=True)


def launch(config: LaunchConfig) -> int:
    """Run the job described by ``config`` on this node; return the exit status to use."""
    check_program(config)
    secret = config.secret or new_secret()
    if config.node_rank == 0:
        store = nodes.host_store(config.master_addr, config.master_port, config.timeout)
    else:
        store = nodes.join_store(config.master_addr, config.master_port, config.timeout)
    port = store.port if config.node_rank == 0 else config.master_port
    peers = nodes.Nodes(store, config.nnodes, config.node_rank)
    group: Group | None = None
    with _catch_signals() as signals:
        try:
            attempt = 0
            while True:
                specs = plan(
                    config, port, secret, attempt, inherited=os.environ, cores=usable_cores()
                )
                group = Group(specs)
                with signals.deferred():
                    group.start()
                outcome = watch(group, peers, attempt, config.timeout)
                if outcome.ok:
                    return 0
                if attempt == config.max_restarts:
                    _say(outcome.message or "failed")
                    return outcome.status
                peers.mark(attempt, "stopped")
                attempt += 1
                _say(f"{outcome.message}; restarting ({attempt} of {config.max_restarts})")
                _prepare_restart(store, peers, attempt, config.timeout)
        except _Interrupted as stop:
            stopped = group.stop() if group is not None else 0
            name = signal.Signals(stop.signum).name
            _say(f"stopped by {name}; stopped {stopped} process{'es' if stopped != 1 else ''}")
            return 128 + stop.signum
        finally:
            if group is not None:
                group.stop(grace=0.5)


def _prepare_restart(store, peers: nodes.Nodes, attempt: int, timeout: float) -> None:  # noqa: ANN001
    if peers.node_rank == 0:
        peers.wait_stopped(attempt - 1, timeout)
        nodes.clear_attempt_keys(store)
        peers.allow_restart(attempt)
    else:
        peers.wait_restart(attempt, timeout)
