"""The launcher's pure planner: the exact command and env of every process it would start."""

from __future__ import annotations

import pytest

from concord.comm.rendezvous import read_env
from concord.errors import UsageError
from concord.launch.plan import LaunchConfig, plan

PY = "/usr/bin/python3"
SECRET = "ab" * 32


def _plan(config: LaunchConfig, attempt: int = 0, inherited=None):
    return plan(config, 29512, SECRET, attempt, inherited=inherited, python=PY)


def test_two_workers_get_the_torchrun_contract():
    specs = _plan(LaunchConfig(program=("train.py", "--lr", "0.1"), workers=2))
    assert [(s.role, s.rank, s.name) for s in specs] == [
        ("worker", 0, "worker 0"),
        ("worker", 1, "worker 1"),
    ]
    for local, spec in enumerate(specs):
        assert spec.argv == (PY, "train.py", "--lr", "0.1")
        env = spec.env
        assert env["RANK"] == env["LOCAL_RANK"] == str(local)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29512")
        assert env["CONCORD_ROLE"] == "worker"
        assert env["CONCORD_SERVERS"] == "0"
        assert env["CONCORD_SECRET"] == SECRET
        assert env["CONCORD_TIMEOUT"] == "300"
        assert env["CONCORD_ATTEMPT"] == env["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert env["CONCORD_DATA_SERVER"] == ""
        assert env["TORCHELASTIC_USE_AGENT_STORE"] == "True"
        assert env["PYTHONUNBUFFERED"] == "1" and env["OMP_NUM_THREADS"] == "1"
        # what concord.init() will read back
        contract = read_env(env)
        assert (contract.rank, contract.world_size, contract.local_rank) == (local, 2, local)
        assert contract.secret == bytes.fromhex(SECRET) and contract.agent_store


def test_module_program_and_attempt_and_timeout():
    config = LaunchConfig(program=("-m", "pkg.train", "-x"), workers=1, timeout=7.5)
    (spec,) = _plan(config, attempt=2)
    assert spec.argv == (PY, "-m", "pkg.train", "-x")
    assert spec.env["CONCORD_ATTEMPT"] == spec.env["TORCHELASTIC_RESTART_COUNT"] == "2"
    assert spec.env["CONCORD_TIMEOUT"] == "7.5"
    assert read_env(spec.env).attempt == 2


def test_servers_and_data_server_follow_the_workers_on_node_0():
    config = LaunchConfig(
        program=("t.py",), workers=3, servers=2, data_server="mnist", server_module="my.srv"
    )
    specs = _plan(config)
    assert [(s.role, s.rank) for s in specs] == [
        ("worker", 0),
        ("worker", 1),
        ("worker", 2),
        ("server", 0),
        ("server", 1),
        ("data", 0),
    ]
    servers, data = specs[3:5], specs[5]
    for index, spec in enumerate(servers):
        assert spec.argv == (PY, "-m", "my.srv")
        assert spec.env["CONCORD_ROLE"] == "server"
        assert spec.env["RANK"] == str(index)
        assert spec.env["WORLD_SIZE"] == "3"  # servers see the number of workers
        assert spec.env["CONCORD_SERVERS"] == "2"
        assert spec.env["CONCORD_SECRET"] == SECRET
    assert data.argv == (PY, "-m", "concord.data.server", "mnist")
    assert (data.env["CONCORD_ROLE"], data.env["RANK"]) == ("data", "0")
    assert all(s.env["CONCORD_DATA_SERVER"] == "mnist" for s in specs)
    assert read_env(servers[1].env).role == "server"


def test_multi_node_ranks_and_servers_only_on_node_0():
    common = dict(program=("t.py",), workers=2, servers=1, nnodes=3, master_port=29500)
    common |= dict(master_addr="10.0.0.5", secret=SECRET)
    node2 = _plan(LaunchConfig(node_rank=2, **common))
    assert [(s.role, s.rank, s.env["LOCAL_RANK"]) for s in node2] == [
        ("worker", 4, "0"),
        ("worker", 5, "1"),
    ]
    assert {s.env["WORLD_SIZE"] for s in node2} == {"6"}
    assert {s.env["GROUP_RANK"] for s in node2} == {"2"}
    assert {s.env["MASTER_ADDR"] for s in node2} == {"10.0.0.5"}
    node0 = _plan(LaunchConfig(node_rank=0, **common))
    assert [(s.role, s.rank) for s in node0] == [("worker", 0), ("worker", 1), ("server", 0)]


def test_env_precedence_inherited_defaults_user_contract():
    inherited = {"PATH": "/bin", "OMP_NUM_THREADS": "4", "RANK": "9", "CONCORD_SECRET": "old"}
    config = LaunchConfig(program=("t.py",), env={"FOO": "bar", "PYTHONUNBUFFERED": "0"})
    (spec,) = _plan(config, inherited=inherited)
    assert spec.env["PATH"] == "/bin"  # the user's environment is kept
    assert spec.env["OMP_NUM_THREADS"] == "4"  # the user's choice beats our default
    assert spec.env["PYTHONUNBUFFERED"] == "0"  # so does config.env
    assert spec.env["FOO"] == "bar"
    assert spec.env["RANK"] == "0" and spec.env["CONCORD_SECRET"] == SECRET  # contract wins
    assert inherited["RANK"] == "9"  # the input is not modified


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(workers=0), r"-n/--workers must be an integer >= 1, got 0"),
        (dict(servers=-1), r"--servers must be an integer >= 0, got -1"),
        (dict(max_restarts=-2), r"--max-restarts must be an integer >= 0"),
        (dict(nnodes=2, node_rank=2, master_port=1, secret="s"), r"--node-rank must be in 0\.\.1"),
        (dict(master_port=70000), r"--master-port must be in 0\.\.65535, got 70000"),
        (dict(nnodes=2, secret="s"), r"needs a fixed --master-port"),
        (dict(nnodes=2, master_port=29500), r"CONCORD_SECRET"),
        (dict(timeout=0), r"--timeout must be > 0"),
        (dict(data_server=" "), r"--data-server needs a dataset name"),
        (dict(env={"RANK": "3", "WORLD_SIZE": "1"}), r"env may not set RANK, WORLD_SIZE"),
        (dict(program=()), r"nothing to run"),
        (dict(program=("-m",)), r"-m needs a module name"),
        (dict(program=("--lr",)), r"script path or -m MODULE, got '--lr'"),
    ],
)
def test_bad_configs_are_usage_errors_with_the_value(kwargs, message):
    kwargs = {"program": ("t.py",)} | kwargs
    with pytest.raises(UsageError, match=message):
        LaunchConfig(**kwargs)


def test_plan_rejects_an_unresolved_port():
    with pytest.raises(ValueError, match="actual TCP port"):
        plan(LaunchConfig(program=("t.py",)), 0, SECRET)


def test_output_prefixer_keeps_lines_whole_and_progress_bars_live():
    from concord.launch.output import _Prefixer

    p = _Prefixer(b"[worker 1] ")
    assert p.feed(b"hello\nwor") == b"[worker 1] hello\n"  # "wor" waits for its line ending
    assert p.feed(b"ld\n\n") == b"[worker 1] world\n[worker 1] \n"
    assert p.feed(b" 10%\r 20%\r") == b"[worker 1]  10%\r[worker 1]  20%\r"  # redraws keep it
    assert p.feed(b"done\r") == b"[worker 1] done\r"
    assert p.feed(b"\nnext") == b"\n"  # "\r\n" split across two reads is one line ending
    assert p.close() == b"[worker 1] next\n"  # an unfinished last line is ended
    assert p.close() == b""
