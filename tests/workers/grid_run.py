"""Run the grid of loader configurations on every rank; report each pass's batches and len.

argv[1]: JSON {"grid": [[n, batch, drop_last, shuffle], ...], "workers": int, "passes": int}.
Each configuration is iterated ``passes`` times without ``set_epoch`` (as validation loaders
are), the second time after a peek and a ``break``, as ordinary torch loops do.
"""
import json
import os
import sys

from harness import report
from toy_data import Ids

import horovod_iter as hi

cfg = json.loads(sys.argv[1])
b = hi.init()
out = {"rank": b.rank, "size": b.size, "runs": []}
for n, batch, drop_last, shuffle in cfg["grid"]:
    loader = hi.DistributedLoader(Ids(n), batch_size=batch, drop_last=drop_last,
                                  shuffle=shuffle, seed=7, num_workers=cfg["workers"])
    passes = []
    for p in range(cfg["passes"]):
        if p == 1:
            next(iter(loader), None)  # peek
            for i, _ in enumerate(loader):  # break early
                if i == 0:
                    break
        lens = []
        batches = []
        for x in loader:
            lens.append(len(loader))
            batches.append(x.tolist())
        passes.append({"batches": batches, "lens": lens, "len": len(loader)})
    out["runs"].append(passes)
report(out)
sys.stdout.flush()
os._exit(0)
