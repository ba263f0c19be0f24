"""Fetch/compute overlap on the CPU: the host stage on a thread vs the usual ways.

A training loop that syncs every step (``loss.item()``) over batches whose fetch releases the
GIL, with a step whose compute (a matmul) releases it too, sized so compute ~ fetch. In one run,
for each dataset, it times

* ``torch 0 workers``: ``torch.utils.data.DataLoader(num_workers=0)`` (fetch in the loop);
* ``torch 2 workers+pin``: ``DataLoader(num_workers=2, pin_memory=True, persistent_workers=
  True)`` (``pin_memory`` does nothing without CUDA);
* ``ours inline``: ``DistributedLoader`` at ``num_workers=0`` (fetch in the loop);
* ``ours thread``: the same with the host stage on a thread (`ThreadedSource`, ``prefetch``
  batches ahead): ``fetch_thread=True``.

and prints per batch: the loader alone (fetch), the step alone on ready batches (compute), the
loop (step), and ``step / max(fetch, compute)``: 1.00 is perfect overlap, ``(fetch + compute) /
max`` (up to 2.00) is none. ``compute`` is the step over a pass's worth of distinct batches made
beforehand, as a loader hands them over (not in the CPU's caches: a 3.7 MB batch read once
costs the step 1.08-1.09x its time on one batch read again and again, which ``hot`` shows).
Datasets:

* ``gather``: a ``TensorDataset`` of float32 rows, a shuffled batch gathered by index
  (``index_select``: releases the GIL); torch's loaders get torch's fast form for it
  (``sampler=BatchSampler(...)``, ``batch_size=None``: one ``ds[indices]`` gather a batch);
* ``decode``: zlib-compressed uint8 samples decoded with numpy (``zlib.decompress`` and the
  numpy conversion release the GIL), through ``__getitems__``; ``decode-stream``: the same
  samples as an ``IterableDataset`` (batches pulled ahead by the end-of-data check);
* ``python``: a per-sample Python dataset (holds the GIL for the whole fetch), with the same
  matmul step; and ``python+pystep``: the same with a step that is Python too (many tiny ops):
  both stages want the GIL, so the thread cannot overlap them.

Stages are single-threaded (``torch.set_num_threads(1)``, batches under the gather's 4 MB
parallel split) so that fetch and compute each fit one core of a 2-core machine.

    python scripts/bench_host_stage.py [--rounds 10] [--repeats 1] [--cases ...]
    python scripts/bench_host_stage.py --cases decode-stream --pass-batches 200
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import statistics
import time
import warnings
import zlib
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    TensorDataset,
)

import horovod_iter as hi
from horovod_iter.host_stage import ThreadedSource

PASS = 40  # batches per pass (epoch)
# gather: 154 MB of short rows (128 B: one random access each), 3.7 MB batches (below the
# gather's 4 MB split over threads: one core each for fetch and compute)
ROWS, DIM, BATCH = 30000 * PASS, 32, 30000


class Decode(Dataset):
    """``n`` samples stored zlib-compressed (128 KB of uint8 each), decoded to float32: a few
    Python calls per sample around long GIL-free calls, as an image decoder is."""

    def __init__(self, n: int, size: int = 131072) -> None:
        rng = np.random.default_rng(0)
        base = rng.integers(0, 16, size, dtype=np.uint8)  # compressible, like an image
        self.blobs = [zlib.compress(np.roll(base, i).tobytes(), 6) for i in range(64)]
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.__getitems__([i])[0]

    def __getitems__(self, idx: list[int]) -> list[torch.Tensor]:
        out = []
        for i in idx:
            raw = np.frombuffer(zlib.decompress(self.blobs[i % 64]), dtype=np.uint8)
            out.append(torch.from_numpy(raw.astype(np.float32) * (1 / 255)))
        return out


class DecodeStream(IterableDataset):
    """`Decode`'s samples as a stream (iterable data: the end-of-data check pulls batches
    ahead of the steps)."""

    def __init__(self, n: int) -> None:
        self.decode = Decode(n)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self.decode)):
            yield self.decode[i]


class PySamples(Dataset):
    """Per-sample Python work (~``work`` loop iterations), a 256-float tensor each."""

    def __init__(self, n: int, work: int = 300) -> None:
        self.n, self.work = n, work

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        acc = 0
        for k in range(self.work):
            acc += (i * k) % 7
        return torch.full((256,), float(acc))


class _Threaded(hi.DistributedLoader):
    """The host stage wired as the loader's proposed ``fetch_thread=True`` does."""

    def _start(self, *args: Any) -> Any:
        pass_, source, options = super()._start(*args)
        return pass_, ThreadedSource(source, max(1, self.prefetch), device=self.device), options


def ours(ds: Dataset, batch: int, thread: bool) -> hi.DistributedLoader:
    kw: dict[str, Any] = dict(batch_size=batch, shuffle=not isinstance(ds, IterableDataset),
                              drop_last=True, device="cpu",
                              log_stats=False)
    if not thread:
        return hi.DistributedLoader(ds, **kw)
    if "fetch_thread" in inspect.signature(hi.DistributedLoader).parameters:
        return hi.DistributedLoader(ds, fetch_thread=True, **kw)
    return _Threaded(ds, **kw)


def first_tensor(b: Any) -> torch.Tensor:
    return b[0] if isinstance(b, (list, tuple)) else b


def per_batch(loader: Any, step: Callable[[torch.Tensor], float] | None) -> float:
    """Seconds per batch over one whole pass of ``loader`` (a new epoch), its start (the
    thread, the workers' first batches, the end-of-data check) included, as in training."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(next(_epochs))
    n, t0 = 0, time.perf_counter()
    for b in loader:
        x = first_tensor(b)
        if step is not None:
            step(x)
        n += 1
    return (time.perf_counter() - t0) / n


_epochs = itertools.count()


def matmul_step(k: int) -> Callable[[torch.Tensor], float]:
    mat = torch.randn(160, 160)  # ~0.1 ms a product: fine steps for the calibration

    def step(x: torch.Tensor) -> float:
        acc = x[:, :8].sum()  # the step depends on the batch
        y = mat
        for _ in range(k):
            y = torch.mm(y, mat).tanh_()
        return float((acc + y[0, 0]).item())  # a sync every step
    return step


def python_step(k: int) -> Callable[[torch.Tensor], float]:
    w = torch.randn(8)

    def step(x: torch.Tensor) -> float:
        acc = x[:, :8].sum()
        for _ in range(k):  # tiny ops: the interpreter, not the kernels, takes the time
            acc = acc + (w * 0.5).sum()
        return float(acc.item())
    return step


def calibrate(make_step: Callable[[int], Callable[[torch.Tensor], float]],
              xs: list[torch.Tensor], target_s: float
              ) -> tuple[Callable[[torch.Tensor], float], float]:
    """The step whose time over the batches ``xs`` is closest to ``target_s``, and its time."""
    k = 1
    for _ in range(3):  # the step's fixed part (sync, slicing) makes one product cost more
        t = min(timed_alone(make_step(k), xs, 5) for _ in range(5))
        k = max(1, round(k * target_s / t))
    step = make_step(k)
    return step, timed_alone(step, xs)


def timed_alone(step: Callable[[torch.Tensor], float], xs: list[torch.Tensor],
                n: int = 30) -> float:
    """Seconds per step over ``n`` steps, taking the batches ``xs`` in turn."""
    step(xs[0])
    t0 = time.perf_counter()
    for i in range(n):
        step(xs[i % len(xs)])
    return (time.perf_counter() - t0) / n


def pass_batches(ds: Dataset, batch: int) -> list[torch.Tensor]:
    """A pass's worth of distinct batches (copies), for timing the step as a loader hands
    batches over: each read once a pass, so not in the CPU's caches when its step comes."""
    out = []
    for b in DataLoader(ds, batch_size=batch, drop_last=True):
        out.append(first_tensor(b).clone())
        if len(out) == PASS:
            break
    return out


def run_case(ds: Dataset, batch: int, make_step: Callable[[int], Any], rounds: int
             ) -> list[tuple[str, float, float, float, float]]:
    """(loader, fetch, compute, compute on one hot batch, step) per batch: the best of
    ``rounds`` rounds, each timing a pass of every loader alone and in the loop, in turn.
    Best, not median: on a shared machine other processes only ever add time, so each
    figure's least disturbed timing is the estimate of its own cost (and the ratios compare
    like with like)."""
    shuffle = not isinstance(ds, IterableDataset)  # a stream's workers each read all of it
    torch_kw: dict[str, Any] = dict(batch_size=batch, shuffle=shuffle, drop_last=True)
    if isinstance(ds, TensorDataset):  # torch's fast way: ds[list of indices], one gather
        torch_kw = dict(batch_size=None, sampler=BatchSampler(RandomSampler(ds), batch, True))
    loaders: dict[str, Any] = {
        "torch 0 workers": DataLoader(ds, **torch_kw),
        "torch 2 workers+pin": DataLoader(ds, num_workers=2, pin_memory=True,
                                          persistent_workers=True, **torch_kw),
        "ours inline": ours(ds, batch, False),
        "ours thread": ours(ds, batch, True),
    }
    for loader in loaders.values():  # warm-up: workers, pages, buffers
        per_batch(loader, None)
    xs = pass_batches(ds, batch)
    target = min(per_batch(loaders["ours inline"], None) for _ in range(5))
    step, _ = calibrate(make_step, xs, target)
    fetch: dict[str, list[float]] = {k: [] for k in loaders}
    loop: dict[str, list[float]] = {k: [] for k in loaders}
    compute: list[float] = []
    hot: list[float] = []
    for _ in range(rounds):
        compute.append(timed_alone(step, xs, 2 * len(xs)))
        hot.append(timed_alone(step, xs[:1]))
        for label, loader in loaders.items():
            fetch[label].append(per_batch(loader, None))
            loop[label].append(per_batch(loader, step))
    return [(k, min(fetch[k]), min(compute), min(hot), min(loop[k])) for k in loaders]


def main() -> None:
    global PASS
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="timings per figure (the best)")
    p.add_argument("--cases", nargs="+",
                   default=["gather", "decode", "decode-stream", "python", "python+pystep"])
    p.add_argument("--repeats", type=int, default=1, help="runs of every case (spread)")
    p.add_argument("--pass-batches", type=int, default=PASS,
                   help="batches per pass of the decode and python cases (the gather's rows "
                        "stay as they are); iterable data builds its look-ahead at each "
                        "pass's start, so short passes show that cost")
    a = p.parse_args()
    PASS = a.pass_batches
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    hi.init("local")
    cases: dict[str, tuple[Callable[[], Dataset], int, Callable[[int], Any]]] = {
        "gather": (lambda: TensorDataset(torch.randn(ROWS, DIM)), BATCH, matmul_step),
        "decode": (lambda: Decode(16 * PASS), 16, matmul_step),
        "decode-stream": (lambda: DecodeStream(16 * PASS), 16, matmul_step),
        "python": (lambda: PySamples(64 * PASS), 64, matmul_step),
        "python+pystep": (lambda: PySamples(64 * PASS), 64, python_step),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread, "
          f"best of {a.rounds} passes of {PASS} batches; ms per batch")
    print(f"{'case':<14} {'loader':<20} {'fetch':>7} {'compute':>8} {'hot':>6} {'step':>7} "
          f"{'step/max':>9} {'serial/max':>10}")
    ratios: dict[tuple[str, str], list[float]] = {}
    for _ in range(a.repeats):
        for case in a.cases:
            make_ds, batch, make_step = cases[case]
            for label, f, c, h, s in run_case(make_ds(), batch, make_step, a.rounds):
                best = max(f, c)
                ratios.setdefault((case, label), []).append(s / best)
                print(f"{case:<14} {label:<20} {f * 1e3:7.2f} {c * 1e3:8.2f} {h * 1e3:6.2f} "
                      f"{s * 1e3:7.2f} {s / best:9.2f} {(f + c) / best:10.2f}", flush=True)
    if a.repeats > 1:
        print("\nstep / max(fetch, compute) over the runs: median (min-max)")
        for (case, label), r in ratios.items():
            print(f"{case:<14} {label:<20} {statistics.median(r):5.2f} "
                  f"({min(r):.2f}-{max(r):.2f})")


if __name__ == "__main__":
    main()
