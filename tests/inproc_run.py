"""In-process twins of the launched workers (tests/workers/*_run.py): the same configuration
keys and the same report, run as one rank of a thread world (tests/thread_world.py).

Each ``*_run(b, cfg)`` is what the worker script does on one rank, with the backend ``b``
injected instead of ``hi.init()``, and with these changes: ``stall`` makes the rank stop
participating (``b.stall()``) and ``kill`` makes it die (``b.die()``) instead of sleeping or
SIGKILL; a state is passed in memory (``state_in``: a dict; ``stop_after`` reports
``out["state"]``, JSON round-tripped) instead of through files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from thread_world import ThreadBackend, worker_context
from torch.utils.data import Dataset, IterableDataset
from toy_data import Named, record, take

import horovod_iter as hi

# -- loader_run.py ------------------------------------------------------------------------------


class Ids(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"id": torch.tensor(i), "x": torch.full((3,), float(i))}


class PerRank(IterableDataset):
    """Rank r yields lengths[r] globally unique ids (uneven on purpose), split over workers."""

    def __init__(self, lengths: list[int], rank: int, raise_at: Any = None) -> None:
        self.lengths, self.rank, self.raise_at = lengths, rank, raise_at

    def __iter__(self) -> Any:
        first = sum(self.lengths[:self.rank])
        ids = range(first, first + self.lengths[self.rank])
        for i in hi.split_stream(ids, rank=0, num_replicas=1):
            if self.raise_at and self.raise_at[0] == self.rank and \
                    self.raise_at[1] == i - first:
                raise KeyError(f"corrupt record {i}")
            yield {"id": torch.tensor(i), "x": torch.full((3,), float(i))}


def with_ntok(samples: list[Any]) -> Any:
    batch = torch.utils.data.default_collate(samples)
    batch["ntok"] = torch.tensor(len(samples))  # a 0-dim leaf: a token count
    return batch


def double(batch: Any) -> Any:
    return {**batch, "x": batch["x"] * 2}


def loader_kwargs(b: ThreadBackend, cfg: dict[str, Any]) -> dict[str, Any]:
    bs = cfg.get("batch_size_by_rank", {}).get(str(b.rank), cfg.get("batch_size"))
    kwargs: dict[str, Any] = dict(
        uneven=cfg.get("uneven", "stop"), prefetch=cfg.get("prefetch", 2),
        num_workers=cfg.get("workers", 0), timeout=cfg.get("timeout", 60), backend=b,
        multiprocessing_context=worker_context() if cfg.get("workers") else None)
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
    return kwargs


def loader_run(b: ThreadBackend, cfg: dict[str, Any]) -> dict[str, Any]:
    """tests/workers/loader_run.py on rank ``b.rank`` (see its docstring for the keys)."""
    rank = b.rank
    ds: Any = Ids(cfg["n"]) if cfg.get("data", "map") == "map" else PerRank(
        cfg["lengths"], rank, cfg.get("raise_at"))
    stall, kill = cfg.get("stall"), cfg.get("kill")
    out: dict[str, Any] = {"rank": rank, "size": b.size, "batches": [], "error": None}
    try:
        loader = hi.DistributedLoader(ds, **loader_kwargs(b, cfg))
        if cfg.get("state_in"):
            loader.load_state_dict(cfg["state_in"])
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
                b.stall()
            if kill and kill[0] == rank and kill[1] == step:
                b.die()
            if cfg.get("stop_after") is not None and step == cfg["stop_after"]:
                out["state"] = json.loads(json.dumps(loader.state_dict()))
                it.close()
                break
            batch = take(it, cfg.get("mode", "next"))
            if batch is None:
                break
            record(batch, cfg, out)
            step += 1
        out["stats"] = loader.stats()
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["timeout_error"] = isinstance(e, hi.DataTimeoutError)
        out["mismatch_error"] = isinstance(e, hi.ConfigMismatchError)
        out["rank_failure"] = isinstance(e, hi.RankFailureError)
    return out


# -- sharded_run.py -----------------------------------------------------------------------------


def write_shards(d: Path, sizes: list[int]) -> int:
    """JSONL shards ``s000.jsonl``... of consecutive ids; returns the record count."""
    k = 0
    for i, n in enumerate(sizes):
        with open(d / f"s{i:03d}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"id": k}) + "\n")
                k += 1
    return k


class _Reader:
    """The shard reader (picklable for DataLoader workers); ``raise_shard`` fails one."""

    def __init__(self, raise_shard: int | None = None) -> None:
        self.raise_shard = raise_shard

    def __call__(self, path: str, start: int = 0) -> Any:
        if self.raise_shard is not None and path.endswith(f"/s{self.raise_shard:03d}.jsonl"):
            raise OSError("disk read error")
        with open(path) as f:
            for i, line in enumerate(f):
                if i >= start:
                    yield json.loads(line)["id"]


class Counting(IterableDataset):
    """A stateful stream (torchdata's protocol) of rank-tagged ids, split over workers;
    every sample it generates is counted in a file (workers are other processes)."""

    def __init__(self, n: int, rank: int, gen_file: str) -> None:
        self.n, self.rank, self.gen_file = n, rank, gen_file
        self.start = self.pos = 0

    def __iter__(self) -> Any:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        first = self.start if self.start else worker
        for i in range(first, self.n, workers):
            self.pos = i + workers
            with open(self.gen_file, "a") as f:
                f.write("1")
            yield self.rank * 1_000_000 + i

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = self.pos = state["pos"]


def sharded_dataset(b: ThreadBackend, cfg: dict[str, Any]) -> Any:
    shards = sorted(str(p) for p in Path(cfg["dir"]).glob("s*.jsonl"))
    if cfg.get("reversed_on_rank") == b.rank:  # e.g. an unsorted directory listing
        shards.reverse()
    canonical = cfg.get("canonical") or [None, 1]
    sizes = None
    if cfg.get("with_sizes") or canonical[0] is not None:
        sizes = [sum(1 for _ in open(p)) for p in shards]
    return hi.ShardedDataset(shards, _Reader(cfg.get("raise_shard")), seed=cfg.get("seed", 3),
                             shuffle_buffer=cfg.get("buffer", 0), sizes=sizes,
                             canonical_ranks=canonical[0], canonical_workers=canonical[1],
                             interleave=cfg.get("interleave", 64), rank=b.rank,
                             num_replicas=b.size)


def sharded_run(b: ThreadBackend, cfg: dict[str, Any]) -> dict[str, Any]:
    """tests/workers/sharded_run.py on rank ``b.rank`` (local shards; no warnings record:
    catch them with pytest.warns around the run)."""
    out: dict[str, Any] = {"rank": b.rank, "size": b.size, "epochs": {}, "error": None,
                           "generated": 0}
    try:
        if cfg.get("stateful_stream"):
            ds = Counting(cfg["stateful_stream"], b.rank, f"{cfg['gen_dir']}/gen-{b.rank}")
        else:
            ds = sharded_dataset(b, cfg)
        size = ({"global_batch_size": cfg["global_batch_size"]}
                if cfg.get("global_batch_size") else {"batch_size": cfg["batch_size"]})
        loader = hi.DistributedLoader(ds, **size, uneven=cfg.get("uneven", "pad"),
                                      num_workers=cfg.get("workers", 0), collate_fn=torch.tensor,
                                      timeout=cfg.get("timeout", 60), backend=b,
                                      multiprocessing_context=worker_context()
                                      if cfg.get("workers") else None)
        if cfg.get("state_in"):
            loader.load_state_dict(cfg["state_in"])
        for epoch in cfg.get("epochs", [0]):
            loader.set_epoch(epoch)
            if cfg.get("with_sizes"):
                out.setdefault("len", {})[str(epoch)] = len(loader)
            got = []
            for step, batch in enumerate(loader):
                got.append(batch.tolist())
                if cfg.get("stop_after") is not None and step + 1 == cfg["stop_after"]:
                    if cfg.get("state_on_rank0_only") and b.rank != 0:
                        continue  # the mistake under test: only rank 0 asks for the state
                    if cfg.get("rank0_saves") and b.rank != 0:
                        break  # a canonical layout's state is a count: rank 0 alone may ask
                    out["state"] = json.loads(json.dumps(loader.state_dict()))
                    break
            out["epochs"][str(epoch)] = got
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["exception"] = e
    if cfg.get("gen_dir"):
        gen = Path(f"{cfg['gen_dir']}/gen-{b.rank}")
        out["generated"] = len(gen.read_text()) if gen.exists() else 0
    return out


def ids(res: list[dict[str, Any]], epoch: int = 0) -> list[int]:
    """Every id the ranks of a `sharded_run` read in ``epoch``."""
    return [i for r in res for bt in r["epochs"][str(epoch)] for i in bt]


# -- mixed_run.py -------------------------------------------------------------------------------


def named_mix(b: ThreadBackend) -> hi.MixedDataset:
    return hi.MixedDataset({"web": Named("web", 50), "code": Named("code", 13),
                            "books": Named("books", 200)}, weights=[0.5, 0.3, 0.2],
                           samples_per_epoch=90, seed=11)


def mixed_run(b: ThreadBackend, cfg: dict[str, Any]) -> dict[str, Any]:
    """tests/workers/mixed_run.py (the map-style mix of three named sources) on ``b.rank``;
    ``weights_by_rank``/``seed_by_rank`` build the mix differently on one rank."""
    weights = cfg.get("weights_by_rank", {}).get(str(b.rank), [0.5, 0.3, 0.2])
    seed = cfg.get("seed_by_rank", {}).get(str(b.rank), 11)
    mix = hi.MixedDataset({"web": Named("web", 50), "code": Named("code", 13),
                           "books": Named("books", 200)}, weights=weights,
                          samples_per_epoch=90, seed=seed)
    out: dict[str, Any] = {"rank": b.rank, "epochs": {}, "stats": {}, "batches": {},
                           "error": None}
    try:
        loader = hi.DistributedLoader(mix, global_batch_size=cfg["global_batch_size"],
                                      uneven="pad", collate_fn=list, timeout=60,
                                      num_workers=cfg.get("workers", 0), backend=b,
                                      multiprocessing_context=worker_context()
                                      if cfg.get("workers") else None)
        if cfg.get("state_in"):
            loader.load_state_dict(cfg["state_in"])
        for epoch in cfg["epochs"]:
            loader.set_epoch(epoch)
            got: list[Any] = []
            batches = out["batches"].setdefault(str(epoch), [])
            for step, batch in enumerate(loader):
                got += batch
                batches.append(batch)
                if cfg.get("stop_after") is not None and step + 1 == cfg["stop_after"]:
                    out["state"] = json.loads(json.dumps(loader.state_dict()))
                    break
            out["epochs"][str(epoch)] = got
            out["stats"][str(epoch)] = loader.stats().get("source_counts")
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["exception"] = e
    return out


# -- grid_run.py --------------------------------------------------------------------------------


def grid_run(b: ThreadBackend, cfg: dict[str, Any]) -> dict[str, Any]:
    """tests/workers/grid_run.py on ``b.rank``: each configuration iterated ``passes`` times
    without set_epoch, the second time after a peek and a break."""
    from toy_data import Ids as PlainIds

    out: dict[str, Any] = {"rank": b.rank, "size": b.size, "runs": []}
    for n, batch, drop_last, shuffle in cfg["grid"]:
        loader = hi.DistributedLoader(PlainIds(n), batch_size=batch, drop_last=drop_last,
                                      shuffle=shuffle, seed=7, num_workers=cfg["workers"],
                                      backend=b, multiprocessing_context=worker_context()
                                      if cfg["workers"] else None)
        passes = []
        for p in range(cfg["passes"]):
            if p == 1:
                next(iter(loader), None)  # peek
                for i, _ in enumerate(loader):  # break early
                    if i == 0:
                        break
            lens, batches = [], []
            for x in loader:
                lens.append(len(loader))
                batches.append(x.tolist())
            passes.append({"batches": batches, "lens": lens, "len": len(loader)})
        out["runs"].append(passes)
    return out


def flat(batches: Any) -> list[int]:
    return [i for bt in batches for i in bt]


