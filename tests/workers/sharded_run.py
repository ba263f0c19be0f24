"""A ShardedDataset of JSONL shards through the loader on every rank.

argv[1]: JSON config: dir (shards written there by the test), batch_size (or
global_batch_size), workers, uneven, canonical ([ranks, workers]: the canonical layout),
epochs (list of epochs to run), stop_after (steps, then save the state to state_out on every
rank: a collective), state_in (load before iterating), raise_shard (a shard index whose read
raises), stateful_stream (use a custom stateful IterableDataset instead: n samples per rank).
urls (shard URLs instead of dir; with endpoint, cache_dir, cache_limit: an S3-compatible
server and our cache; reports the most bytes the cache held after any batch).
Reports the ids of every batch, per epoch, and the warnings raised.
"""
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from harness import report
from torch.utils.data import IterableDataset

import horovod_iter as hi

cfg = json.loads(sys.argv[1])
b = hi.init()
out = {"rank": b.rank, "size": b.size, "epochs": {}, "error": None, "generated": 0}


def read(path):
    if cfg.get("raise_shard") is not None and path.endswith(f"/s{cfg['raise_shard']:03d}.jsonl"):
        raise OSError("disk read error")
    with open(path) as f:
        for line in f:
            yield json.loads(line)["id"]


class Counting(IterableDataset):
    """A stateful stream (torchdata's protocol), split over DataLoader workers; every sample it
    generates is counted in a file (workers are other processes)."""

    def __init__(self, n, gen_file):
        self.n, self.start = n, 0
        self.pos = 0
        self.gen_file = gen_file

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        first = self.start if self.start else worker
        for i in range(first, self.n, workers):
            self.pos = i + workers
            with open(self.gen_file, "a") as f:
                f.write("1")
            yield b.rank * 1_000_000 + i

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.start = self.pos = state["pos"]


def cache_bytes(folder):
    """Bytes of the shards in the cache now (ones evicted while we look are gone)."""
    total = 0
    for e in os.scandir(folder):
        if not e.name.startswith("."):
            try:
                total += e.stat().st_size
            except FileNotFoundError:
                pass
    return total


def collate(samples):
    return torch.tensor(samples)


warnings.simplefilter("always")
caught = warnings.catch_warnings(record=True)
seen_warnings = caught.__enter__()
try:
    if cfg.get("stateful_stream"):
        ds = Counting(cfg["stateful_stream"], f"{cfg['gen_dir']}/gen-{b.rank}")
    elif cfg.get("urls"):
        canonical = cfg.get("canonical") or [None, 1]
        ds = hi.ShardedDataset(cfg["urls"], read, seed=3, cache_dir=cfg["cache_dir"],
                               cache_limit=cfg["cache_limit"], storage_options={
                                   "client_kwargs": {"endpoint_url": cfg["endpoint"]}},
                               sizes=cfg.get("sizes"), canonical_ranks=canonical[0],
                               canonical_workers=canonical[1])
    else:
        shards = sorted(str(p) for p in Path(cfg["dir"]).glob("s*.jsonl"))
        if cfg.get("reversed_on_rank") == b.rank:  # e.g. an unsorted directory listing
            shards.reverse()
        sizes = ([sum(1 for _ in open(p)) for p in shards] if cfg.get("with_sizes")
                 else None)
        canonical = cfg.get("canonical") or [None, 1]
        if canonical[0] is not None:
            sizes = [sum(1 for _ in open(p)) for p in shards]
        ds = hi.ShardedDataset(shards, read, seed=3, shuffle_buffer=cfg.get("buffer", 0),
                               sizes=sizes, canonical_ranks=canonical[0],
                               canonical_workers=canonical[1],
                               interleave=cfg.get("interleave", 64))
    size = ({"global_batch_size": cfg["global_batch_size"]} if cfg.get("global_batch_size")
            else {"batch_size": cfg["batch_size"]})
    loader = hi.DistributedLoader(ds, **size, uneven=cfg.get("uneven", "pad"),
                                  num_workers=cfg.get("workers", 0), collate_fn=collate,
                                  timeout=60)
    if cfg.get("state_in"):
        loader.load_state_dict(json.loads(Path(cfg["state_in"]).read_text()))
    for epoch in cfg.get("epochs", [0]):
        loader.set_epoch(epoch)
        if cfg.get("with_sizes"):
            out.setdefault("len", {})[str(epoch)] = len(loader)
        got = []
        for step, batch in enumerate(loader):
            got.append(batch.tolist())
            if cfg.get("urls"):
                out["cache_max"] = max(out.get("cache_max", 0), cache_bytes(cfg["cache_dir"]))
            if cfg.get("stop_after") is not None and step + 1 == cfg["stop_after"]:
                if cfg.get("state_on_rank0_only") and b.rank != 0:
                    continue  # the mistake under test: only rank 0 asks for the state
                if cfg.get("rank0_saves") and b.rank != 0:
                    break  # a canonical layout's state is a count: rank 0 alone may ask
                state = loader.state_dict()  # every rank: it gathers the consumers' positions
                if b.rank == 0:
                    Path(cfg["state_out"]).write_text(json.dumps(state))
                break
        out["epochs"][str(epoch)] = got
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
out["warnings"] = [str(w.message) for w in seen_warnings
                   if issubclass(w.category, RuntimeWarning)]
if cfg.get("gen_dir"):
    gen = Path(f"{cfg['gen_dir']}/gen-{b.rank}")
    out["generated"] = len(gen.read_text()) if gen.exists() else 0
report(out)
sys.stdout.flush()
os._exit(0)
