"""A MixedDataset of three sources through the loader on every rank. argv[1]: JSON config:
epochs, global_batch_size, stop_after (steps of the first epoch, then save the state to
state_out), state_in. Reports each epoch's samples ("source:index") and the loader's stats."""
import json
import os
import sys
from pathlib import Path

from harness import report
from toy_data import Named

import horovod_iter as hi

cfg = json.loads(sys.argv[1])
b = hi.init()


mix = hi.MixedDataset({"web": Named("web", 50), "code": Named("code", 13),
                       "books": Named("books", 200)}, weights=[0.5, 0.3, 0.2],
                      samples_per_epoch=90, seed=11)
loader = hi.DistributedLoader(mix, global_batch_size=cfg["global_batch_size"], uneven="pad",
                              collate_fn=list, timeout=60)
out = {"rank": b.rank, "epochs": {}, "stats": {}}
if cfg.get("state_in"):
    loader.load_state_dict(json.loads(Path(cfg["state_in"]).read_text()))
for epoch in cfg["epochs"]:
    loader.set_epoch(epoch)
    got = []
    for step, batch in enumerate(loader):
        got += batch
        if cfg.get("stop_after") is not None and step + 1 == cfg["stop_after"]:
            state = loader.state_dict()
            if b.rank == 0:
                Path(cfg["state_out"]).write_text(json.dumps(state))
            break
    out["epochs"][str(epoch)] = got
    out["stats"][str(epoch)] = loader.stats().get("source_counts")
report(out)
sys.stdout.flush()
os._exit(0)
