"""Host batches: buffer reuse is safe (a batch the user still refers to, in any way, is never
overwritten) and really happens (else the test would prove nothing)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

import horovod_iter as hi
from horovod_iter import gather


def loader(n=64, bs=4):
    ds = TensorDataset(torch.arange(n * 6, dtype=torch.int64).view(n, 6))
    return hi.DistributedLoader(ds, batch_size=bs, shuffle=False, device="cpu")


def expected(step, bs=4):
    return torch.arange(step * bs * 6, (step + 1) * bs * 6).view(bs, 6)


def test_reuse_is_available_and_happens_when_batches_are_dropped():
    assert gather._REUSE
    ptrs = set()
    for (x,) in loader():
        ptrs.add(x.data_ptr())
    # 16 batches in two buffers (the loop variable holds one while the next is gathered):
    # nothing else, e.g. the end-of-data check, keeps a batch alive
    assert len(ptrs) <= 2


def test_kept_batches_are_never_overwritten():
    kept = [x for (x,) in loader()]
    for step, x in enumerate(kept):
        assert torch.equal(x, expected(step)), step
    assert len({x.data_ptr() for x in kept}) == len(kept)


def test_views_numpy_arrays_and_graphs_keep_their_data():
    views, arrays, losses = [], [], []
    w = torch.ones(6, requires_grad=True)
    for step, (x,) in enumerate(loader()):
        if step % 3 == 0:
            views.append((step, x[1:3]))          # a view: another tensor on the storage
        elif step % 3 == 1:
            arrays.append((step, x.numpy()))      # a numpy array on the same memory
        else:
            losses.append((step, (x.float() * w).sum(), x.sum().item()))  # a live graph
        del x
    for step, v in views:
        assert torch.equal(v, expected(step)[1:3]), step
    for step, a in arrays:
        assert np.array_equal(a, expected(step).numpy()), step
    for _, loss, total in losses:
        loss.backward()                           # the saved input is still the batch
        assert loss.item() == total
    assert torch.equal(w.grad, sum(expected(s).float().sum(0) for s, _, _ in losses))


def test_poisoned_reuse_shows_up_if_a_buffer_were_reused_too_early():
    """Write poison into every batch after use, as a reused buffer would: the batches the
    user kept must still hold their own values."""
    kept = []
    for step, (x,) in enumerate(loader()):
        if step % 2:
            kept.append((step, x))
        else:
            x.fill_(-1)  # ours to scribble on: dropped right after
    for step, x in kept:
        assert torch.equal(x, expected(step)), step
