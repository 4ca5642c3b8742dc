"""The env contract (torchrun and Slurm names) and the store barrier that names missing ranks."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from concord.comm.rendezvous import arrive, free_port, new_secret, read_env
from concord.errors import PeerTimeoutError, UsageError


def test_torchrun_names():
    secret = new_secret()
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.1.2.3",
        "MASTER_PORT": "29555",
        "CONCORD_ROLE": "worker",
        "CONCORD_SERVERS": "2",
        "CONCORD_SECRET": secret,
        "CONCORD_ATTEMPT": "1",
    }
    c = read_env(env)
    assert (c.rank, c.world_size, c.local_rank) == (3, 4, 1)
    assert (c.master_addr, c.master_port, c.servers, c.attempt) == ("10.1.2.3", 29555, 2, 1)
    assert c.secret == bytes.fromhex(secret) and len(c.secret) == 32
    assert secret not in repr(c)  # the secret never shows up in logs


def test_slurm_names_stand_in_when_rank_is_absent():
    c = read_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"})
    assert (c.rank, c.world_size, c.local_rank, c.role) == (5, 8, 1, "worker")


def test_no_env_is_a_single_process():
    c = read_env({})
    assert (c.rank, c.world_size, c.single) == (0, 1, True)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "outside WORLD_SIZE=2"),
        ({"CONCORD_ROLE": "boss"}, "CONCORD_ROLE='boss'"),
    ],
)
def test_bad_env_is_a_clear_error(env, message):
    with pytest.raises(UsageError, match=message):
        read_env(env)


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_arrive_names_the_missing_ranks():
    store = dist.HashStore()
    arrive(store, "p/", "worker", 1, 1, timeout=1)  # a group of one never waits
    store2 = dist.HashStore()
    store2.set("p/worker/arrived/2", "1")
    store2.add("p/worker/count", 1)
    with pytest.raises(PeerTimeoutError, match=r"worker rank\(s\) \[1, 3\] of 4"):
        arrive(store2, "p/", "worker", 0, 4, timeout=0.3)
