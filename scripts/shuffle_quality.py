"""How well a ShardedDataset stream is shuffled, against a uniform shuffle of all records.

Records are numbered shard after shard (shard s holds a contiguous id range), so an unshuffled
stream reads like a counter. For each configuration every rank's stream is made in process
(the layout is a pure function, no launch needed) and batched; printed per configuration:

* shards/batch: distinct shards in a global batch (all ranks' batches of one step), mean over
  the full steps, and its ratio to the uniform shuffle's (a random permutation of all records,
  cut into global batches of the same size) - the issue's goal is >= 0.9;
* lag-1: the correlation of consecutive ids in rank 0's stream (uniform: ~0; shard after shard:
  ~1);
* displacement: mean |position - position in id order| in rank 0's stream, over its length
  (uniform: ~1/3);
* open: readers open per consumer (the memory cost: one reader and one read-ahead record each).

    python scripts/shuffle_quality.py [--shards 64] [--ranks 2] [--batch 64] [--seed 0]
"""
from __future__ import annotations

import argparse
import random

import numpy as np

import horovod_iter as hi


def streams(counts: list[int], ranks: int, **kw) -> list[list[int]]:
    starts = np.cumsum([0, *counts[:-1]]).tolist()
    shards = list(range(len(counts)))

    def read(s: int, start: int = 0):
        return iter(range(starts[s] + start, starts[s] + counts[s]))

    batch = kw.pop("global_batch", None)
    out = []
    for r in range(ranks):
        ds = hi.ShardedDataset(shards, read, rank=r, num_replicas=ranks, **kw)
        if batch is not None:  # the canonical layout cuts steps of the global batch
            ds.set_batching(batch)
        out.append(list(ds))
    return out


def shard_of(sizes: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(sizes)), sizes)


def figures(per_rank: list[list[int]], sizes: list[int], batch: int) -> dict[str, float]:
    owner = shard_of(sizes)
    steps = min(len(s) for s in per_rank) // batch
    per_batch = [len({int(owner[i]) for s in per_rank for i in s[k * batch:(k + 1) * batch]})
                 for k in range(steps)]
    ids = np.asarray(per_rank[0], dtype=np.float64)
    lag1 = float(np.corrcoef(ids[:-1], ids[1:])[0, 1]) if len(ids) > 2 else float("nan")
    order = np.argsort(np.argsort(ids))
    disp = float(np.mean(np.abs(order - np.arange(len(ids)))) / len(ids))
    return {"shards_per_batch": float(np.mean(per_batch)), "lag1": lag1, "displacement": disp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="per rank")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    sizes = [rng.randint(500, 1500) for _ in range(a.shards)]
    total = sum(sizes)
    perm = np.random.default_rng(a.seed).permutation(total).tolist()
    uniform = [perm[r::a.ranks] for r in range(a.ranks)]
    base = figures(uniform, sizes, a.batch)
    per_consumer = -(-a.shards // a.ranks)
    configs = [
        ("uniform shuffle (reference)", None),
        ("interleave=1 (shard after shard)", dict(interleave=1)),
        ("interleave=1, shuffle_buffer=1000", dict(interleave=1, shuffle_buffer=1000)),
        ("interleave=8", dict(interleave=8)),
        ("interleave=8, sizes", dict(interleave=8, sizes=sizes)),
        ("interleave=64 (default)", dict()),
        ("interleave=64 (default), sizes", dict(sizes=sizes)),
        (f"canonical {a.ranks} x 1", dict(sizes=sizes, canonical_ranks=a.ranks,
                                          global_batch=a.batch * a.ranks)),
        ("canonical 8 x 4", dict(sizes=sizes, canonical_ranks=8, canonical_workers=4,
                                 global_batch=a.batch * a.ranks)),
    ]
    print(f"{a.shards} shards ({total} records), {a.ranks} ranks, batch {a.batch} per rank "
          f"(global {a.batch * a.ranks}); uniform shards/batch = {base['shards_per_batch']:.1f}")
    print(f"{'configuration':36s} {'shards/batch':>12s} {'ratio':>6s} {'lag-1':>7s} "
          f"{'displ.':>7s} {'open':>5s}")
    for name, kw in configs:
        if kw is None:
            f, open_ = base, "-"
        else:
            f = figures(streams(sizes, a.ranks, seed=a.seed, **kw), sizes, a.batch)
            streams_read = (kw["canonical_ranks"] * kw.get("canonical_workers", 1) // a.ranks
                            if "canonical_ranks" in kw else 1)
            open_ = str(min(kw.get("interleave", 64), per_consumer) if streams_read == 1 else
                        streams_read * -(-a.shards // (streams_read * a.ranks)))
        print(f"{name:36s} {f['shards_per_batch']:12.1f} "
              f"{f['shards_per_batch'] / base['shards_per_batch']:6.2f} {f['lag1']:7.3f} "
              f"{f['displacement']:7.3f} {open_:>5s}")


if __name__ == "__main__":
    main()
