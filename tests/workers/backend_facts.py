"""Report the backend's facts and every collective's value on this rank."""
import sys

import torch
from harness import report

import horovod_iter as hi

b = hi.init(sys.argv[1] if len(sys.argv) > 1 else None)
r, w = b.rank, b.size
t = torch.tensor([r + 1, 10 * (r + 1)], dtype=torch.int64)
handle = b.allreduce_async(t, "sum")
result = handle.wait(timeout=30)
assert handle.done()
again = hi.init()  # idempotent
b.barrier()
report({
    "name": b.name, "rank": r, "size": w, "local_rank": b.local_rank, "local_size": b.local_size,
    "sum": b.allreduce(t, "sum").tolist(), "min": b.allreduce(t, "min").tolist(),
    "max": b.allreduce(t, "max").tolist(), "async_sum": result.tolist(),
    "input_untouched": t.tolist(),
    "bcast": b.broadcast_object({"from": r}, root=w - 1), "gather": b.allgather_object(r * r),
    "same_object": again is b,
})
