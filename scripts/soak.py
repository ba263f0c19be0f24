"""Soak: many epochs through DistributedLoader with prefetch and DataLoader workers, printing
RSS, threads, open file descriptors, child processes and CUDA memory after every epoch - they
must stay flat. Runs under horovodrun, torchrun or python.

    python scripts/soak.py --epochs 200 --workers 2
    bash scripts/run_torchrun.sh --nproc 2 scripts/soak.py --epochs 200 --workers 2

Ends with one line per rank: ``SOAK {json}`` with the first/last figures and the max growth
after the warm-up epochs; ``--report DIR`` also writes it to DIR/rank<r>.json (what
tests/test_soak.py checks).
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time

import psutil
import torch
from torch.utils.data import Dataset, TensorDataset

import horovod_iter as hi


class PerSample(Dataset):
    """Per-sample Python __getitem__: the DataLoader worker path."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return {"x": torch.full((64,), float(i)), "id": i}


def figures(device: torch.device) -> dict:
    p = psutil.Process()
    # let what is already ending end: multiprocessing's queue feeder threads and the worker
    # processes of a pass just closed finish asynchronously (torch's shutdown does not wait
    # for them); a leak stays, and still counts
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and (threading.active_count() > 1 or p.children()):
        time.sleep(0.01)
    return {"rss_mb": p.memory_info().rss / 2**20, "threads": threading.active_count(),
            "os_threads": p.num_threads(), "fds": p.num_fds(), "children": len(p.children()),
            "cuda_mb": (torch.cuda.memory_allocated(device) / 2**20
                        if device.type == "cuda" else 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3, help="epochs before the baseline")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--report", default=None, help="directory for rank<r>.json reports")
    a = ap.parse_args()
    b = hi.init()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", b.local_rank) if cuda else torch.device("cpu")
    tensor_ds = TensorDataset(torch.randn(a.samples, 64), torch.arange(a.samples))
    loaders = [
        hi.DistributedLoader(PerSample(a.samples), batch_size=a.batch_size, device=device,
                             num_workers=a.workers, prefetch=a.prefetch, uneven="pad"),
        hi.DistributedLoader(tensor_ds, batch_size=a.batch_size, device=device,
                             prefetch=a.prefetch),
    ]
    rows = []
    for epoch in range(a.epochs):
        for k, loader in enumerate(loaders):
            loader.set_epoch(epoch)
            it = iter(loader)
            for step, _ in enumerate(it):
                if k == 0 and epoch % 3 == 2 and step == 5:
                    break  # abandon some epochs mid-way: close() must release everything
        f = figures(device)
        rows.append(f)
        if b.rank == 0 and not a.quiet:
            print(f"epoch {epoch:4d}: " + " ".join(f"{k}={v:.1f}" if isinstance(v, float)
                                                  else f"{k}={v}" for k, v in f.items()),
                  flush=True)
    base = rows[min(a.warmup, len(rows) - 1)]
    growth = {k: max(r[k] for r in rows[a.warmup:]) - base[k] for k in base}
    report = json.dumps({"rank": b.rank, "pid": os.getpid(), "epochs": a.epochs,
                         "first": rows[0], "baseline": base, "last": rows[-1], "growth": growth})
    print("SOAK " + report, flush=True)
    if a.report:
        with open(os.path.join(a.report, f"rank{b.rank}.json"), "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
