"""Compare horovod_iter.DistributedSampler with torch's DistributedSampler, in one run.

For each n, in a fresh subprocess per (sampler, n) so peak RSS is clean: time to the first
index of rank 0 (world 8), time to iterate rank 0's whole shard, and peak RSS above the
process's baseline after imports. torch materialises randperm(n) as a Python list on every
rank, so it is skipped above --torch-max.

    python scripts/bench_sampler.py                 # n = 1e6, 1e7, 1e8 (+1e9 ours only)
    python scripts/bench_sampler.py --sizes 1e6 1e7
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
kind, n, world = sys.argv[1], int(float(sys.argv[2])), int(sys.argv[3])
import torch, numpy
from torch.utils.data.distributed import DistributedSampler as TorchSampler
import horovod_iter as hi
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if kind == "torch":
    s = TorchSampler(range(n), num_replicas=world, rank=0, shuffle=True, seed=0)
else:
    s = hi.DistributedSampler(n, num_replicas=world, rank=0, shuffle=True, seed=0)
it = iter(s)
first = next(it)
t_first = time.perf_counter() - t0
count = 1
for _ in it:
    count += 1
t_total = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"first_ms": t_first * 1e3, "total_s": t_total, "count": count,
                  "rss_mb": (peak - base) / 1024}))
"""


def measure(kind: str, n: float, world: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(n), str(world)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8, 1e9])
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--torch-max", type=float, default=1e8,
                   help="largest n for torch (1e9 needs > 40 GB per rank)")
    args = p.parse_args()
    print(f"world={args.world}, rank 0's shard, shuffle=True")
    head = (f"{'n':>8} {'sampler':>8} {'first idx ms':>13} {'shard s':>9} {'ns/idx':>7} "
            f"{'peak RSS MB':>12} {'first x':>8} {'total x':>8} {'RSS x':>7}")
    print(head)
    for n in args.sizes:
        rows = {}
        for kind in ("torch", "ours"):
            if kind == "torch" and n > args.torch_max:
                continue
            rows[kind] = measure(kind, n, args.world)
        for kind, r in rows.items():
            ratio = ""
            if kind == "ours" and "torch" in rows:
                t = rows["torch"]
                ratio = (f"{t['first_ms'] / r['first_ms']:8.0f} {t['total_s'] / r['total_s']:8.2f} "
                         f"{t['rss_mb'] / max(r['rss_mb'], 0.1):7.0f}")
            print(f"{n:8.0e} {kind:>8} {r['first_ms']:13.2f} {r['total_s']:9.2f} "
                  f"{r['total_s'] / r['count'] * 1e9:7.0f} {r['rss_mb']:12.1f} {ratio}", flush=True)
    print("x = torch / ours (higher is better for ours)")


if __name__ == "__main__":
    main()
