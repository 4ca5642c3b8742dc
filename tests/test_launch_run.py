"""Real launches through ``concord run`` on 127.0.0.1: output, failures, signals, restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from multiproc import run_workers

from concord import cli
from concord.comm.rendezvous import free_port, new_secret
from concord.launch.plan import LaunchConfig
from concord.launch.spawner import launch

ROOT = Path(__file__).resolve().parents[1]

ALLREDUCE = """
import sys, torch, torch.distributed as dist, concord
ctx = concord.init(timeout=60)
t = torch.tensor([float(ctx.rank + 1)])
dist.all_reduce(t)
print(f"rank={ctx.rank} world={ctx.world_size} sum={t.item():g} args={sys.argv[1:]}")
print(f"err {ctx.rank}", file=sys.stderr)
concord.shutdown()
"""

# each process records its pid (and its own child's) so the test can check none survives
PIDS = """
import os, subprocess, sys, time
rank = os.environ["RANK"]
kid = subprocess.Popen(["sleep", "60"])
partial = os.path.join(sys.argv[1], f"partial{rank}")  # (renamed whole: never read half)
with open(partial, "w") as f:
    f.write(f"{os.getpid()} {kid.pid}")
os.replace(partial, os.path.join(sys.argv[1], f"pids{rank}"))
"""


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _concord(*args: str, timeout: float = 90, env: dict | None = None, **kw):
    """``concord ARGS`` on the CPU (a GPU host's workers would say where they train)."""
    return subprocess.run(
        [sys.executable, "-m", "concord.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | {"CONCORD_DEVICE": "cpu"} | (env or {}),
        **kw,
    )


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _recorded_pids(folder: Path, count: int, wait: float = 0.0) -> list[int]:
    deadline = time.monotonic() + wait
    while len(list(folder.glob("pids*"))) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    files = sorted(folder.glob("pids*"))
    return [int(p) for f in files for p in f.read_text().split()]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("workers", [2, 4])
def test_workers_all_reduce_with_prefixed_output(tmp_path, workers):
    script = _script(tmp_path, "ar.py", ALLREDUCE)
    result = _concord("run", "-n", str(workers), str(script), "--lr", "3", "-n", "5")
    assert result.returncode == 0, result.stderr
    total = workers * (workers + 1) // 2
    lines = sorted(result.stdout.splitlines())
    assert lines == [
        f"[worker {r}] rank={r} world={workers} sum={total} args=['--lr', '3', '-n', '5']"
        for r in range(workers)
    ]
    assert sorted(result.stderr.splitlines()) == [f"[worker {r}] err {r}" for r in range(workers)]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("ps", [False, True])
def test_sparse_embeddings_example_learns_with_two_optimizers(ps):
    """examples/sparse_embeddings.py: SparseAdam on the table's averaged sparse rows and Adam
    on the rest, on every worker (AllReduce) or on a parameter server."""
    args = ["--servers", "1", "examples/sparse_embeddings.py", "--ps"] if ps else []
    result = _concord("run", "-n", "2", *(args or ["examples/sparse_embeddings.py"]), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(result.stdout.strip().splitlines()[-1].split("test_accuracy=")[1])
    assert accuracy > 0.9  # (chance is 0.2)


@pytest.mark.timeout(150)
def test_unmodified_torchrun_script_runs_under_concord_run():
    result = _concord("run", "-n", "2", "examples/torchrun_style.py", "--steps", "3", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        assert (
            f"[worker {rank}] rank {rank}/2: check OK: parameters identical on all 2 ranks "
            "after 3 DDP steps" in result.stdout.splitlines()
        )


def test_failing_rank_stops_the_others_and_is_named(tmp_path):
    script = _script(
        tmp_path,
        "fail.py",
        PIDS
        + """
if rank == "1":
    while len([f for f in os.listdir(sys.argv[1]) if f.startswith("pids")]) < 3:
        time.sleep(0.05)
    sys.exit(3)
time.sleep(60)
""",
    )
    result = _concord("run", "-n", "3", str(script), str(tmp_path), timeout=60)
    assert result.returncode == 3
    assert result.stderr.splitlines()[-1] == (
        "concord: worker 1 exited with code 3; stopped the other 2 processes"
    )
    pids = _recorded_pids(tmp_path, 3)
    assert len(pids) == 6  # 3 workers and the `sleep` child of each
    assert [p for p in pids if _alive(p)] == []


def test_rank_killed_by_a_signal_is_named(tmp_path):
    body = "import os, signal\nif os.environ['RANK'] == '0':\n    os.kill(os.getpid(), 9)\n"
    body += "import time; time.sleep(60)\n"
    script = _script(tmp_path, "kill.py", body)
    result = _concord("run", "-n", "2", str(script), timeout=60)
    assert result.returncode == 128 + 9
    assert result.stderr.splitlines()[-1] == (
        "concord: worker 0 was killed by signal SIGKILL (9); stopped the other 1 process"
    )


RESTART = """
import os, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
attempt, rank = int(os.environ["CONCORD_ATTEMPT"]), dist.get_rank()
t = torch.ones(1)
dist.all_reduce(t)
print(f"attempt={attempt} rank={rank} sum={t.item():g}")
if attempt == 0:
    if rank == 1:
        os._exit(3)  # (sys.exit with a live gloo group may abort in C++ teardown)
    time.sleep(60)
dist.destroy_process_group()
"""


@pytest.mark.timeout(150)
def test_max_restarts_reruns_the_group_on_the_same_store(tmp_path):
    # an unmodified torch.distributed script: attempt 1 must not see attempt 0's store keys
    script = _script(tmp_path, "restart.py", RESTART)
    result = _concord("run", "-n", "2", "--max-restarts", "1", str(script))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "concord: worker 1 exited with code 3; stopped the other 1 process; restarting (1 of 1)"
    ]
    out = result.stdout.splitlines()
    assert "[worker 0] attempt=1 rank=0 sum=2" in out
    assert "[worker 1] attempt=1 rank=1 sum=2" in out


def test_max_restarts_exhausted_reports_the_last_failure(tmp_path):
    script = _script(tmp_path, "always.py", "import sys; sys.exit(5)\n")
    result = _concord("run", "--max-restarts", "1", str(script), timeout=60)
    assert result.returncode == 5
    lines = result.stderr.splitlines()
    assert lines == [
        "concord: worker 0 exited with code 5; restarting (1 of 1)",
        "concord: worker 0 exited with code 5",
    ]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_launcher_stops_everything(tmp_path, sig):
    script = _script(tmp_path, "sleep.py", PIDS + "time.sleep(60)\n")
    cmd = [sys.executable, "-m", "concord.cli", "run", "-n", "2", str(script), str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = _recorded_pids(tmp_path, 2, wait=60)
        assert len(pids) == 4
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + sig
    assert err.splitlines()[-1] == f"concord: stopped by {sig.name}; stopped 2 processes"
    assert [p for p in pids if _alive(p)] == []


def test_servers_and_data_server_roles_are_started_and_stopped(tmp_path, monkeypatch, capfd):
    # a stand-in server module (the real ones are tested elsewhere): it serves until told
    _script(
        tmp_path,
        "fake_server.py",
        """
        import os, sys, time
        role, rank = os.environ["CONCORD_ROLE"], os.environ["RANK"]
        print(role, rank, os.environ["WORLD_SIZE"], os.environ["CONCORD_SERVERS"], sys.argv[1:],
              flush=True)
        open(f"ready-{role}-{rank}", "w").close()
        time.sleep(60)
        """,
    )
    _script(
        tmp_path,
        "work.py",
        """
        import glob, os, time
        deadline = time.monotonic() + 60
        while len(glob.glob("ready-*")) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # the servers print before the workers finish and stop them
        print("worker", os.environ["RANK"])
        """,
    )
    monkeypatch.chdir(tmp_path)
    config = LaunchConfig(
        program=("work.py",),
        workers=2,
        servers=2,
        data_server="tiny",
        server_module="fake_server",
        data_module="fake_server",
    )
    assert launch(config) == 0
    lines = sorted(capfd.readouterr().out.splitlines())
    assert lines == [
        "[data 0] data 0 2 2 ['tiny']",
        "[server 0] server 0 2 2 []",
        "[server 1] server 1 2 2 []",
        "[worker 0] worker 0",
        "[worker 1] worker 1",
    ]


@pytest.mark.timeout(150)
def test_two_nodes_on_one_machine_restart_together(tmp_path):
    # node 1's worker fails on attempt 0: both launchers stop, node 0 cleans the store, and
    # attempt 1 runs on both machines
    script = _script(tmp_path, "restart.py", RESTART)
    port = str(free_port())
    env = {"CONCORD_SECRET": new_secret()}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "concord.cli", "run", "--nnodes", "2", "--node-rank", str(r)]
            + ["--master-port", port, "--timeout", "60", "--max-restarts", "1", str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ | env,
        )
        for r in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0], outs
    (out0, err0), (out1, err1) = outs
    assert "[worker 0] attempt=1 rank=0 sum=2" in out0.splitlines()
    assert "[worker 1] attempt=1 rank=1 sum=2" in out1.splitlines()
    assert err1.splitlines() == ["concord: worker 1 exited with code 3; restarting (1 of 1)"]
    assert err0.splitlines() == [
        "concord: node 1: worker 1 exited with code 3; stopped the 1 local process(es); "
        "restarting (1 of 1)"
    ]


def test_failure_on_another_node_stops_this_one(tmp_path):
    body = "import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(60)\n"
    script = _script(tmp_path, "fail.py", body)
    port = str(free_port())
    env = {"CONCORD_SECRET": new_secret()}
    common = ["run", "--nnodes", "2", "--master-port", port, "--timeout", "60", str(script)]
    node0 = subprocess.Popen(
        [sys.executable, "-m", "concord.cli", *common[:1], "--node-rank", "0", *common[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | env,
    )
    try:
        node1 = _concord(*common[:1], "--node-rank", "1", *common[1:], env=env, timeout=60)
        _, err0 = node0.communicate(timeout=60)
    finally:
        node0.kill()
        node0.wait()
    assert node1.returncode == 3
    assert node1.stderr.splitlines()[-1] == "concord: worker 1 exited with code 3"
    assert node0.returncode == 1
    assert err0.splitlines()[-1] == (
        "concord: node 1: worker 1 exited with code 3; stopped the 1 local process(es)"
    )


BAD_INPUT = [
    (["-n", "0", "x.py"], "-n/--workers must be an integer >= 1, got 0"),
    (["missing.py"], "script 'missing.py' does not exist"),
    (["-m", "no_such_module_xyz"], "cannot find module 'no_such_module_xyz'"),
    (["-m"], "-m needs a module name"),
    (["--bogus", "x.py"], "unrecognized arguments: --bogus"),
    (["-n", "two", "x.py"], "invalid int value: 'two'"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "x.py").write_text("print('never runs')\n")
    monkeypatch.chdir(tmp_path)
    try:
        code = cli.main(["run", *args])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err, err


def test_port_in_use_is_one_line_and_exit_2(tmp_path, capsys):
    import socket

    script = _script(tmp_path, "x.py", "print('never runs')\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = cli.main(["run", "--master-port", str(port), str(script)])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        f"concord: error: port {port} is already in use on this machine, so the launcher "
        "cannot host the job's store there; pick another --master-port, or 0 for a free one\n"
    )


def test_bad_input_from_the_shell_has_no_traceback():
    result = _concord("run", "-n", "0", "x.py", timeout=60)
    assert result.returncode == 2
    assert result.stderr == "concord: error: -n/--workers must be an integer >= 1, got 0\n"


def _init_alone() -> str:
    import concord
    from concord.errors import PeerTimeoutError

    try:
        concord.init(timeout=3)
    except PeerTimeoutError as exc:
        return str(exc)
    return "init returned without the missing peer"


def test_init_times_out_naming_the_missing_rank():
    (message,) = run_workers(_init_alone, 2, ranks=[0], timeout=60)
    assert "waiting for worker rank(s) [1] of 2" in message
