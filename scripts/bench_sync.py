"""Cost of the end-of-data check per step, vs a blocking allreduce per step, in one run.

Each rank runs a loop of synthetic 1 ms steps over in-memory batches: bare (no check at all),
horovod_iter's EndOfDataSync as the loader uses it - map-style data (batch count known: one
message decides the pass, then a heartbeat every 64 steps) and an IterableDataset (batches
pulled ahead and reported every k steps, k sized from the measured collective latency) - and
the naive check a user would write (a blocking allreduce of a has-data flag before every step).
It prints the per-step overhead over bare as a fraction of the step, and iterable / map-style.
The step is a sleep by default (a host waiting for its GPU step mostly sleeps); --spin busy-waits
instead, which oversubscribes a machine with fewer cores than ranks.

    python scripts/bench_sync.py                   # launches 2, 3, 4 ranks under both launchers
    python scripts/bench_sync.py --ranks 2 --launchers torch
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def worker(steps: int, step_s: float, repeats: int, busy: bool) -> None:
    import torch

    import horovod_iter as hi
    from horovod_iter.sync import EndOfDataSync

    b = hi.init()
    batches = [torch.zeros(4) for _ in range(steps)]

    work = spin if busy else time.sleep

    def bare(tag: str) -> None:
        for _ in batches:
            work(step_s)

    def ours_iterable(tag: str) -> None:
        for _ in EndOfDataSync(iter(batches), b, "stop", timeout=60, name=f"bench.{tag}"):
            work(step_s)

    def ours_map(tag: str) -> None:
        for _ in EndOfDataSync(iter(batches), b, "stop", timeout=60, name=f"bench.{tag}",
                               num_batches=steps):
            work(step_s)

    def blocking(tag: str) -> None:
        it = iter(batches)
        for i in range(steps + 1):
            has = torch.tensor([1 if i < steps else 0], dtype=torch.int32)
            if int(b.allreduce(has, "sum", name=f"bench.{tag}.{i}")[0]) < b.size:
                break
            next(it)
            work(step_s)

    runs: dict[str, Any] = {"bare": bare, "blocking": blocking, "iterable": ours_iterable,
                            "map": ours_map}
    results: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(repeats):  # interleaved, best of `repeats`
        for name, fn in runs.items():
            b.barrier()
            t0 = time.perf_counter()
            fn(f"{name}.{r}")
            b.barrier()
            results[name].append((time.perf_counter() - t0) / steps)
    if b.rank == 0:
        best = {k: min(v) for k, v in results.items()}
        print("RESULT " + json.dumps({"backend": b.name, "ranks": b.size, **best}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--launchers", nargs="+", default=["horovod", "torch"])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--step-ms", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--spin", action="store_true", help="busy-wait steps instead of sleeping")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.steps, a.step_ms / 1e3, a.repeats, a.spin)
        return
    bindir = Path(sys.executable).parent
    me = [str(Path(__file__).resolve()), "--worker", "--steps", str(a.steps),
          "--step-ms", str(a.step_ms), "--repeats", str(a.repeats)] + (
              ["--spin"] if a.spin else [])
    print(f"{a.steps} steps of {a.step_ms} ms ({'busy wait' if a.spin else 'sleep'}), best of "
          f"{a.repeats}; {os.cpu_count()} cores; overhead per step over bare, % of the step")
    print(f"{'launcher':>9} {'ranks':>5} {'bare us':>8} {'map-style %':>11} "
          f"{'iterable %':>10} {'blocking %':>10} {'blocking/map':>12} {'blocking/iter':>13} "
          f"{'iter/map':>8}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for launcher in a.launchers:
        for n in a.ranks:
            if launcher == "horovod":
                cmd = [str(bindir / "horovodrun"), "-np", str(n), "-H", f"localhost:{n}",
                       "--gloo", sys.executable, *me]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={n}", *me]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            line = next((ln for ln in out.stdout.splitlines() if "RESULT " in ln), None)
            if line is None:
                print(f"{launcher:>9} {n:>5} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
                continue
            r = json.loads(line.split("RESULT ", 1)[1])
            step = a.step_ms / 1e3
            m, it, bl = (r[k] - r["bare"] for k in ("map", "iterable", "blocking"))
            print(f"{launcher:>9} {n:>5} {r['bare'] * 1e6:8.1f} {100 * m / step:11.2f} "
                  f"{100 * it / step:10.2f} {100 * bl / step:10.2f} "
                  f"{bl / max(m, 1e-6):12.1f} {bl / max(it, 1e-6):13.1f} "
                  f"{it / max(m, 1e-6):8.1f}", flush=True)


if __name__ == "__main__":
    main()
