"""Data formats users bring, through the loader on every rank; argv[1] is a JSON config:
kind ("wds": WebDataset tar shards written by the test through ShardedDataset and the
webdataset reader; "wds_shard": hi.split_stream over a splitting WebDataset pipeline; "hf": a
Hugging Face datasets.Dataset with_format("torch")), dir, n, batch_size, workers, epochs,
stop_after + state_out (save the state on every rank, rank 0 writes it), state_in. Reports the
ids per epoch."""
import json
import os
import sys
from pathlib import Path

from harness import report

import horovod_iter as hi
from horovod_iter.integrations.webdataset import reader

cfg = json.loads(sys.argv[1])
b = hi.init()
out = {"rank": b.rank, "epochs": {}, "error": None, "type": None}


def ids_of_wds(batch):
    return batch[0].tolist()


def as_ids(sample):
    return int(sample["id.txt"]), sample["x.pyd"]


try:
    kind = cfg["kind"]
    if kind in ("wds", "wds_shard"):
        import webdataset as wds

        urls = sorted(str(p) for p in Path(cfg["dir"]).glob("*.tar"))
        if kind == "wds_shard":
            pipeline = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node)
            hi.split_stream(pipeline)
        data = hi.ShardedDataset(urls, reader(lambda ds: ds.decode().map(as_ids)), seed=1)
        loader = hi.DistributedLoader(data, batch_size=cfg["batch_size"], uneven="pad",
                                      num_workers=cfg.get("workers", 0), timeout=60)
        ids_of = ids_of_wds
    else:
        import datasets

        n = cfg["n"]
        ds = datasets.Dataset.from_dict({"id": list(range(n)),
                                         "x": [[float(i)] * 3 for i in range(n)]})
        ds = ds.with_format("torch")
        loader = hi.DistributedLoader(ds, batch_size=cfg["batch_size"], uneven="pad",
                                      num_workers=cfg.get("workers", 0), timeout=60)

        def ids_of(batch):
            assert batch["x"].shape[1:] == (3,)
            return batch["id"].tolist()
    if cfg.get("state_in"):
        loader.load_state_dict(json.loads(Path(cfg["state_in"]).read_text()))
    for epoch in cfg.get("epochs", [0]):
        loader.set_epoch(epoch)
        got = out["epochs"][str(epoch)] = []
        for step, batch in enumerate(loader):
            got.extend(ids_of(batch))
            if cfg.get("stop_after") is not None and step + 1 == cfg["stop_after"]:
                state = loader.state_dict()
                if b.rank == 0:
                    Path(cfg["state_out"]).write_text(json.dumps(state))
                break
except Exception as e:
    out.update(error=f"{type(e).__name__}: {e}", type=type(e).__name__)
report(out)
sys.stdout.flush()
os._exit(0)
