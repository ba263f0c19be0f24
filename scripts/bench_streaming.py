"""Streaming data, side by side with the peers, in one run: ShardedDataset vs MosaicML
Streaming, LitData and WebDataset (whichever are installed: ``pip install -e '.[bench]'
torch==2.13.0``, best in a venv of its own - mosaicml-streaming pins an older transformers).

The same records are written once in each library's native format (ours and WebDataset's:
tar shards; Mosaic: MDS; LitData: its optimized chunks), 64 shards, then each is read under
``torchrun`` (2 ranks by default, DataLoader workers 0 and 2) for one shuffled epoch. Rows:

* ``rec/s/rank``: records per second per rank (small records, ~100 B);
* ``MB/s/rank``: payload MB per second per rank (large records, 100 KB);
* ``first``: seconds from iter() to the first batch, and ``resume``: the same after a
  mid-epoch state_dict() / load_state_dict() (peers without a resumable loader: -);
* ``state_dict``: milliseconds of a mid-epoch ``state_dict()`` (the slowest rank);
* ``once``: every record exactly once over the ranks ("yes", or how many were missing / twice).

The last column is each row's ratio to the best peer on that metric (higher is better for
throughput, lower for latency).

    python scripts/bench_streaming.py [--ranks 2] [--small 100000] [--large 2000]

``--plain-row`` runs only the row "ours vs a plain per-rank loop" (about a minute): the loop a
user writes by hand (each rank reads ``files[rank::world]`` with the same reader, DataLoader
with ``default_collate``, no resume, no exactly-once) against our canonical ShardedDataset and
a MixedStream of two canonical halves through ``hi.DistributedLoader``, workers 0 and 2, and
prints records/s per rank and the ratio ours / plain (goal: >= 0.8x).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

SHARDS = 64
BATCH = 32


def _torchvision_or_stub() -> None:
    """mosaicml-streaming imports torchvision at import time (for its vision datasets, which
    this benchmark does not use); PyPI's torchvision does not load against the CPU torch build
    here. Then give it the two names it imports, so that its streaming code - the code under
    test - loads unchanged."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        import importlib.machinery
        import types

        for name in list(sys.modules):
            if name.startswith("torchvision"):
                del sys.modules[name]
        tv = types.ModuleType("torchvision")
        datasets = types.ModuleType("torchvision.datasets")
        transforms = types.ModuleType("torchvision.transforms")
        functional = types.ModuleType("torchvision.transforms.functional")
        datasets.VisionDataset = type("VisionDataset", (), {})  # type: ignore[attr-defined]
        datasets.CIFAR10 = type("CIFAR10", (), {})  # type: ignore[attr-defined]
        functional.to_tensor = lambda x: x  # type: ignore[attr-defined]
        tv.datasets, tv.transforms = datasets, transforms  # type: ignore[attr-defined]
        transforms.functional = functional  # type: ignore[attr-defined]
        for mod in (tv, datasets, transforms, functional):
            mod.__spec__ = importlib.machinery.ModuleSpec(mod.__name__, None)
        tv.__version__ = "0.0"  # type: ignore[attr-defined]
        sys.modules.update({"torchvision": tv, "torchvision.datasets": datasets,
                            "torchvision.transforms": transforms,
                            "torchvision.transforms.functional": functional})


# -- writing ------------------------------------------------------------------------------
def payload(i: int, size: int) -> bytes:
    return (i.to_bytes(8, "little") * (size // 8 + 1))[:size]


def write_tar(out: Path, n: int, size: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "count.json").write_text(json.dumps(n))
    for s in range(SHARDS):
        with tarfile.open(out / f"s{s:03d}.tar", "w") as tar:
            for i in range(s, n, SHARDS):
                for ext, data in (("id", str(i).encode()), ("bin", payload(i, size))):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def write_mds(out: Path, n: int, size: int) -> bool:
    try:
        from streaming import MDSWriter
    except ImportError:
        return False
    limit = max(1 << 16, n * (size + 64) // SHARDS)
    with MDSWriter(out=str(out), columns={"id": "int", "bin": "bytes"}, size_limit=limit) as w:
        for i in range(n):
            w.write({"id": i, "bin": payload(i, size)})
    return True


def _litdata_item(i: int, size: int = 0) -> dict:
    return {"id": i, "bin": payload(i, size)}


def write_litdata(out: Path, n: int, size: int) -> bool:
    try:
        import functools

        import litdata
    except ImportError:
        return False
    litdata.optimize(fn=functools.partial(_litdata_item, size=size), inputs=list(range(n)),
                     output_dir=str(out), chunk_bytes=max(1 << 16, n * (size + 64) // SHARDS),
                     num_workers=1, mode="overwrite")
    return True


# -- reading (one rank, under torchrun) ----------------------------------------------------
def read_tar(path: str, start: int = 0):
    """Our reader: (id, payload) pairs of one tar shard from the start-th record, through
    ``hi.read_tar`` (WebDataset's layout; it parses the headers itself and seeks on resume)."""
    import horovod_iter as hi

    for s in hi.read_tar(path, start):
        yield int(s["id"]), s["bin"]


def read_tar_tarfile(path: str, start: int = 0):
    """The same through Python's ``tarfile`` (what a user's own reader would do): a resume
    seeks over the records before it by their headers' size fields (no data read), then
    streams from there."""
    with open(path, "rb") as f:
        for _ in range(2 * start):  # two members per record
            header = f.read(512)
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
            f.seek(-(-size // 512) * 512, 1)
        with tarfile.open(fileobj=f, mode="r|") as tar:
            current: dict = {}
            for member in tar:
                g = tar.extractfile(member)
                current[member.name.rsplit(".", 1)[1]] = g.read() if g is not None else b""
                if len(current) == 2:
                    yield int(current["id"]), current["bin"]
                    current = {}


def collate(samples):
    import torch

    return torch.tensor([s[0] for s in samples]), [s[1] for s in samples]


def make_loader(peer: str, root: Path, workers: int, state=None, plain_row: bool = False):
    import torch
    from torch.utils.data import DataLoader, default_collate

    if peer.startswith("horovod_iter"):
        import horovod_iter as hi

        shards = sorted(str(p) for p in (root / "tar").glob("*.tar"))
        n = json.loads((root / "tar" / "count.json").read_text())
        world = int(os.environ.get("WORLD_SIZE", "1"))
        sizes = [len(range(s, n, SHARDS)) for s in range(SHARDS)]
        fn = default_collate if plain_row else collate
        if peer == "horovod_iter-canonical":  # elastic determinism: needs the sizes
            ds = hi.ShardedDataset(shards, read_tar, seed=0, canonical_ranks=world,
                                   canonical_workers=2, sizes=sizes)
        elif peer == "horovod_iter-mixed":  # two canonical halves, mixed by their sizes
            half = SHARDS // 2
            parts = [hi.ShardedDataset(shards[a:b], read_tar, seed=0, canonical_ranks=world,
                                       canonical_workers=2, sizes=sizes[a:b])
                     for a, b in ((0, half), (half, SHARDS))]
            ds = hi.MixedStream(parts, weights=[sum(sizes[:half]), sum(sizes[half:])],
                                samples_per_epoch=n)
            loader = hi.DistributedLoader(ds, global_batch_size=BATCH * world,
                                          num_workers=workers, collate_fn=fn, timeout=600)
            if state is not None:
                loader.load_state_dict(state)
            return loader, lambda b: b[0].tolist(), lambda b: sum(len(x) for x in b[1])
        else:
            ds = hi.ShardedDataset(shards, read_tar, seed=0)
        loader = hi.DistributedLoader(ds, batch_size=BATCH, num_workers=workers,
                                      collate_fn=fn, uneven="pad", timeout=600)
        if state is not None:
            loader.load_state_dict(state)
        return loader, lambda b: b[0].tolist(), lambda b: sum(len(x) for x in b[1])
    if peer == "plain":  # what a user writes by hand: files[rank::world], no resume
        from torch.utils.data import IterableDataset, get_worker_info

        shards = sorted(str(p) for p in (root / "tar").glob("*.tar"))
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))

        class Plain(IterableDataset):
            def __iter__(self):
                info = get_worker_info()
                mine = shards[rank::world]
                if info is not None:
                    mine = mine[info.id::info.num_workers]
                for path in mine:
                    yield from read_tar(path)

        return (DataLoader(Plain(), batch_size=BATCH, num_workers=workers),
                lambda b: b[0].tolist(), lambda b: sum(len(x) for x in b[1]))
    if peer == "webdataset":
        import webdataset as wds

        urls = sorted(str(p) for p in (root / "tar").glob("*.tar"))
        ds = (wds.WebDataset(urls, shardshuffle=64, nodesplitter=wds.split_by_node,
                             workersplitter=wds.split_by_worker, empty_check=False)
              .to_tuple("id", "bin").batched(BATCH, partial=True))
        return (DataLoader(ds, batch_size=None, num_workers=workers),
                lambda b: [int(x) for x in b[0]], lambda b: sum(len(x) for x in b[1]))
    if peer == "mosaicml-streaming":
        from streaming import StreamingDataLoader, StreamingDataset

        ds = StreamingDataset(local=str(root / "mds"), shuffle=True, shuffle_seed=0,
                              batch_size=BATCH)

        def mcollate(samples):
            return torch.tensor([s["id"] for s in samples]), [s["bin"] for s in samples]

        loader = StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers,
                                     collate_fn=mcollate)
        if state is not None:
            loader.load_state_dict(state)
        return loader, lambda b: b[0].tolist(), lambda b: sum(len(x) for x in b[1])
    if peer == "litdata":
        import litdata

        ds = litdata.StreamingDataset(str(root / "litdata"), shuffle=True, seed=0)

        def lcollate(samples):  # its bytes come as memoryviews: bytes, as the others give
            return torch.tensor([s["id"] for s in samples]), [bytes(s["bin"]) for s in samples]

        loader = litdata.StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers,
                                             collate_fn=lcollate)
        if state is not None:
            loader.load_state_dict(state)
        return loader, lambda b: b[0].tolist(), lambda b: sum(len(x) for x in b[1])
    raise ValueError(peer)


def rank_main(a: argparse.Namespace) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    root = Path(a.data)
    out: dict = {"rank": rank}
    loader, ids_of, bytes_of = make_loader(a.peer, root, a.workers, plain_row=a.plain_row)
    t0 = time.perf_counter()
    ids, nbytes, first = [], 0, None
    for batch in loader:
        if first is None:
            first = time.perf_counter() - t0
        ids += ids_of(batch)
        nbytes += bytes_of(batch)
    out.update(elapsed=time.perf_counter() - t0, first=first, ids=ids, bytes=nbytes)
    # mid-epoch resume: half an epoch, state_dict(), a new loader from it, its first batch
    if not a.plain_row and (a.peer.startswith("horovod_iter")
                            or a.peer in ("mosaicml-streaming", "litdata")):
        try:
            loader, ids_of, _ = make_loader(a.peer, root, a.workers)
            it = iter(loader)
            for _ in range(max(1, len(ids) // BATCH // 2)):
                next(it)
            t2 = time.perf_counter()
            state = loader.state_dict()
            out["state"] = time.perf_counter() - t2
            del it
            loader2, _, _ = make_loader(a.peer, root, a.workers, state=state)
            t1 = time.perf_counter()
            next(iter(loader2))
            out["resume"] = time.perf_counter() - t1
        except Exception as e:  # a peer whose resume does not work here: say so
            out["resume_error"] = f"{type(e).__name__}: {e}"[:200]
    dist.barrier()
    Path(a.out, f"rank{rank}.json").write_text(json.dumps(out))


# -- the driver ----------------------------------------------------------------------------
def peers() -> list[str]:
    found = ["horovod_iter", "horovod_iter-canonical"]
    for name, module in (("webdataset", "webdataset"), ("mosaicml-streaming", "streaming"),
                         ("litdata", "litdata")):
        try:
            __import__(module)
            found.append(name)
        except ImportError:
            pass
    return found


def run(peer: str, data: Path, ranks: int, workers: int, timeout: float = 180,
        plain_row: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               "--master_port", str(29500 + os.getpid() % 1000), __file__, "--role", "rank",
               "--peer", peer, "--data", str(data), "--workers", str(workers),
               "--out", out] + ["--plain-row"] * plain_row
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                               start_new_session=True)
        except subprocess.TimeoutExpired as e:
            subprocess.run(["pkill", "-9", "-f", out])  # its ranks and their workers
            return {"error": f"no result within {timeout:.0f} s (hung): "
                             f"{(e.stderr or b'')[-300:]!r}"}
        res = [json.loads(f.read_text()) for f in sorted(Path(out).glob("rank*.json"))]
        if p.returncode or len(res) != ranks:
            return {"error": (p.stderr or p.stdout)[-400:]}
    ids = [i for r in res for i in r["ids"]]
    elapsed = max(r["elapsed"] for r in res)
    per_rank = len(ids) / ranks / elapsed
    resume = [r.get("resume") for r in res]
    states = [r["state"] for r in res if "state" in r]
    return {"state": max(states) if len(states) == ranks else None, "rec_s": per_rank,
            "mb_s": sum(r["bytes"] for r in res) / ranks / elapsed / 1e6,
            "first": max(r["first"] or 0 for r in res),
            "resume": max(resume) if all(x is not None for x in resume) else None,
            "resume_error": next((r["resume_error"] for r in res if "resume_error" in r), None),
            "ids": ids}


def once(ids: list[int], n: int) -> str:
    from collections import Counter

    c = Counter(ids)
    missing = sum(1 for i in range(n) if i not in c)
    twice = sum(v - 1 for v in c.values() if v > 1)
    return "yes" if not missing and not twice and len(c) == n else f"-{missing}/+{twice}"


def plain_row(a: argparse.Namespace) -> None:
    """Ours (canonical ShardedDataset; MixedStream of two canonical halves) vs the loop a user
    writes by hand: each rank reads ``files[rank::world]`` (its workers split those) with the
    same reader, batched by torch's DataLoader with ``default_collate`` - no resume, no
    exactly-once. Same files, reader, batch size and collate for all three."""
    n = a.small if a.small != 100_000 else 200_000  # ~1 s of reading per rank
    rows: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "small"
        write_tar(data / "tar", n, 100)
        for rep in range(a.repeat):  # interleaved, the best of each: a shared machine's noise
            for workers in (0, 2):
                for peer in ("plain", "horovod_iter-canonical", "horovod_iter-mixed"):
                    r = run(peer, data, a.ranks, workers, plain_row=True)
                    best = rows.get((peer, workers))
                    if best is None or "error" in best or r.get("rec_s", 0) > best["rec_s"]:
                        rows[peer, workers] = r
                    print(f"  #{rep} w={workers} {peer}: " + (
                        r["error"][-300:] if "error" in r else f"{r['rec_s']:.0f} rec/s/rank"),
                        file=sys.stderr, flush=True)
    print(f"\n{a.ranks} ranks (torchrun, gloo), {SHARDS} shards, {n} records of 100 B, "
          f"batch {BATCH}/rank, default_collate, one epoch, best of {a.repeat} runs; ratio: "
          "ours / plain loop\n")
    print("| workers | plain rec/s/rank | canonical rec/s/rank | ratio | "
          "mixed rec/s/rank | ratio |")
    print("|---|---|---|---|---|---|")
    for workers in (0, 2):
        p, c, m = (rows[k, workers] for k in ("plain", "horovod_iter-canonical",
                                              "horovod_iter-mixed"))
        if "error" in p:
            print(f"| {workers} | error | | | | |")
            continue
        cells = [f"{p['rec_s']:.0f}"]
        for r in (c, m):
            cells += (["error", "-"] if "error" in r else
                      [f"{r['rec_s']:.0f}", f"{r['rec_s'] / p['rec_s']:.2f}x"])
        print(f"| {workers} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", default="driver")
    ap.add_argument("--peer")
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--small", type=int, default=100_000, help="records of ~100 B")
    ap.add_argument("--large", type=int, default=2_000, help="records of 100 KB")
    ap.add_argument("--only", nargs="*", help="peers to run (default: all installed)")
    ap.add_argument("--repeat", type=int, default=2, help="--plain-row: runs of each (best)")
    ap.add_argument("--plain-row", action="store_true",
                    help="only the row 'ours vs a plain per-rank loop' (small records)")
    a = ap.parse_args()
    _torchvision_or_stub()
    if a.role == "rank":
        rank_main(a)
        return
    if a.plain_row:
        plain_row(a)
        return
    names = a.only or peers()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for kind, n, size in (("small", a.small, 100), ("large", a.large, 100_000)):
            data = Path(tmp) / kind
            write_tar(data / "tar", n, size)
            have = {"horovod_iter": True, "horovod_iter-canonical": True, "webdataset": True,
                    "mosaicml-streaming": "mosaicml-streaming" in names
                    and write_mds(data / "mds", n, size),
                    "litdata": "litdata" in names and write_litdata(data / "litdata", n, size)}
            for workers in (0, 2):
                for peer in names:
                    if not have.get(peer):
                        continue
                    r = run(peer, data, a.ranks, workers)
                    r.update(kind=kind, workers=workers, peer=peer,
                             once=once(r.get("ids", []), n) if "error" not in r else "error")
                    rows.append(r)
                    print(f"  {kind} w={workers} {peer}: "
                          + (r["error"][-200:] if "error" in r else
                             f"{r['rec_s']:.0f} rec/s/rank, {r['mb_s']:.1f} MB/s/rank, first "
                             f"{r['first']:.3f} s, resume {r['resume']}, once {r['once']}"
                             + (f" ({r['resume_error']})" if r.get("resume_error") else "")),
                          file=sys.stderr, flush=True)
    print(f"\n{a.ranks} ranks (torchrun, gloo), {SHARDS} shards, batch {BATCH}, one shuffled "
          "epoch; ratio: ours / best peer (throughput: higher is better; latency: lower)\n")
    print("| records | workers | library | rec/s/rank | MB/s/rank | first batch (s) | "
          "after resume (s) | state_dict (ms) | exactly once |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['kind']} | {r['workers']} | {r['peer']} | error | | | | | |")
            continue
        resume = f"{r['resume']:.3f}" if r["resume"] is not None else "-"
        state = f"{r['state'] * 1e3:.1f}" if r.get("state") is not None else "-"
        print(f"| {r['kind']} | {r['workers']} | {r['peer']} | {r['rec_s']:.0f} | "
              f"{r['mb_s']:.1f} | {r['first']:.3f} | {resume} | {state} | {r['once']} |")
    print()
    for kind in ("small", "large"):
        for workers in (0, 2):
            group = [r for r in rows if r["kind"] == kind and r["workers"] == workers
                     and "error" not in r]
            ours = next((r for r in group if r["peer"] == "horovod_iter"), None)
            others = [r for r in group if not r["peer"].startswith("horovod_iter")]
            if ours is None or not others:
                continue
            exact = [r for r in others if r["once"] == "yes"]
            if exact and len(exact) < len(others):
                best = max(r["rec_s"] for r in exact)
                print(f"{kind}, workers {workers}: throughput {ours['rec_s'] / best:.2f}x the "
                      "best peer that reads every record exactly once")
            best_rate = max(r["rec_s"] for r in others)
            best_first = min(r["first"] for r in others)
            resumes = [r["resume"] for r in others if r["resume"] is not None]
            line = (f"{kind}, workers {workers}: throughput {ours['rec_s'] / best_rate:.2f}x "
                    f"the best peer, first batch {ours['first'] / best_first:.2f}x its time")
            if resumes and ours["resume"] is not None:
                line += f", resume {ours['resume'] / min(resumes):.2f}x its time"
            print(line)


if __name__ == "__main__":
    main()
