"""``concord run``: start a job's processes on this machine, like torchrun.

    concord run -n 4 train.py --lr 0.1            # 4 workers; args after the script are its own
    concord run -n 2 --servers 1 -m my.module     # 2 workers and 1 parameter server
    concord run --nnodes 2 --node-rank R --master-addr HOST --master-port 29500 -n 4 train.py

The job secret comes from CONCORD_SECRET when set (required with --nnodes > 1, the same on
every node), otherwise a fresh random one is made per job.
"""

from __future__ import annotations

import argparse
import os

from concord.comm.rendezvous import DEVICES
from concord.comm.runtime import check_device_choice
from concord.errors import UsageError
from concord.launch.plan import LaunchConfig
from concord.launch.spawner import launch


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``run`` on the ``concord`` command line."""
    parser = subparsers.add_parser(
        "run",
        help="start workers (and servers) for a training script, like torchrun",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "-n",
        "--workers",
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="worker processes on this node (default 1)",
    )
    add(
        "--servers",
        type=int,
        default=0,
        metavar="S",
        help="parameter-server processes, on node 0 (default 0)",
    )
    add(
        "--data-server",
        default=None,
        metavar="NAME",
        help="also start a data server for dataset NAME, on node 0",
    )
    add("--nnodes", type=int, default=1, metavar="K", help="machines in the job (default 1)")
    add("--node-rank", type=int, default=0, metavar="R", help="this machine's index, 0..K-1")
    add(
        "--master-addr",
        default="127.0.0.1",
        metavar="A",
        help="node 0's address, where the job's store lives (default 127.0.0.1)",
    )
    add(
        "--master-port",
        type=int,
        default=0,
        metavar="P",
        help="the store's port; 0 picks a free one (default; one node only)",
    )
    add(
        "--max-restarts",
        type=int,
        default=0,
        metavar="K",
        help="restart the whole group up to K times after a failure (default 0)",
    )
    add(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="longest any process waits for a peer (CONCORD_TIMEOUT, default 300)",
    )
    add(
        "--device",
        choices=DEVICES,
        default=None,
        help="what workers train on (CONCORD_DEVICE): a GPU per worker when this host has "
        "enough, else the CPU (auto, default); cpu; or cuda (an error without a GPU each)",
    )
    add(
        "-m",
        dest="module",
        nargs=argparse.REMAINDER,
        metavar="MODULE",
        help="run a module (python -m MODULE ARGS...) instead of a script",
    )
    add(
        "program",
        nargs=argparse.REMAINDER,
        metavar="SCRIPT [ARGS...]",
        help="the training script and its own arguments",
    )
    parser.set_defaults(func=main)
    return parser


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    """Build the validated LaunchConfig from parsed ``concord run`` arguments."""
    if args.module is not None:
        if not args.module:
            raise UsageError("-m needs a module name, e.g. concord run -m my_package.train")
        program = ["-m", *args.module]
    else:
        program = list(args.program)
        if program[:1] == ["--"]:
            program = program[1:]
        if not program:
            raise UsageError("nothing to run: give a script (concord run -n 2 train.py) or -m")
    return LaunchConfig(
        program=tuple(program),
        workers=args.workers,
        servers=args.servers,
        data_server=args.data_server,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        max_restarts=args.max_restarts,
        timeout=args.timeout,
        secret=os.environ.get("CONCORD_SECRET") or None,
        device=args.device,
    )


def main(args: argparse.Namespace) -> int:
    """Run the job; the exit status is 0 when every worker exited 0."""
    config = config_from_args(args)
    check_device_choice(config.device, config.workers)
    return launch(config)
