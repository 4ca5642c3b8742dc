"""Distribute an existing PyTorch loop with concord (the README's example, runnable).

python examples/mnist_allreduce.py                          # 1 process
concord run -n 4 examples/mnist_allreduce.py                # 4 workers, this machine
torchrun --nproc-per-node 4 examples/mnist_allreduce.py     # same, under torchrun
concord run -n 4 --nnodes 2 --node-rank R --master-addr HOST examples/mnist_allreduce.py
"""

from __future__ import annotations

import sys

import torch

import concord


def main(epochs: int = 1) -> float:
    torch.set_num_threads(1)
    ctx = concord.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    ).to(ctx.device)  # a GPU of this worker's own, when there is one; else the CPU
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = concord.distribute(model, opt, concord.AllReduce())
    loader = concord.data.loader(concord.data.mnist("train"), batch_size=64)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(ctx.device), y.to(ctx.device)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    x, y = (t.to(ctx.device) for t in concord.data.mnist("test").tensors)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    if ctx.is_main:
        print(f"test_accuracy={accuracy:.4f}")
    concord.shutdown()
    return accuracy


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
