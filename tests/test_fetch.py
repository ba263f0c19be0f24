"""Host batches and CPU buffer reuse. Off by default: a batch the user keeps (or a view of it,
or a numpy array on it) is never overwritten, even if the refcount probe were wrong. Opt-in
(``reuse_cpu_buffers=True``, a batch valid until the next step): buffers really are reused,
and the refcount guard still spares a batch the user visibly holds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import horovod_iter as hi
from horovod_iter import _reuse
from horovod_iter.gather import BatchFetcher

REUSE = [False, True]


def rows(n=64):
    return TensorDataset(torch.arange(n * 6, dtype=torch.int64).view(n, 6))


def loader(n=64, bs=4, reuse=False):
    extra = {"reuse_cpu_buffers": True} if reuse else {}
    return hi.DistributedLoader(rows(n), batch_size=bs, shuffle=False, device="cpu", **extra)


def expected(step, bs=4):
    return torch.arange(step * bs * 6, (step + 1) * bs * 6).view(bs, 6)


def fetched(fetcher, n=64, bs=4):
    """The batches of a `BatchFetcher` over ``rows(n)``, in order, one at a time."""
    for step in range(n // bs):
        (x,) = fetcher(np.arange(step * bs, (step + 1) * bs))
        yield x


@pytest.fixture
def wrong_probe(monkeypatch):
    """A refcount probe that says "free" for every buffer, as a torch build whose refcount
    rules changed unseen might: only the opt-in stands between it and a kept batch."""
    monkeypatch.setattr(_reuse, "supported", lambda: True)
    monkeypatch.setattr(_reuse, "is_free", lambda pool, i: True)


def keep_views(batches, steps=16):
    """Keep only a view and a numpy array of every batch (what a probe must see), and check
    each against its values 5 steps later and at the end."""
    views = []
    for step, x in enumerate(batches):
        views.append((step, x[0], x.numpy()))
        del x
        if step >= 5:
            old, v, a = views[step - 5]
            assert torch.equal(v, expected(old)[0]) and np.array_equal(a, expected(old).numpy())
    assert len(views) == steps
    for step, v, a in views:
        assert torch.equal(v, expected(step)[0]), step
        assert np.array_equal(a, expected(step).numpy()), step


def test_default_fetcher_never_reuses_even_if_the_probe_were_wrong(wrong_probe):
    fetcher = BatchFetcher(rows(), None, pin=False, rank=0)
    assert fetcher.buffers is None
    keep_views(fetched(fetcher))


def test_the_views_test_sees_a_wrong_probe_under_opt_in(wrong_probe):
    """The check above is not vacuous: with reuse on and a wrong probe, kept views change."""
    fetcher = BatchFetcher(rows(), None, pin=False, rank=0, reuse=True)
    views = [(step, x[0].clone(), x[0]) for step, x in enumerate(fetched(fetcher))]
    assert any(not torch.equal(v, copy) for _, copy, v in views)


def test_default_loader_keeps_batches_even_if_the_probe_were_wrong(wrong_probe):
    keep_views(batch for (batch,) in loader())


def test_opt_in_fetcher_reuses_when_batches_are_dropped():
    assert _reuse.supported()
    fetcher = BatchFetcher(rows(), None, pin=False, rank=0, reuse=True)
    ptrs = {x.data_ptr() for x in fetched(fetcher)}
    # 16 batches, 2 buffers: the one the loop variable holds and the one written
    assert fetcher.buffers is not None
    assert fetcher.buffers.allocations <= 2 and fetcher.buffers.reuses >= 14
    assert len(ptrs) <= 2
    pinned = BatchFetcher(rows(), None, pin=True, rank=0, reuse=True)
    assert pinned.buffers is None  # pinned memory: torch's caching host allocator recycles it


def test_opt_in_loader_reuses_when_batches_are_dropped(monkeypatch):
    pools = []
    init = _reuse.BufferPool.__init__

    def record(self, *a, **kw):
        init(self, *a, **kw)
        pools.append(self)

    monkeypatch.setattr(_reuse.BufferPool, "__init__", record)
    for step, (x,) in enumerate(loader(reuse=True)):
        assert torch.equal(x, expected(step))
    # nothing else (the end-of-data check, a thread fetching ahead) keeps a batch alive long
    assert len(pools) == 1 and pools[0].allocations <= 4 and pools[0].reuses >= 12


def test_opt_in_guard_spares_batches_the_user_visibly_holds():
    """Opt-in says "valid until the next step"; the refcount guard still keeps what it sees."""
    fetcher = BatchFetcher(rows(), None, pin=False, rank=0, reuse=True)
    keep_views(fetched(fetcher))
    kept = list(fetched(fetcher))
    assert all(torch.equal(x, expected(step)) for step, x in enumerate(kept))


@pytest.mark.parametrize("reuse", REUSE)
def test_kept_batches_are_never_overwritten(reuse):
    kept = [x for (x,) in loader(reuse=reuse)]
    for step, x in enumerate(kept):
        assert torch.equal(x, expected(step)), step
    assert len({x.data_ptr() for x in kept}) == len(kept)


@pytest.mark.parametrize("reuse", REUSE)
def test_views_numpy_arrays_and_graphs_keep_their_data(reuse):
    views, arrays, losses = [], [], []
    w = torch.ones(6, requires_grad=True)
    for step, (x,) in enumerate(loader(reuse=reuse)):
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


@pytest.mark.parametrize("reuse", REUSE)
def test_poisoned_reuse_shows_up_if_a_buffer_were_reused_too_early(reuse):
    """Write poison into every batch after use, as a reused buffer would: the batches the
    user kept must still hold their own values."""
    kept = []
    for step, (x,) in enumerate(loader(reuse=reuse)):
        if step % 2:
            kept.append((step, x))
        else:
            x.fill_(-1)  # ours to scribble on: dropped right after
    for step, x in kept:
        assert torch.equal(x, expected(step)), step
