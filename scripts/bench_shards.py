"""Sharded streaming data: bytes read per rank, and the cost of a mid-epoch resume.

1. 8 ranks over 64 JSONL shards: the bytes each rank reads with ``hi.ShardedDataset`` (every
   shard read by one consumer) vs ``hi.split_stream()`` over the same stream (every rank reads it
   all and keeps every 8th record). Each rank's view is the library's own code path, built
   with ``rank=r, num_replicas=8`` (reading needs no collective).
2. 1e6 records in 64 shards, one rank, resumed at 50% of the epoch: ``ShardedDataset``'s
   resume (skip within the one shard in progress, or seek when ``read`` takes ``start=``)
   vs replaying the consumed batches (the fallback for iterables without state, and
   torchdata's).

    python scripts/bench_shards.py [--records 1000000] [--chart docs/img/shards.png]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path


class Counter:
    def __init__(self) -> None:
        self.bytes = 0


def write(d: Path, shards: int, records: int) -> list[str]:
    per = records // shards
    paths = []
    k = 0
    for s in range(shards):
        p = d / f"s{s:03d}.jsonl"
        with open(p, "w") as f:
            for _ in range(per):
                f.write(json.dumps({"id": k, "text": "x" * 40}) + "\n")
                k += 1
        paths.append(str(p))
    return paths


def reader(counter: Counter, seek: bool):
    def read(path, start=0):
        with open(path, "rb") as f:
            for n, line in enumerate(f):
                if seek and n < start:
                    continue  # a format with an index would seek; JSONL skips cheaply
                counter.bytes += len(line)
                yield json.loads(line)["id"]

    def read_plain(path):
        return read(path)

    return read if seek else read_plain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=64)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--chart", help="write a chart here (needs matplotlib)")
    a = p.parse_args()
    import horovod_iter as hi

    hi.init("local")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write(Path(tmp), a.shards, a.records)
        total = sum(os.path.getsize(x) for x in paths)
        print(f"{a.records} records in {a.shards} shards, {total / 1e6:.1f} MB")
        # 1. bytes read per rank
        ours, theirs = [], []
        small = paths  # every rank's view, one after another
        for r in range(a.ranks):
            c = Counter()
            ds = hi.ShardedDataset(small, reader(c, False), seed=0, rank=r,
                                   num_replicas=a.ranks)
            n_ours = sum(1 for _ in ds)
            ours.append(c.bytes)
            c2 = Counter()
            stream = itertools.chain.from_iterable(reader(c2, False)(x) for x in small)
            n_theirs = sum(1 for _ in hi.split_stream(stream, rank=r, num_replicas=a.ranks))
            theirs.append(c2.bytes)
            assert abs(n_ours - n_theirs) <= a.records // a.shards + 1
        print(f"bytes read per rank ({a.ranks} ranks): ShardedDataset {max(ours) / 1e6:.1f} MB "
              f"(max; {max(ours) / total:.3f} of the data), split_stream() "
              f"{max(theirs) / 1e6:.1f} MB ({max(theirs) / total:.3f}); split_stream() reads "
              f"{max(theirs) / max(ours):.1f}x more")
        # 2. resume at 50%
        bs = 256
        consumed = a.records // 2 // bs

        def resumed(seek: bool) -> tuple[float, int]:
            c = Counter()
            ds = hi.ShardedDataset(paths, reader(c, seek), seed=0)
            loader = hi.DistributedLoader(ds, batch_size=bs, collate_fn=list)
            it = iter(loader)
            for _ in range(consumed):
                next(it)
            state = loader.state_dict()
            it.close()
            c.bytes = 0
            again = hi.DistributedLoader(hi.ShardedDataset(paths, reader(c, seek), seed=0),
                                         batch_size=bs, collate_fn=list)
            again.load_state_dict(state)
            t0 = time.perf_counter()
            first = next(iter(again))
            dt = time.perf_counter() - t0
            assert len(first) == bs
            return dt, c.bytes

        def replay() -> tuple[float, int]:
            c = Counter()
            ds = hi.ShardedDataset(paths, reader(c, False), seed=0)
            t0 = time.perf_counter()
            it = iter(ds)
            for _ in itertools.islice(it, consumed * bs):
                pass
            first = list(itertools.islice(it, bs))
            dt = time.perf_counter() - t0
            assert len(first) == bs
            return dt, c.bytes

        t_skip, b_skip = resumed(False)
        t_seek, b_seek = resumed(True)
        t_replay, b_replay = replay()
        print(f"resume at 50% ({consumed} batches of {bs}), time to the first batch: "
              f"ShardedDataset skip {t_skip * 1e3:.1f} ms ({b_skip / 1e6:.2f} MB read), "
              f"seek {t_seek * 1e3:.1f} ms ({b_seek / 1e6:.2f} MB), replay "
              f"{t_replay * 1e3:.1f} ms ({b_replay / 1e6:.1f} MB): "
              f"replay / skip = {t_replay / t_skip:.0f}x, replay / seek = "
              f"{t_replay / t_seek:.0f}x")
        if a.chart:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
            ax1.bar(["ShardedDataset", "split_stream()"], [max(ours) / 1e6, max(theirs) / 1e6],
                    color=["tab:green", "tab:red"])
            ax1.set_ylabel("MB read by the busiest rank")
            ax1.set_title(f"{a.ranks} ranks, {a.shards} shards")
            ax2.bar(["skip", "seek", "replay"], [t_skip * 1e3, t_seek * 1e3, t_replay * 1e3],
                    color=["tab:green", "tab:green", "tab:red"])
            ax2.set_ylabel("ms to the first batch")
            ax2.set_title(f"resume at 50% of {a.records:.0e} records")
            fig.tight_layout()
            fig.savefig(a.chart, dpi=110)


if __name__ == "__main__":
    main()
