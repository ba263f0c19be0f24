"""Single faults that need their own script; argv[1] is the case:

* ``eval_alone``: rank 0 iterates an evaluation loader alone in the middle of training (the
  others keep training): every rank must raise ConfigMismatchError at once, not time out;
* ``pad_class``: uneven="pad" over iterable data where rank 1 has none, batches of a
  dataclass defined in this script: rank 1's empty batches are of the very same class;
* ``after_shutdown``: iterating a loader after hi.shutdown() raises our BackendError;
* ``accelerate_world``: HF Accelerate set up in a horovodrun job sees one process: building a
  loader warns that accelerate will not synchronise gradients.
"""
import dataclasses
import os
import sys
import time

import torch
from harness import report
from torch.utils.data import IterableDataset

import horovod_iter as hi

case = sys.argv[1]
b = hi.init()
rank = b.rank
out = {"rank": rank, "error": None, "type": None}


@dataclasses.dataclass
class Batch:
    ids: torch.Tensor


class Mine(IterableDataset):
    def __iter__(self):
        n = 12 if rank == 0 else 0
        yield from range(n)


def collate(samples):
    return Batch(torch.tensor(samples))


try:
    t0 = time.time()
    if case == "eval_alone":
        train = hi.DistributedLoader(list(range(4000)), batch_size=2, timeout=30)
        evaluation = hi.DistributedLoader(list(range(100)), batch_size=2, timeout=30)
        for step, _ in enumerate(train):
            if step == 5 and rank == 0:
                for _ in evaluation:
                    pass
            time.sleep(0.001)
    elif case == "pad_class":
        loader = hi.DistributedLoader(Mine(), batch_size=4, uneven="pad", collate_fn=collate,
                                      timeout=30)
        batches = list(loader)
        out["classes_ok"] = all(type(x) is Batch and isinstance(x, Batch) for x in batches)
        out["rows"] = [len(x.ids) for x in batches]
    elif case == "accelerate_world":
        import warnings

        import accelerate

        accelerate.PartialState(cpu=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hi.DistributedLoader(list(range(8)), batch_size=2)
        out["warnings"] = [str(w.message) for w in caught]
    elif case == "after_shutdown":
        loader = hi.DistributedLoader(list(range(40)), batch_size=2, timeout=30)
        first = list(loader)
        out["first"] = len(first)
        hi.shutdown()
        list(loader)
except Exception as e:
    out.update(error=f"{type(e).__name__}: {e}", type=type(e).__name__,
               ours=isinstance(e, hi.HorovodIterError), elapsed=time.time() - t0)
report(out)
sys.stdout.flush()
os._exit(0)  # the cases end in a failure on purpose: leave without shutdown handshakes
