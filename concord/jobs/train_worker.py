"""The main job's worker, started on every worker by ``concord train`` through the launcher.

By hand: ``concord run -n 4 -m concord.jobs.train_worker --epochs 1``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import concord
from concord.data.loader import loader
from concord.data.mnist import mnist
from concord.data.sources import make_loader
from concord.errors import UsageError
from concord.jobs.train import add_train_arguments, strategy_options
from concord.models import build_model
from concord.strategies.base import Strategy
from concord.trainer import Trainer


def build_strategy(args: argparse.Namespace) -> Strategy:
    """The strategy object named by ``--strategy`` and its options."""
    if args.strategy == "allreduce":
        options: dict = {} if args.engine == "auto" else {"engine": args.engine}
        if args.compression == "powersgd":
            options["compression"] = concord.PowerSGD()
        elif args.compression != "none":
            options["compression"] = args.compression  # fp16 | bf16 on the wire
        return concord.AllReduce(**options)
    if args.strategy.startswith("ps-"):
        from concord.strategies.ps import ParameterServer

        mode = "sync" if args.strategy == "ps-sync" else "async"
        push = "delta" if args.strategy == "ps-async-delta" else "grad"
        compression = None if args.compression == "none" else args.compression
        if mode == "sync":  # the servers clip the averaged gradient
            return ParameterServer(
                mode="sync",
                backup_workers=args.backup_workers,
                max_grad_norm=args.max_grad_norm,
                compression=compression,
            )
        return ParameterServer(
            mode="async", push=push, max_staleness=args.max_staleness, compression=compression
        )
    if args.strategy == "pipeline":
        from concord.strategies.pipeline import Pipeline

        split = args.split if args.split in ("params", "time") else _layer_indices(args.split)
        return Pipeline(
            stages=args.stages,
            microbatches=args.microbatches,
            schedule=args.schedule,
            split=split,
            replicas=args.replicas,
            sample_shape=(1, 28, 28),  # MNIST: lets split="time" measure a CNN's layers
            max_grad_norm=args.max_grad_norm,  # the stages add up their parts of the norm
        )
    raise UsageError(f"unknown strategy {args.strategy!r}")


def build_lr_scheduler(
    args: argparse.Namespace, opt: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The LR schedule named by ``--lr-schedule`` (None for constant), stepped per epoch."""
    if args.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    return None


def _layer_indices(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(
            f"--split must be params, time, or the first layer of stages 1..P-1 as in 3,5; "
            f"got {text!r}"
        ) from None


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    ctx = concord.init()
    strategy = build_strategy(args)
    torch.manual_seed(args.seed)
    model = build_model(args.model).to(ctx.device)  # a GPU of its own, when there is one
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    model, opt = concord.distribute(model, opt, strategy, ctx=ctx)
    shard = strategy.data_shard(ctx)
    train = make_loader(
        args.data, rank=shard.rank, world=shard.world, batch_size=args.batch_size, seed=args.seed
    )
    test = loader(mnist("test"), 1000, rank=shard.rank, world=shard.world, shuffle=False)
    # a strategy that clips (sync parameter servers on the servers, pipeline across the stages)
    # does it alone
    clip = None if getattr(strategy, "max_grad_norm", None) else args.max_grad_norm
    trainer = Trainer(
        model,
        opt,
        nn.functional.cross_entropy,
        ctx,
        shard,
        out_dir=args.out,
        max_grad_norm=clip,
        precision=args.precision,
        lr_scheduler=build_lr_scheduler(args, opt),
    )
    start = trainer.resume_latest()  # a restart (--max-restarts) goes on from its checkpoint
    if args.resume and not start:
        start = trainer.resume(args.resume)
    trainer.fit(train, args.epochs, test, start_epoch=start)
    trainer.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="concord.jobs.train_worker")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    strategy_options(args)  # (concord train forwards them; started by hand, the defaults)
    try:
        run(args)
    finally:
        concord.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
