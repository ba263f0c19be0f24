"""One rank of a fault-injection run (launched by scripts/faults.py; see its docstring).

argv[1] is a JSON config: fault, frank (the faulty rank), fstep (the step of the fault),
data (list, tensor, custom, iterable, sharded), uneven, workers, timeout, n, epochs, out (the
run's folder: reports, the fault's time, the shards), isolate (the other ranks ignore the
launcher's SIGTERM, as ranks on other hosts would not get it: they must end by themselves),
step_s (the trainer's compute per step, default 2 ms).

Across hosts (scripts/hosts.py), ``fhost`` names the faulty host instead of ``frank``: its
first local rank is the faulty one. The host faults (host_kill, host_stop, host_partition) are
done to the whole host by scripts/faults.py: at ``fstep`` that rank asks for it (the file
``fault_request``) and waits until it is done (``fault.json``, written by faults.py).

Each rank writes ``out/rank<r>.json`` (the ids it trained on per epoch, its error's type and
time) and then ends as a real trainer would: an uncaught error propagates, so the exit path
(the library's teardown) is the one users get.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import horovod_iter as hi

cfg = json.loads(sys.argv[1])
OUT = Path(cfg["out"])
ARMED = OUT / "armed"  # the dataset faults fire once this file exists (seen by workers too)
backend = hi.init()
rank, world = backend.rank, backend.size
HOST = socket.gethostname()
if cfg.get("fhost"):  # across hosts: the faulty host's first local rank
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("HOROVOD_LOCAL_RANK", "0")))
    on_faulty_host = HOST == cfg["fhost"]
    faulty = on_faulty_host and local == 0
else:
    faulty = on_faulty_host = rank == cfg["frank"]
fault = cfg["fault"]
HOST_FAULTS = ("host_kill", "host_stop", "host_partition")
# the ranks the fault hits: the faulty host's under a host fault, else the faulty rank
hit = on_faulty_host if fault in HOST_FAULTS else faulty
if cfg.get("isolate") and not hit:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def dataset_fault() -> None:
    """Inside the dataset (main process or a DataLoader worker) of the faulty rank."""
    if faulty and ARMED.exists():
        fired = OUT / "fault.json"
        if not fired.exists():  # the fault's time is when it fires, not when it was armed
            # the first process to fire writes it (DataLoader workers fire at once): a
            # private file, linked into place only if none is there yet
            tmp = OUT / f".fault.{os.getpid()}.json"
            tmp.write_text(json.dumps({"t": time.time(), "rank": rank, "in_dataset": True}))
            try:
                os.link(tmp, fired)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        if fault == "dataset_raise":
            raise KeyError("injected: corrupt record")
        if fault == "dataset_stall":
            time.sleep(3600)


class Custom(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        dataset_fault()
        return {"id": torch.tensor(i), "x": torch.full((2,), float(i))}


class Listing(list):
    """A plain list (map-style by __getitem__/__len__) whose reads can fail."""

    def __getitem__(self, i):  # type: ignore[override]
        dataset_fault()
        return super().__getitem__(i)


class Tensors(TensorDataset):
    def __getitem__(self, i):
        dataset_fault()
        return super().__getitem__(i)

    def __getitems__(self, indices):
        dataset_fault()
        return [super(Tensors, self).__getitem__(i) for i in indices]


class PerRank(IterableDataset):
    """Rank r yields its own ids, a few more on higher ranks (uneven on purpose)."""

    def __init__(self, n: int) -> None:
        self.lengths = [n // world + 3 * r for r in range(world)]

    def __iter__(self):
        first = sum(self.lengths[:rank])
        for i in hi.split_stream(range(first, first + self.lengths[rank]), rank=0, num_replicas=1):
            dataset_fault()
            yield {"id": torch.tensor(i), "x": torch.full((2,), float(i))}


def read_shard(path: str):
    with open(path) as f:
        for line in f:
            dataset_fault()
            yield json.loads(line)["id"]


def make_dataset():
    n, kind = cfg["n"], cfg["data"]
    if kind == "list":
        return Listing(range(n))
    if kind == "tensor":
        return Tensors(torch.arange(n))
    if kind == "custom":
        return Custom(n)
    if kind == "iterable":
        return PerRank(n)
    if kind == "sharded":
        shards = sorted(str(p) for p in (OUT / "shards").glob("*.jsonl"))
        return hi.ShardedDataset(shards, read_shard, seed=1)
    raise ValueError(f"unknown data kind {kind!r}")


def ids_of(batch) -> list[int]:
    if isinstance(batch, dict):
        return batch["id"].tolist()
    if isinstance(batch, (list, tuple)):
        return batch[0].tolist()
    return batch.tolist()


def inject(step: int) -> str | None:
    """Apply the fault on the faulty rank; returns 'leave'/'skip' for the loop to act on."""
    if fault in ("dataset_raise", "dataset_stall"):
        ARMED.write_text("1")
        return None
    if fault in HOST_FAULTS:  # done by faults.py to the whole host; wait until it is done
        (OUT / "fault_request").write_text(json.dumps({"rank": rank, "step": step}))
        deadline = time.time() + 30
        while not (OUT / "fault.json").exists() and time.time() < deadline:
            time.sleep(0.01)
        return None
    (OUT / "fault.json").write_text(json.dumps({"t": time.time(), "rank": rank, "step": step,
                                                "pid": os.getpid()}))
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif fault == "sleep":
        time.sleep(3600)
    elif fault == "raise":
        raise RuntimeError(f"injected: the trainer's code raised on rank {rank}")
    elif fault == "sigint":
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the KeyboardInterrupt arrives here
    elif fault == "worker_kill":
        children = multiprocessing.active_children()
        if children:
            os.kill(children[0].pid, signal.SIGKILL)
    elif fault == "leave":
        return "leave"
    elif fault == "skip_epoch":
        return "skip"
    return None


def report(**fields) -> None:
    tmp = OUT / f".rank{rank}.tmp"
    tmp.write_text(json.dumps({"rank": rank, "world": world, "backend": backend.name,
                               "host": HOST, **fields}))
    tmp.rename(OUT / f"rank{rank}.json")


def isolate_worker(worker_id: int) -> None:
    """The survivors' DataLoader workers ignore the launcher's SIGTERM too (on another host
    they would not get it; here it would end them before their rank noticed the fault)."""
    if cfg.get("isolate") and not hit:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def main() -> int:
    kwargs = dict(batch_size=4, uneven=cfg["uneven"], num_workers=cfg["workers"],
                  timeout=cfg["timeout"], worker_init_fn=isolate_worker)
    loader = hi.DistributedLoader(make_dataset(), **kwargs)
    seen: dict[str, list[int]] = {}
    step = 0
    try:
        epoch = 0
        while epoch < cfg["epochs"]:
            loader.set_epoch(epoch)
            seen[str(epoch)] = ids = []
            action = None
            for batch in loader:
                ids.extend(ids_of(batch))
                if faulty and step == cfg["fstep"]:
                    action = inject(step)
                    if action:
                        break
                step += 1
                time.sleep(cfg.get("step_s", 0.002))  # the trainer's compute
            if action == "leave":  # this rank is done: it exits normally
                report(error=None, ours=None, t_end=time.time(), seen=seen, left=True)
                return 0
            epoch += 1
    except BaseException as e:
        report(error=type(e).__name__, ours=isinstance(e, hi.HorovodIterError),
               message=str(e)[:2000], t_error=time.time(), seen=seen)
        raise
    report(error=None, ours=None, t_end=time.time(), seen=seen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
