"""Configurable loader run: argv[1] is a JSON config; reports the batches this rank saw.

Config keys: data ("map" or "iter"), n (map), lengths (iter: per-rank sample counts), batch_size,
global_batch_size, uneven, prefetch, workers, shuffle, seed, epoch, stop_after (steps, then
save state to state_out), state_in (load before iterating), stall (rank, step, seconds),
timeout, batch_size_by_rank (override per rank), mode ("next", "get_next", "optional"),
kill (rank, step: that rank SIGKILLs itself there; the others ignore the launcher's SIGTERM so
that they show their own error), peek_rank (that rank alone peeks a batch first), raise_at
(rank, index: the iterable raises KeyError there), scalar_leaf (batches carry a 0-dim
"ntok" tensor), device_transform ("double": x doubled by a device transform), getitem_stall
(rank, call, seconds: that rank's dataset sleeps in its call-th __getitem__), step_sleep
(seconds of "compute" after each step), even (even_batches=True with hi.flag_padding(): the
batches' ids are the real rows, "rows" their sizes).
"""
import json
import os
import signal
import sys
import time

import torch
from harness import report
from torch.utils.data import Dataset, IterableDataset
from toy_data import record, take

import horovod_iter as hi

cfg = json.loads(sys.argv[1])
b = hi.init()
rank = b.rank
kill = cfg.get("kill")
if kill and kill[0] != rank:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Ids(Dataset):
    def __init__(self, n, getitem_stall=None):
        self.n = n
        self.calls = 0
        self.getitem_stall = getitem_stall

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.calls += 1
        gs = self.getitem_stall
        if gs and gs[0] == rank and gs[1] == self.calls:
            out["t_stall"] = time.time()
            time.sleep(gs[2])
        return {"id": torch.tensor(i), "x": torch.full((3,), float(i))}


class PerRank(IterableDataset):
    """Rank r yields lengths[r] globally unique ids (uneven on purpose), split over workers."""

    def __init__(self, lengths, raise_at=None):
        self.lengths = lengths
        self.raise_at = raise_at

    def __iter__(self):
        first = sum(self.lengths[:rank])
        ids = range(first, first + self.lengths[rank])
        for i in hi.split_stream(ids, rank=0, num_replicas=1):
            if self.raise_at and self.raise_at[0] == rank and self.raise_at[1] == i - first:
                raise KeyError(f"corrupt record {i}")
            yield {"id": torch.tensor(i), "x": torch.full((3,), float(i))}


def with_ntok(samples):
    batch = torch.utils.data.default_collate(samples)
    batch["ntok"] = torch.tensor(len(samples))  # a 0-dim leaf: a token count
    return batch


def double(batch):
    return {**batch, "x": batch["x"] * 2}


out = {}
ds = Ids(cfg["n"], cfg.get("getitem_stall")) if cfg.get("data", "map") == "map" else PerRank(
    cfg["lengths"], cfg.get("raise_at"))
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
if cfg.get("scalar_leaf"):
    kwargs["collate_fn"] = with_ntok
if cfg.get("even"):
    kwargs.update(even_batches=True, mark_padding=hi.flag_padding())
if cfg.get("device_transform") == "double":
    kwargs["device_transform"] = double
out.update({"rank": rank, "size": b.size, "local_size": b.local_size, "backend": b.name,
            "batches": [], "error": None})
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
    if cfg.get("peek_rank") == rank:
        next(iter(loader))
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
        batch = take(it, cfg.get("mode", "next"))
        if batch is None:
            break
        record(batch, cfg, out)
        step += 1
        if cfg.get("step_sleep"):
            time.sleep(cfg["step_sleep"])
    out["stats"] = loader.stats()
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
    out["timeout_error"] = isinstance(e, hi.DataTimeoutError)
    out["mismatch_error"] = isinstance(e, hi.ConfigMismatchError)
    out["rank_failure"] = isinstance(e, hi.RankFailureError)
out["t_end"] = time.time()
report(out)
sys.stdout.flush()
os._exit(0)  # after a failure collectives may be pending: leave without shutdown handshakes
