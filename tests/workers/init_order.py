"""torchrun: build a loader (hi.init()) *before* the trainer's own init_process_group(), then
use both: the default group is the trainer's, ours is separate."""
import os
import sys

import torch
import torch.distributed as dist
from harness import report
from torch.utils.data import TensorDataset

import horovod_iter as hi

loader = hi.DistributedLoader(TensorDataset(torch.arange(10)), batch_size=2, shuffle=False)
dist.init_process_group("gloo")  # the trainer's, after ours: must not fail
t = torch.tensor([dist.get_rank() + 1])
dist.all_reduce(t)
seen = [x.tolist() for (x,) in loader]
report({"rank": dist.get_rank(), "sum": int(t), "batches": seen,
        "backend": hi.init().name})
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
