"""Configurable loader run: argv[1] is a JSON config; reports the batches this rank saw.

Config keys: data ("map" or "iter"), n (map), lengths (iter: per-rank sample counts), batch_size,
global_batch_size, uneven, prefetch, workers, shuffle, seed, epoch, stop_after (steps, then
save state to state_out), state_in (load before iterating), stall (rank, step, seconds),
timeout, batch_size_by_rank (override per rank), mode ("next", "get_next", "optional"),
kill (rank, step: that rank SIGKILLs itself there; the others ignore the launcher's SIGTERM so
that they show their own error), epochs (iterate this many epochs, reporting all batches).
"""
import json
import os
import signal
import sys
import time

import torch
from harness import report
from torch.utils.data import Dataset, IterableDataset

import horovod_iter as hi

cfg = json.loads(sys.argv[1])
b = hi.init()
rank = b.rank
kill = cfg.get("kill")
if kill and kill[0] != rank:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Ids(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"id": torch.tensor(i), "x": torch.full((3,), float(i))}


class PerRank(IterableDataset):
    """Rank r yields lengths[r] globally unique ids (uneven on purpose)."""

    def __init__(self, lengths):
        self.lengths = lengths

    def __iter__(self):
        first = sum(self.lengths[:rank])
        for i in range(first, first + self.lengths[rank]):
            yield {"id": torch.tensor(i), "x": torch.full((3,), float(i))}


ds = Ids(cfg["n"]) if cfg.get("data", "map") == "map" else PerRank(cfg["lengths"])
stall = cfg.get("stall")
bs = cfg.get("batch_size_by_rank", {}).get(str(rank), cfg.get("batch_size"))
kwargs = dict(uneven=cfg.get("uneven", "stop"), prefetch=cfg.get("prefetch", 2),
              num_workers=cfg.get("workers", 0), timeout=cfg.get("timeout", 60))
if cfg.get("global_batch_size"):
    kwargs["global_batch_size"] = cfg["global_batch_size"]
else:
    kwargs["batch_size"] = bs
if cfg.get("data", "map") == "map":
    kwargs.update(shuffle=cfg.get("shuffle", True), seed=cfg.get("seed", 0))
out = {"rank": rank, "size": b.size, "local_size": b.local_size, "backend": b.name,
       "batches": [], "error": None}
try:
    loader = hi.DistributedLoader(ds, **kwargs)
    if cfg.get("state_in"):
        with open(cfg["state_in"]) as f:
            loader.load_state_dict(json.load(f))
    loader.set_epoch(cfg.get("epoch", 0))
    try:
        out["len"] = len(loader)
    except TypeError:
        out["len"] = None
    it = iter(loader)
    step = 0
    while True:
        if stall and stall[0] == rank and stall[1] == step:
            time.sleep(stall[2])
        if kill and kill[0] == rank and kill[1] == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if cfg.get("stop_after") is not None and step == cfg["stop_after"]:
            with open(cfg["state_out"] + f".{rank}", "w") as f:
                json.dump(loader.state_dict(), f)
            it.close()
            break
        mode = cfg.get("mode", "next")
        if mode == "get_next":
            try:
                batch = it.get_next()
            except hi.OutOfRangeError:
                break
        elif mode == "optional":
            batch = it.get_next_as_optional()
            if batch is None:
                break
        else:
            try:
                batch = next(it)
            except StopIteration:
                break
        assert batch["x"].shape[1:] == (3,) and batch["x"].shape[0] == batch["id"].shape[0]
        assert torch.equal(batch["x"][:, 0], batch["id"].float())
        out["batches"].append(batch["id"].tolist())
        step += 1
    out["stats"] = loader.stats()
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
    out["timeout_error"] = isinstance(e, hi.DataTimeoutError)
    out["rank_failure"] = isinstance(e, hi.RankFailureError)
out["t_end"] = time.time()
report(out)
sys.stdout.flush()
os._exit(0)  # after a failure collectives may be pending: leave without shutdown handshakes
