"""A small real training run through horovod_iter, unchanged under horovodrun, torchrun or python.

    horovodrun -np 2 -H localhost:2 --gloo python scripts/train.py --epochs 3
    torchrun --standalone --nproc_per_node 2 scripts/train.py --epochs 3
    python scripts/train.py --epochs 3

A linear-regression-like MLP on generated data; every rank reads a disjoint slice of each epoch
through horovod_iter.DistributedSampler; gradients are averaged with Horovod's
DistributedOptimizer (horovod backend) or DDP (torch backend). Rank 0 prints what each epoch did.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import horovod_iter as hi


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    backend = hi.init()
    torch.manual_seed(args.seed)  # same data and initial weights on every rank
    x = torch.randn(args.samples, 16)
    true_w = torch.randn(16, 1)
    y = x @ true_w + 0.01 * torch.randn(args.samples, 1)
    dataset = TensorDataset(x, y)

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr * backend.size)
    if backend.name == "horovod":
        import horovod.torch as hvd

        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    elif backend.name == "torch":
        model = torch.nn.parallel.DistributedDataParallel(model)

    sampler = hi.DistributedSampler(dataset, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        t0, steps, seen, total = time.perf_counter(), 0, 0, 0.0
        for xb, yb in loader:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            opt.step()
            sampler.record(args.batch_size)
            steps, seen, total = steps + 1, seen + len(xb), total + loss.item()
        counts = backend.allgather_object(seen)
        if backend.rank == 0:
            print(f"epoch {epoch}: backend={backend.name} ranks={backend.size} steps={steps} "
                  f"samples/rank={counts} total={sum(counts)} "
                  f"mean_loss={total / max(steps, 1):.4f} "
                  f"time={time.perf_counter() - t0:.2f}s", flush=True)


if __name__ == "__main__":
    main()
