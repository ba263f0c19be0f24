"""Copy/compute overlap on a GPU: horovod_iter's side-stream prefetch vs the usual ways.

A synthetic step whose GPU compute time is calibrated to the batch's host->device copy time
(the hardest case: perfect overlap hides one of the two entirely), for batches of 16, 64 and
256 MB. In one run it compares

* ``plain .to()``: pageable host batch, ``batch.to(device)`` (what most trainers do);
* ``pinned non_blocking``: DataLoader(pin_memory=True)-style pinned batches copied with
  ``non_blocking=True`` on the compute stream (serialises with compute on that stream);
* ``CudaPrefetcher``: ours, side stream, depth 2, around the same pinned batches;
* ``DistributedLoader``: ours end to end (gather from an in-memory dataset into pinned memory
  in a background thread, sync, prefetch).

It prints step time / max(copy time, compute time): 1.00 is perfect overlap.

    python scripts/bench_overlap.py [--sizes-mb 16 64 256] [--steps 40]
"""
# The closures below are defined and used within one loop iteration.
# ruff: noqa: B023
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def cuda_time(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Seconds of GPU time per call of ``fn`` (events around ``repeats`` calls)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--compute-ratio", type=float, default=1.0,
                   help="compute time as a multiple of the copy time")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_overlap.py needs a CUDA GPU; none is available here")
    import horovod_iter as hi

    hi.init("local")
    dev = torch.device("cuda", 0)
    mat = torch.randn(1024, 1024, device=dev)
    one_mm = cuda_time(lambda: mat @ mat, 20)
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}; "
          f"{a.steps} steps; compute = {a.compute_ratio} x copy")
    print(f"{'MB':>5} {'copy ms':>8} {'compute ms':>10} | {'plain .to()':>11} "
          f"{'pinned nb':>9} {'CudaPrefetcher':>14} {'DistributedLoader':>17}")
    for mb in a.sizes_mb:
        rows = mb * 1024 * 1024 // 4096
        pageable = [torch.randint(0, 255, (rows, 4096), dtype=torch.uint8) for _ in range(4)]
        pinned = [t.pin_memory() for t in pageable]
        copy_s = cuda_time(lambda: pinned[0].to(dev, non_blocking=True))
        k = max(1, math.ceil(a.compute_ratio * copy_s / one_mm))
        acc = torch.zeros((), device=dev)

        def step(x: torch.Tensor) -> None:
            nonlocal acc
            acc = acc + x[0, :8].float().sum()  # the step depends on the batch
            for _ in range(k):
                torch.mm(mat, mat)

        compute_s = cuda_time(lambda: step(pinned[0].to(dev)), 3) - copy_s
        compute_s = max(compute_s, k * one_mm)

        def timed(batches) -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            n = 0
            for x in batches:
                step(x)
                n += 1
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / n

        def plain():
            return (pageable[i % 4].to(dev) for i in range(a.steps))

        def pinned_nb():
            return (pinned[i % 4].to(dev, non_blocking=True) for i in range(a.steps))

        def prefetcher():
            return hi.CudaPrefetcher((pinned[i % 4] for i in range(a.steps)), dev, depth=2)

        data = torch.cat(pageable)  # 4 batches of rows, gathered by index by the loader
        ds = torch.utils.data.TensorDataset(data)

        def loader():
            ld = hi.DistributedLoader(ds, batch_size=rows, device=dev, prefetch=2,
                                      shuffle=True, drop_last=True)
            for epoch in range(math.ceil(a.steps / 4)):
                ld.set_epoch(epoch)
                for (x,) in ld:
                    yield x

        results = []
        for make in (plain, pinned_nb, prefetcher, loader):
            timed(make())  # warm-up
            results.append(timed(make()) / max(copy_s, compute_s))
        print(f"{mb:5d} {copy_s * 1e3:8.2f} {compute_s * 1e3:10.2f} | {results[0]:11.2f} "
              f"{results[1]:9.2f} {results[2]:14.2f} {results[3]:17.2f}", flush=True)
    print("step time / max(copy, compute); 1.00 = copy fully hidden")


if __name__ == "__main__":
    main()
