"""Horovod elastic training through horovod_iter: ranks may leave and join mid-epoch.

On one machine (a discovery script that prints ``localhost:2``):

    printf '#!/bin/sh\\necho localhost:2\\n' > discover_hosts.sh && chmod +x discover_hosts.sh
    horovodrun -np 2 --min-np 1 --max-np 2 --network-interface lo \\
        --host-discovery-script ./discover_hosts.sh python scripts/train_elastic.py --epochs 3

``--network-interface`` is what makes one machine work: without it Horovod's elastic driver
waits, silently and up to ``--elastic-timeout`` (600 s), for the discovery script to list two
hosts to test the network between them. On several hosts the discovery script prints one
``host:slots`` line per host and the same command takes the world's bounds, e.g. ``-np 8
--min-np 4 --max-np 16`` (with ``--network-interface eth0`` it starts with fewer than two hosts).

The loader goes into Horovod's own elastic state next to model and optimizer:

    state = hvd.elastic.TorchState(model=model, optimizer=opt, loader=loader, epoch=0)

``state.commit()`` saves the loader's position (a few integers), a failed rank rolls everyone
back to the last commit, and after ranks are added or removed the rest of the epoch is laid out
over the new world size: each sample is trained on exactly once per epoch. With ``--log-dir``
every rank appends, at each commit, the sample ids it trained on since the previous one (what
the elastic test counts); rank 0 writes its position to ``--progress-file``.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import signal
import time
from typing import Any

import torch
from torch.utils.data import TensorDataset

import horovod_iter as hi


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=480)
    p.add_argument("--batch-size", type=int, default=4, help="per rank")
    p.add_argument("--commit-every", type=int, default=2, help="steps between state.commit()")
    p.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step")
    p.add_argument("--log-dir", default=None, help="per-rank committed sample ids (tests)")
    p.add_argument("--shards", default=None,
                   help="stream the samples' ids from the *.txt shards in this folder "
                        "(hi.ShardedDataset) instead of a map-style dataset")
    p.add_argument("--progress-file", default=None, help="rank 0's position (tests)")
    p.add_argument("--kill", default=None, metavar="EPOCH:STEP:HOST:MARKER",
                   help="the worker on HOST (HOROVOD_HOSTNAME) SIGKILLs itself there (or at "
                        "its first step after), once "
                        "(MARKER file records it; tests)")
    return p.parse_args()


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    import horovod.torch as hvd

    hvd.init()
    backend = hi.init("horovod")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 8, generator=g)
    y = x.sum(1, keepdim=True)
    train_set: Any = TensorDataset(x, y, torch.arange(args.samples))
    collate: Any = None
    if args.shards:  # the same samples, streamed from text shards of ids
        def read(path: str) -> Any:
            with open(path) as f:
                for line in f:
                    yield int(line)

        def by_ids(ids: list[int]) -> Any:
            idx = torch.tensor(ids, dtype=torch.int64)
            return x[idx], y[idx], idx

        collate = by_ids

        train_set = hi.ShardedDataset(sorted(glob.glob(os.path.join(args.shards, "*.txt"))),
                                      read, seed=0)

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters())
    # uneven="pad": ranks that run out get empty batches, so nothing is repeated or dropped
    loader = hi.DistributedLoader(train_set, batch_size=args.batch_size, uneven="pad",
                                  timeout=120, collate_fn=collate,
                                  **({} if args.shards else {"seed": 0}))
    state = hvd.elastic.TorchState(model=model, optimizer=opt, loader=loader, epoch=0)
    log_path = (os.path.join(args.log_dir, f"{os.uname().nodename}-{os.getpid()}.jsonl")
                if args.log_dir else None)

    def flush(pending: list[int], epoch: int, steps: int) -> None:
        if log_path:
            with open(log_path, "a") as f:
                f.write(json.dumps({"epoch": epoch, "rank": hvd.rank(), "size": hvd.size(),
                                    "ids": pending}) + "\n")
        if args.progress_file and hvd.rank() == 0:
            tmp = args.progress_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"epoch": epoch, "steps": steps, "size": hvd.size()}, f)
            os.replace(tmp, args.progress_file)
        pending.clear()

    @hvd.elastic.run
    def train(state: hvd.elastic.TorchState) -> None:
        pending: list[int] = []  # trained on since the last commit; lost if we roll back
        for state.epoch in range(state.epoch, args.epochs):  # noqa: B020 - Horovod's idiom
            state.loader.set_epoch(state.epoch)
            for xb, yb, ids in state.loader:
                opt.zero_grad()
                # a padded (empty) batch still takes part in the gradient allreduce
                loss = ((model(xb) - yb) ** 2).sum() / max(1, len(xb))
                loss.backward()
                opt.step()
                pending += ids.tolist()
                if args.kill:
                    k_epoch, k_step, k_host, marker = args.kill.split(":", 3)
                    if ((state.epoch, state.loader.steps)
                            >= (int(k_epoch), int(k_step))
                            and os.environ.get("HOROVOD_HOSTNAME") == k_host
                            and not os.path.exists(marker)):
                        open(marker, "w").close()
                        os.kill(os.getpid(), signal.SIGKILL)  # a rank dies mid-epoch
                if args.step_sleep:
                    time.sleep(args.step_sleep)
                if state.loader.steps % args.commit_every == 0:
                    flush(pending, state.epoch, state.loader.steps)
                    state.commit()  # loader.state_dict(): a collective with sharded data
            flush(pending, state.epoch, -1)
            state.commit()
            if hvd.rank() == 0:
                logging.info("epoch %d done on %d ranks: %s", state.epoch, hvd.size(),
                             loader.stats())

    train(state)
    logging.info("rank %d finished (backend %s)", hvd.rank(), backend.name)


if __name__ == "__main__":
    main()
