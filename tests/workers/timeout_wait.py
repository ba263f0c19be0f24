"""Rank 0 waits on an allreduce that the last rank never joins; it must time out, not hang."""
import os
import time

import torch
from harness import report

import horovod_iter as hi
from horovod_iter.errors import DataTimeoutError

b = hi.init()
if b.rank == b.size - 1:
    time.sleep(4)  # stalls: never issues the op
    report({"rank": b.rank, "stalled": True})
else:
    start = time.monotonic()
    try:
        b.allreduce_async(torch.tensor([1]), "sum", name="never").wait(timeout=1.0,
                                                                      what="the test op")
        report({"rank": b.rank, "error": None})
    except DataTimeoutError as e:
        report({"rank": b.rank, "error": str(e), "waited": time.monotonic() - start})
os._exit(0)  # the pending op cannot complete: leave without a collective shutdown
