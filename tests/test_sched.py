"""Workers as batch jobs: the rule, its env variable, the launcher's choice, the policy itself."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from concord.comm.sched import (
    SCHED_ENV,
    apply_worker_sched,
    default_worker_sched,
    worker_sched,
)
from concord.errors import UsageError
from concord.launch import spawner
from concord.launch.plan import LaunchConfig, plan

linux_only = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="no SCHED_BATCH here")


@pytest.mark.parametrize(
    "processes, cores, servers, policy",
    [
        (6, 2, 2, "batch"),  # 4 workers, 2 servers on 2 cores
        (3, 2, 1, "batch"),
        (2, 2, 1, "inherit"),  # a core each: nobody preempts anybody
        (6, 8, 2, "inherit"),
        (4, 2, 0, "inherit"),  # AllReduce: no server to wait on
        (6, None, 2, "inherit"),  # cores unknown
    ],
)
def test_batch_only_for_workers_beside_servers_on_a_crowded_node(processes, cores, servers, policy):
    assert default_worker_sched(processes, cores, servers) == policy


def test_the_rule_refuses_no_processes():
    with pytest.raises(ValueError, match="need processes >= 1 and servers >= 0, got 0, 1"):
        default_worker_sched(0, 2, 1)


def test_worker_sched_reads_the_env(monkeypatch):
    monkeypatch.delenv(SCHED_ENV, raising=False)
    assert worker_sched() == "inherit"
    for value in ("batch", "inherit", " batch "):
        monkeypatch.setenv(SCHED_ENV, value)
        assert worker_sched() == value.strip()
    for bad in ("fifo", "BATCH", "1"):
        monkeypatch.setenv(SCHED_ENV, bad)
        with pytest.raises(UsageError, match=f"CONCORD_WORKER_SCHED must be one of .* '{bad}'"):
            worker_sched()
    with pytest.raises(ValueError, match="policy must be one of"):
        apply_worker_sched("fifo")


def _policies(config: LaunchConfig, cores, inherited=None) -> list[str | None]:
    specs = plan(config, 29512, "ab" * 32, inherited=inherited, python="py", cores=cores)
    return [spec.env.get(SCHED_ENV) for spec in specs]


def test_the_launcher_makes_workers_batch_beside_servers_on_a_crowded_node():
    ps = LaunchConfig(program=("t.py",), workers=4, servers=2)
    # workers first, then the servers, which keep their policy (the variable is not theirs)
    assert _policies(ps, cores=2) == ["batch"] * 4 + [None] * 2
    assert _policies(ps, cores=6) == ["inherit"] * 4 + [None] * 2
    allreduce = LaunchConfig(program=("t.py",), workers=4)
    assert _policies(allreduce, cores=2) == ["inherit"] * 4
    # node 1 runs workers only (the servers live on node 0)
    other = LaunchConfig(
        program=("t.py",), workers=4, servers=2, nnodes=2, node_rank=1, master_port=1, secret="s"
    )
    assert _policies(other, cores=2) == ["inherit"] * 4
    # the user's own setting wins, from the environment or from config.env
    assert _policies(ps, cores=2, inherited={SCHED_ENV: "inherit"}) == ["inherit"] * 6
    mine = LaunchConfig(program=("t.py",), workers=1, servers=1, env={SCHED_ENV: "batch"})
    assert _policies(mine, cores=64) == ["batch"] * 2


# a thread started before the policy is applied and one started after: both must be batch
_APPLY = """
import os, sys, threading
from concord.comm.sched import apply_worker_sched
stop = threading.Event()
before = threading.Thread(target=stop.wait); before.start()
applied = apply_worker_sched(sys.argv[1])
after = threading.Thread(target=stop.wait); after.start()
policies = {os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}
stop.set()
names = {os.SCHED_BATCH: "batch", os.SCHED_OTHER: "other"}
print(applied, len(os.listdir("/proc/self/task")) >= 3, sorted(names[p] for p in policies))
"""


@linux_only
def test_batch_reaches_every_thread_and_inherit_changes_nothing():
    def run(policy: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", _APPLY, policy], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    # (importing concord may start threads of its own: they count too)
    assert run("batch") == ["True", "True", "['batch']"]
    assert run("inherit") == ["False", "True", "['other']"]


@linux_only
def test_concord_run_workers_are_batch_and_servers_are_not(tmp_path, monkeypatch, capfd):
    # a stand-in server module (the real ones are tested elsewhere) reports its policy
    (tmp_path / "fake_server.py").write_text(
        textwrap.dedent(
            """
            import os, time
            print("server", os.sched_getscheduler(0) == os.SCHED_OTHER, flush=True)
            open("ready-server", "w").close()
            time.sleep(60)
            """
        )
    )
    (tmp_path / "work.py").write_text(
        textwrap.dedent(
            """
            import os, threading, time
            import concord
            stop = threading.Event()
            threading.Thread(target=stop.wait, daemon=True).start()  # (started before init)
            ctx = concord.init(timeout=60)
            tids = os.listdir("/proc/self/task")
            batch = all(os.sched_getscheduler(int(t)) == os.SCHED_BATCH for t in tids)
            deadline = time.monotonic() + 60
            while not os.path.exists("ready-server") and time.monotonic() < deadline:
                time.sleep(0.05)  # the server prints before the workers finish and stop it
            print("worker", ctx.rank, os.environ["CONCORD_WORKER_SCHED"], batch, flush=True)
            concord.shutdown()
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(SCHED_ENV, raising=False)
    monkeypatch.setenv("CONCORD_DEVICE", "cpu")
    monkeypatch.setattr(spawner, "usable_cores", lambda: 2)  # 2 workers + 1 server: crowded
    config = LaunchConfig(
        program=("work.py",), workers=2, servers=1, server_module="fake_server", timeout=60
    )
    assert spawner.launch(config) == 0
    lines = sorted(capfd.readouterr().out.splitlines())
    assert lines == [
        "[server 0] server True",
        "[worker 0] worker 0 batch True",
        "[worker 1] worker 1 batch True",
    ]


@linux_only
def test_a_refused_policy_is_logged_and_the_worker_goes_on(monkeypatch, caplog):
    from concord.comm import sched

    def refuse(*_):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(sched.os, "sched_setscheduler", refuse)
    with caplog.at_level("WARNING", logger="concord.sched"):
        assert apply_worker_sched("batch") is False
    assert "CONCORD_WORKER_SCHED=batch not applied to every thread" in caplog.text
    assert "Operation not permitted" in caplog.text
