"""Built-in models for the main job and the benchmarks (MNIST-sized)."""

from __future__ import annotations

from torch import nn

from concord.errors import UsageError

MODELS = ("mlp", "cnn")


def mlp() -> nn.Sequential:
    """784-512-256-128-10 with ReLU: four Linear layers, so it cuts into 3 pipeline stages."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def cnn() -> nn.Sequential:
    """A small LeNet-style CNN (two conv blocks, two Linear layers)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def build_model(name: str) -> nn.Sequential:
    """The built-in model called ``name`` ("mlp" or "cnn")."""
    builders = {"mlp": mlp, "cnn": cnn}
    if name not in builders:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return builders[name]()
