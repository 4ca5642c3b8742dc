"""What a parameter-server checkpoint costs: ``opt.state_dict()`` gathering the optimizer state
from the servers, against copying the same state out of one local torch optimizer (what a
DDP or single-process job pays for a checkpoint it can keep while training goes on).

The MNIST MLP (784-512-256-128-10) with Adam, 4 workers, 2 servers, after 3 sync steps;
worker 0 times both (medians of ``--reps``) and ``torch.save`` of the result to memory. The
script launches the job itself (``concord run -n 4 --servers 2 ... --worker``).

    flock /tmp/concord-bench.lock python benchmarks/ps_checkpoint.py
    concord bench ps_checkpoint                                       # the same
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import subprocess
import sys
import time

import torch

import concord
from concord.models import build_model


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--worker", action="store_true", help="(internal) one process of the job")
    args = parser.parse_args()
    if not args.worker:
        job = ["run", "-n", "4", "--servers", "2", __file__, "--worker", "--reps", str(args.reps)]
        sys.exit(subprocess.run([sys.executable, "-m", "concord.cli", *job]).returncode)
    torch.set_num_threads(1)
    ctx = concord.init()
    torch.manual_seed(0)
    model = build_model("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, opt = concord.distribute(model, opt, concord.ParameterServer(mode="sync"))
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    if ctx.rank == 0:
        state = opt.state_dict()
        local = torch.optim.Adam(model.parameters(), lr=1e-3)
        local.load_state_dict(state)  # the same state in one local optimizer
        gather = _median_ms(opt.state_dict, args.reps)
        own = _median_ms(lambda: copy.deepcopy(local.state_dict()), args.reps)
        save = _median_ms(lambda: torch.save(state, io.BytesIO()), args.reps)
        mb = sum(v.numel() * v.element_size() for s in state["state"].values() for v in s.values())
        print(
            f"optimizer state {mb / 1e6:.2f} MB: opt.state_dict() from 2 servers {gather:.1f} ms, "
            f"a copy from one local optimizer {own:.1f} ms (ratio {gather / own:.2f}), "
            f"torch.save to memory {save:.1f} ms",
            flush=True,
        )
    opt.close()


if __name__ == "__main__":
    main()
