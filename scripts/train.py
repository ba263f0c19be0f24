"""A small real training run through horovod_iter, unchanged under horovodrun, torchrun or python.

    horovodrun -np 2 -H localhost:2 --gloo python scripts/train.py --epochs 3
    torchrun --standalone --nproc_per_node 2 scripts/train.py --epochs 3
    python scripts/train.py --epochs 3

An MLP regression on generated data. Every rank reads a disjoint slice of each epoch through
horovod_iter.DistributedLoader (device prefetch when CUDA is there); gradients are averaged by
Horovod's DistributedOptimizer (horovod backend) or DDP (torch backend: the script creates torch's
default process group, which DDP needs and hi.init() does not create). With --checkpoint, model,
optimizer and loader state are saved every --checkpoint-every steps and at each epoch's end;
--resume continues mid-epoch exactly where the checkpoint was taken (also on another number of
ranks). After each epoch an exact evaluation pass (uneven="pad") counts every held-out sample
once. Rank 0 prints what each epoch did.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

import horovod_iter as hi


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=4096, help="training samples")
    p.add_argument("--eval-samples", type=int, default=1001, help="held-out samples")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="over all ranks (instead of --batch-size; must divide by the ranks)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--checkpoint", default=None, help="checkpoint file (saved by rank 0)")
    p.add_argument("--checkpoint-every", type=int, default=10, help="steps")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--stop-after", type=int, default=None,
                   help="exit after this many training steps (simulates a crash)")
    p.add_argument("--stats", action="store_true", help="print the loader's per-epoch stats")
    p.add_argument("--progress", action="store_true",
                   help="progress bar on rank 0 (tqdm, else log lines) and per-epoch stats logs")
    p.add_argument("--json", default=None, help="write a per-rank JSON summary here (tests)")
    return p.parse_args()


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    backend = hi.init()  # horovod under horovodrun, torch under torchrun, else local
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", backend.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if backend.name == "torch" and not dist.is_initialized():
        # DDP needs torch's default process group; hi.init() makes only the library's own
        # (a gloo group of its own), so under torchrun the trainer creates the default one.
        dist.init_process_group("nccl" if cuda else "gloo")

    g = torch.Generator().manual_seed(args.seed)  # the same data on every rank
    true_w = torch.randn(16, 1, generator=g)
    x = torch.randn(args.samples + args.eval_samples, 16, generator=g)
    y = x @ true_w + 0.01 * torch.randn(len(x), 1, generator=g)
    ids = torch.arange(len(x))
    train = TensorDataset(x[: args.samples], y[: args.samples], ids[: args.samples])
    held_out = TensorDataset(x[args.samples:], y[args.samples:], ids[args.samples:])

    torch.manual_seed(args.seed)
    model: torch.nn.Module = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    sizes = ({"global_batch_size": args.global_batch_size} if args.global_batch_size
             else {"batch_size": args.batch_size})
    loader = hi.DistributedLoader(train, **sizes, seed=args.seed, num_workers=args.workers,
                                  prefetch=args.prefetch, device=device, progress=args.progress)
    start_epoch = 0
    if args.resume:
        if not args.checkpoint or not os.path.exists(args.checkpoint):
            raise SystemExit(f"--resume needs an existing --checkpoint, got {args.checkpoint!r}")
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"])
        start_epoch = ckpt["loader"]["epoch"]
    if backend.name == "horovod":
        import horovod.torch as hvd

        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        net = model
    elif backend.name == "torch":
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if cuda else None)
    else:
        net = model

    def save() -> None:
        if args.checkpoint and backend.rank == 0:  # the loader state is the same on every rank
            tmp = args.checkpoint + ".tmp"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "loader": loader.state_dict()}, tmp)
            os.replace(tmp, args.checkpoint)

    summary: dict = {"rank": backend.rank, "size": backend.size, "epochs": []}
    total_steps = 0
    for epoch in range(start_epoch, args.epochs):
        loader.set_epoch(epoch)  # keeps a resumed position in the saved epoch
        t0, steps, loss_sum, seen = time.perf_counter(), 0, 0.0, []
        for xb, yb, idb in loader:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(xb), yb)
            loss.backward()
            opt.step()
            steps, loss_sum = steps + 1, loss_sum + loss.item()
            seen += idb.tolist()
            total_steps += 1
            if args.checkpoint and total_steps % args.checkpoint_every == 0:
                save()
            if args.stop_after is not None and total_steps >= args.stop_after:
                summary["epochs"].append({"epoch": epoch, "seen": seen, "stopped": True})
                _finish(args, summary)
                return
        train_stats = loader.stats()
        save()
        # exact evaluation: every held-out sample once, ranks padded with empty batches
        eval_loader = hi.DistributedLoader(held_out, batch_size=64, shuffle=False, uneven="pad",
                                           device=device)
        err, count = torch.zeros(2, dtype=torch.float64), 0
        with torch.no_grad():
            for xb, yb, _ in eval_loader:
                err[0] += torch.nn.functional.mse_loss(model(xb), yb, reduction="sum").item()
                count += len(xb)
        totals = backend.allgather_object((float(err[0]), count, len(seen), steps))
        eval_sum = sum(t[0] for t in totals)
        eval_count = sum(t[1] for t in totals)
        summary["epochs"].append({"epoch": epoch, "seen": seen, "eval_count": eval_count})
        if backend.rank == 0:
            print(f"epoch {epoch}: backend={backend.name} ranks={backend.size} steps={steps} "
                  f"samples/rank={[t[2] for t in totals]} "
                  f"train_loss={loss_sum / max(steps, 1):.4f} "
                  f"eval_mse={eval_sum / max(eval_count, 1):.5f} "
                  f"eval_samples={eval_count}/{len(held_out)} "
                  f"time={time.perf_counter() - t0:.2f}s", flush=True)
            if args.stats:
                print("  stats: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                for k, v in train_stats.items()}), flush=True)
    _finish(args, summary)


def _finish(args: argparse.Namespace, summary: dict) -> None:
    if args.json:
        with open(f"{args.json}.{summary['rank']}", "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main()
