"""A MixedDataset of three sources through the loader on every rank. argv[1]: JSON config:
epochs, global_batch_size, stop_after (steps of the first epoch, then save the state to
state_out), state_in. Reports each epoch's samples ("source:index") and the loader's stats.
stream_dir: mix two streaming sources instead (ShardedDatasets of the JSONL shards the test
wrote in its "big" and "small" folders, canonical layout 4 x 4; workers=); rank 0 alone saves."""
import json
import os
import sys
from pathlib import Path

from harness import report
from toy_data import Named

import horovod_iter as hi

cfg = json.loads(sys.argv[1])
b = hi.init()


def read(path, start=0):
    with open(path) as f:
        for i, line in enumerate(f):
            if i >= start:
                yield json.loads(line)["id"]


if cfg.get("stream_dir"):
    def source(name, seed):
        shards = sorted(str(p) for p in Path(cfg["stream_dir"], name).glob("*.jsonl"))
        sizes = [sum(1 for _ in open(p)) for p in shards]
        return hi.ShardedDataset(shards, read, sizes=sizes, seed=seed, interleave=3,
                                 canonical_ranks=4, canonical_workers=4)

    mix = hi.MixedStream({"big": source("big", 0), "small": source("small", 1)},
                         weights=[0.75, 0.25], samples_per_epoch=240)
else:
    mix = hi.MixedDataset({"web": Named("web", 50), "code": Named("code", 13),
                           "books": Named("books", 200)}, weights=[0.5, 0.3, 0.2],
                          samples_per_epoch=90, seed=11)
loader = hi.DistributedLoader(mix, global_batch_size=cfg["global_batch_size"], uneven="pad",
                              collate_fn=list, timeout=60, num_workers=cfg.get("workers", 0))
out = {"rank": b.rank, "epochs": {}, "stats": {}}
if cfg.get("state_in"):
    loader.load_state_dict(json.loads(Path(cfg["state_in"]).read_text()))
for epoch in cfg["epochs"]:
    loader.set_epoch(epoch)
    got = []
    batches = out.setdefault("batches", {}).setdefault(str(epoch), [])
    for step, batch in enumerate(loader):
        got += batch
        batches.append(batch)
        if cfg.get("stop_after") is not None and step + 1 == cfg["stop_after"]:
            if b.rank == 0 or not cfg.get("stream_dir"):  # a stream's state is a count
                state = loader.state_dict()
            if b.rank == 0:
                Path(cfg["state_out"]).write_text(json.dumps(state))
            break
    out["epochs"][str(epoch)] = got
    out["stats"][str(epoch)] = loader.stats().get("source_counts")
report(out)
sys.stdout.flush()
os._exit(0)
