"""torchrun, issue 21 H1: the backend's first use happens on rank 0 alone, after the trainer's
``init_process_group`` (``hi.init()`` in a rank-0 hook, ``len()`` of a DataLoader
holding our sampler), while rank 1 goes on to the trainer's own collective. Resolving the
world must not be a collective: the job must finish, not wait for the group timeout."""
import os
import sys

import torch
import torch.distributed as dist
from harness import report
from torch.utils.data import DataLoader, TensorDataset

import horovod_iter as hi

ds = TensorDataset(torch.arange(12))
sampler = hi.DistributedSampler(ds, shuffle=False)  # built before torch.distributed is up
plain = DataLoader(ds, sampler=sampler, batch_size=2)
dist.init_process_group("gloo")
rank = dist.get_rank()
facts = None
if rank == 0:  # a rank-0-only hook (a logger, a progress bar)
    b = hi.init()
    facts = [b.name, b.rank, b.size, b.local_rank, b.local_size, len(plain)]
t = torch.tensor([rank + 1])
dist.all_reduce(t)  # the trainer's step: rank 1 waits here for rank 0
loader = hi.DistributedLoader(ds, batch_size=2, shuffle=False)
seen = [x.tolist() for (x,) in loader]
report({"rank": rank, "facts": facts, "sum": int(t), "batches": seen, "len": len(plain)})
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
