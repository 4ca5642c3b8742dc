"""``concord train``: the main job — MNIST on N local workers with any strategy.

    concord train --workers 4                                  # AllReduce, MLP, 3 epochs
    concord train --workers 4 --strategy ps-sync --servers 2
    concord train --strategy pipeline --stages 3 --microbatches 4 --replicas 1

The command launches itself through the launcher (``concord.jobs.train_worker`` on every
worker), then prints ``test_accuracy=<float>`` as its last line and plots the metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from concord.comm.rendezvous import DEVICES
from concord.comm.runtime import check_device_choice
from concord.data.mnist import hub_file
from concord.data.sources import check_source
from concord.errors import UsageError
from concord.models import MODELS

STRATEGIES = ("allreduce", "ps-sync", "ps-async", "ps-async-delta", "pipeline")
#: options forwarded from the command line to every worker
WORKER_OPTIONS = (
    "strategy",
    "model",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "lr_schedule",
    "seed",
    "data",
    "engine",
    "compression",
    "max_staleness",
    "backup_workers",
    "max_grad_norm",
    "precision",
    "stages",
    "microbatches",
    "schedule",
    "replicas",
    "split",
    "resume",
)


# the pipeline's options are None unless given; strategy_options fills these in for a pipeline
PIPELINE_DEFAULTS = {
    "stages": 3,
    "microbatches": 4,
    "schedule": "1f1b",
    "replicas": 1,
    "split": "params",
}
# options of one strategy family: (default, the strategies it applies to); another strategy
# with a value other than the default is an error, not silently ignored
ONLY_FOR = {
    "engine": ("auto", ("allreduce",)),
    "compression": ("none", ("allreduce", "ps-sync", "ps-async")),
    "max_staleness": (None, ("ps-async", "ps-async-delta")),
    "backup_workers": (0, ("ps-sync",)),
    **{name: (None, ("pipeline",)) for name in PIPELINE_DEFAULTS},
}


def strategy_options(args: argparse.Namespace) -> None:
    """Refuse an option of another strategy than ``--strategy``; fill in the pipeline options'
    defaults for a pipeline (other strategies keep None)."""
    for name, (default, strategies) in ONLY_FOR.items():
        if getattr(args, name) != default and args.strategy not in strategies:
            raise UsageError(
                f"--{name.replace('_', '-')} applies to --strategy {' | '.join(strategies)}, "
                f"not {args.strategy}"
            )
    if args.compression == "powersgd" and args.strategy != "allreduce":
        raise UsageError(
            f"--compression powersgd is AllReduce's; {args.strategy} takes fp16 | bf16"
        )
    if args.strategy == "pipeline":
        for name, default in PIPELINE_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, default)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``concord train`` and its worker processes."""
    add = parser.add_argument
    add("--strategy", default="allreduce", choices=STRATEGIES)
    add("--model", default="mlp", choices=MODELS)
    add("--epochs", type=int, default=3)
    add("--batch-size", type=int, default=64, help="per worker (per replica for pipeline)")
    add("--lr", type=float, default=0.05)
    add("--momentum", type=float, default=0.9)
    add(
        "--lr-schedule",
        default="constant",
        choices=("constant", "cosine"),
        help="cosine: the LR falls along a half cosine from --lr to 0 over --epochs",
    )
    add("--seed", type=int, default=0)
    add("--data", default="local", help="local | central | dfs:URL | p2p")
    add("--engine", default="auto", choices=("auto", "torch", "ring"), help="AllReduce engine")
    add(
        "--compression",
        default="none",
        choices=("none", "fp16", "bf16", "powersgd"),
        help="gradient compression on the wire (AllReduce; ps-sync, ps-async: fp16 | bf16)",
    )
    add("--max-staleness", type=int, default=None, help="ps-async: bound on version lead")
    add("--backup-workers", type=int, default=0, help="ps-sync: gradients not waited for")
    add(
        "--max-grad-norm",
        type=float,
        default=None,
        help="clip the gradient to this norm before each step (ps-sync: the average, on the "
        "servers; ps-async*: each worker's own; pipeline: the whole model's, over all stages)",
    )
    add(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="bf16/fp16: mixed precision (torch.autocast; fp16 scales the loss, not for pipeline)",
    )
    add("--stages", type=int, help="pipeline stages P (default 3)")
    add("--microbatches", type=int, help="pipeline micro-batches M (default 4)")
    add("--schedule", choices=("gpipe", "1f1b"), help="pipeline schedule (default 1f1b)")
    add("--replicas", type=int, help="pipeline data-parallel replicas D (default 1)")
    add("--split", help="pipeline split: params | time | i,j,... (default params)")
    add("--out", default=None, help="run directory (default runs/<time>-<strategy>)")
    add("--resume", default=None, help="a run's checkpoint.pt: go on after its last epoch")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train MNIST with a chosen strategy")
    parser.add_argument("--workers", type=int, default=None, help="default 4 (P*D for pipeline)")
    parser.add_argument("--servers", type=int, default=1, help="parameter servers (ps-*)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds any wait may last")
    parser.add_argument("--master-port", type=int, default=0)
    parser.add_argument("--min-accuracy", type=float, default=None, help="fail below this")
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default=None,
        help="a GPU per worker when there are enough (auto, default), cpu, or cuda",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="restart every process after a failure up to this many times; each restart "
        "goes on from the run directory's last checkpoint",
    )
    add_train_arguments(parser)
    parser.set_defaults(func=main)


def worker_count(args: argparse.Namespace) -> int:
    """Workers the job needs; pipeline's follows from stages x replicas."""
    if args.strategy == "pipeline":
        need = args.stages * args.replicas
        if args.workers not in (None, need):
            raise UsageError(
                f"--workers {args.workers} != stages({args.stages}) * replicas({args.replicas}) "
                f"= {need}; drop --workers or change --stages/--replicas"
            )
        return need
    workers = 4 if args.workers is None else args.workers
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    return workers


def validate(args: argparse.Namespace) -> None:
    """Reject bad values before any process starts."""
    strategy_options(args)
    for name in ("epochs", "batch_size", "stages", "microbatches", "replicas"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.lr < math.inf:
        raise UsageError(f"--lr must be > 0 and finite, got {args.lr}")
    if not 0 <= args.momentum < math.inf:
        raise UsageError(f"--momentum must be >= 0 and finite, got {args.momentum}")
    if args.max_grad_norm is not None and not 0 < args.max_grad_norm < math.inf:
        raise UsageError(f"--max-grad-norm must be > 0, got {args.max_grad_norm}")
    if args.min_accuracy is not None and not 0 <= args.min_accuracy <= 1:
        raise UsageError(f"--min-accuracy must be in 0..1, got {args.min_accuracy}")
    check_source(args.data)
    if args.precision == "fp16" and args.strategy == "pipeline":
        raise UsageError(
            "--precision fp16 scales the loss, which a pipeline stage cannot (it runs backward "
            "itself); use --precision bf16"
        )
    if args.strategy.startswith("ps-") and args.servers < 1:
        raise UsageError(f"--strategy {args.strategy} needs --servers >= 1, got {args.servers}")
    if args.resume is not None:
        resume = Path(args.resume).resolve()
        stage0 = resume.with_name(resume.name.replace(".pt", "-stage0.pt"))  # (pipeline)
        if not resume.is_file() and not stage0.is_file():
            raise UsageError(f"--resume {args.resume}: no such checkpoint")
        args.resume = str(resume)
    hub_file()  # a missing dataset is a clear error before anything starts
    workers = worker_count(args)
    check_device_choice(args.device, workers)  # so is --device cuda without GPUs
    check_strategy(args, workers)


def check_strategy(args: argparse.Namespace, workers: int) -> None:
    """Build the strategy as the workers will (its own checks) and, for a pipeline, split the
    model, so that bad values fail here rather than in every worker after the launch."""
    from concord.jobs.train_worker import build_strategy
    from concord.models import build_model
    from concord.strategies.pipeline import as_layers

    if args.strategy == "ps-sync" and args.backup_workers >= workers:
        raise UsageError(
            f"--backup-workers {args.backup_workers} must be < the number of workers ({workers})"
        )
    try:
        strategy = build_strategy(args)
        if args.strategy == "pipeline" and args.split != "time":  # ("time" measures, later)
            strategy.plan(as_layers(build_model(args.model)))
    except (ValueError, TypeError) as exc:  # (UsageError is a ValueError)
        raise UsageError(f"--strategy {args.strategy}: {exc}") from None


def forward_args(args: argparse.Namespace, out: Path) -> list[str]:
    argv = []
    for name in WORKER_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv + ["--out", str(out)]


def main(args: argparse.Namespace) -> int:
    from concord.launch.plan import LaunchConfig
    from concord.launch.spawner import launch

    validate(args)
    workers = worker_count(args)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{args.strategy}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(vars(args) | {"workers": workers}, default=str))
    config = LaunchConfig(
        program=("-m", "concord.jobs.train_worker", *forward_args(args, out)),
        workers=workers,
        servers=args.servers if args.strategy.startswith("ps-") else 0,
        data_server="mnist" if args.data == "central" else None,
        master_port=args.master_port,
        timeout=args.timeout,
        max_restarts=args.max_restarts,
        device=args.device,
    )
    code = launch(config)
    if code != 0:
        return code
    return report(out, args.min_accuracy)


def report(out: Path, min_accuracy: float | None) -> int:
    """Plot the run's metrics and print the final ``test_accuracy=`` line."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    history = [json.loads(line) for line in lines if line.strip()]
    if not history:
        print("concord: the job wrote no metrics", flush=True)
        return 1
    plot_metrics(history, out / "metrics.png")
    accuracy = history[-1]["test_accuracy"]
    print(f"run directory: {out} (metrics.jsonl, metrics.png, model, checkpoint)")
    print(f"test_accuracy={accuracy:.4f}", flush=True)
    if min_accuracy is not None and accuracy < min_accuracy:
        print(f"concord: test accuracy {accuracy:.4f} is below --min-accuracy {min_accuracy}")
        return 1
    return 0


def plot_metrics(history: list[dict], path: Path) -> None:
    """Loss and test accuracy per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [h["loss"] for h in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    right.plot(epochs, [h["test_accuracy"] for h in history], marker="o", color="tab:green")
    right.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
