"""Each rank reports its indices for a few epochs, with no communication in between."""
import sys

from harness import report

import horovod_iter as hi

n, seed_arg = int(sys.argv[1]), sys.argv[2]
seed = None if seed_arg == "none" else int(seed_arg)
s = hi.DistributedSampler(n, seed=seed, pad=False)
out = {"rank": s.rank, "world": s.num_replicas, "seed": s.seed, "epochs": []}
for epoch in range(3):
    s.set_epoch(epoch)
    out["epochs"].append(list(s))
report(out)
