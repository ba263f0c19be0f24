"""Host RAM -> GPU throughput with zero compute: horovod_iter vs torch's DataLoader.

An in-memory uint8 image dataset (N x 3 x 224 x 224, as a TensorDataset), batch 256, shuffled.
In one run: torch ``DataLoader(pin_memory=True)`` with 0, 2, 4, 8 workers and ``.to(device,
non_blocking=True)``; horovod_iter's ``DistributedLoader(device=cuda)`` (whole-batch gathers in
parallel threads straight into pinned memory, side-stream copy); and a pinned copy alone (the
limit). Prints GB/s and ours / best DataLoader.

    python scripts/bench_h2d.py [--images 5120] [--workers 0 2 4 8]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=5120)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4, 8])
    p.add_argument("--epochs", type=int, default=2)
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_h2d.py needs a CUDA GPU; none is available here")
    import horovod_iter as hi

    hi.init("local")
    dev = torch.device("cuda", 0)
    images = torch.randint(0, 255, (a.images, 3, 224, 224), dtype=torch.uint8)
    ds = TensorDataset(images)
    nbytes = images.numel() * a.epochs

    def rate(batches) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for (x,) in batches:
            x = x.to(dev, non_blocking=True)
        torch.cuda.synchronize()
        return nbytes / (time.perf_counter() - t0) / 1e9

    def epochs(make):
        for e in range(a.epochs):
            yield from make(e)

    print(f"{torch.cuda.get_device_name(dev)}; {a.images} images 3x224x224 uint8, "
          f"batch {a.batch_size}, {a.epochs} epochs")
    best = 0.0
    for w in a.workers:
        dl = DataLoader(ds, batch_size=a.batch_size, shuffle=True, pin_memory=True,
                        num_workers=w, persistent_workers=w > 0)
        rate(epochs(lambda e, dl=dl: dl))  # warm-up
        r = rate(epochs(lambda e, dl=dl: dl))
        best = max(best, r)
        print(f"torch DataLoader(pin_memory=True, num_workers={w}): {r:7.2f} GB/s", flush=True)
    loader = hi.DistributedLoader(ds, batch_size=a.batch_size, device=dev, prefetch=2)

    def ours(e):
        loader.set_epoch(e)
        return loader

    rate(epochs(ours))
    r = rate(epochs(ours))
    print(f"horovod_iter DistributedLoader(device=cuda, prefetch=2): {r:7.2f} GB/s  "
          f"({r / best:.1f}x the best DataLoader)")
    buf = images[: a.batch_size].pin_memory()
    n = a.images // a.batch_size * a.epochs
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        buf.to(dev, non_blocking=True)
    torch.cuda.synchronize()
    limit = n * buf.numel() / (time.perf_counter() - t0) / 1e9
    print(f"pinned copy alone (limit): {limit:7.2f} GB/s")


if __name__ == "__main__":
    main()
