"""LengthGroupedBatchSampler's deal over the ranks (issue 21, row 5): every rank has the same
batch count every epoch with no sample dropped under ``uneven="stop"``; ``uneven="pad"`` never
repeats a sample, and with ``even_batches`` never hands out an empty batch. In process: the
pure deal, samplers with explicit ranks, and the loader on a thread world."""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from thread_world import ThreadBackend, ThreadWorld, run_all
from torch.utils.data import DataLoader, Dataset

import horovod_iter as hi
from horovod_iter.batching import batch_sampler_batches, deal, deal_counts
from horovod_iter.gather import BatchFetcher
from horovod_iter.loader_config import check_batch_sampler, check_even_batches
from horovod_iter.sync import EndOfDataSync


class Rows(Dataset[dict[str, torch.Tensor]]):
    """Sample i: {"x": i, "labels": i}, with length ``lengths[i]`` for the batch sampler."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor(i), "labels": torch.tensor(i)}


def lengths_of(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(v) for v in torch.randint(1, 300, (n,), generator=g)]


# ---- the pure deal --------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 120), bs=st.integers(1, 9), world=st.integers(1, 6),
       start_frac=st.floats(0, 1), pad=st.booleans(), drop_last=st.booleans())
def test_deal_matches_its_counts_and_loses_nothing(n, bs, world, start_frac, pad, drop_last):
    """Every rank's batches are what `deal_counts` says; with ``pad`` (no ``drop_last``) the
    counts are equal and every sample left is dealt, repeated only where fewer than W remain;
    without ``pad`` no sample is repeated and none is lost."""
    batches = [np.arange(a, min(a + bs, n)) for a in range(0, n, bs)]
    if drop_last and len(batches[-1]) < bs:
        batches.pop()
    start = int(start_frac * len(batches))
    left = [int(i) for b in batches[start:] for i in b]
    leftover = (len(batches) - start) % world
    tail = sum(len(b) for b in batches[len(batches) - leftover:]) if leftover else 0
    counts = deal_counts(len(batches), start, world, tail, pad=pad, drop_last=drop_last)
    dealt = [deal(batches, start, world, r, pad=pad, drop_last=drop_last)
             for r in range(world)]
    assert [len(d) for d in dealt] == counts
    assert all(len(b) > 0 for d in dealt for b in d)  # never an empty batch
    assert all(len(b) <= bs for d in dealt for b in d)
    got = Counter(int(i) for d in dealt for b in d for i in b)
    if pad:
        assert len(set(counts)) == 1  # every rank the same number of batches
    if drop_last:
        assert all(len(b) == bs for d in dealt for b in d)  # batches stay full
        if not pad:
            assert sorted(got.elements()) == sorted(left)
    else:
        assert set(got) == set(left)  # nothing dropped
        if not pad or tail >= world or leftover == 0:
            assert sorted(got.elements()) == sorted(left)  # nothing repeated


# ---- the sampler alone, explicit ranks -------------------------------------------------------
def rank_batches(n: int, bs: int, world: int, epoch: int = 0, **kw: Any) -> list[list[list[int]]]:
    out = []
    for r in range(world):
        s = hi.LengthGroupedBatchSampler(lengths_of(n), bs, num_replicas=world, rank=r, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
        assert len(s) == len(out[-1])
    return out


def test_203_samples_on_2_ranks_same_count_every_sample_every_epoch():
    """The issue's case: 21 global batches on 2 ranks. Before: rank 0 had 11, rank 1 had 10,
    so a stop at the shortest left the last batch (the 3 shortest samples) untrained every
    epoch; now both have 11 and the last step splits those 3 samples 2 + 1."""
    for epoch in range(3):
        per_rank = rank_batches(203, 10, 2, epoch)
        assert [len(b) for b in per_rank] == [11, 11]
        steps = min(len(b) for b in per_rank)  # what uneven="stop" trains
        trained = [i for b in per_rank for batch in b[:steps] for i in batch]
        assert sorted(trained) == list(range(203))


def test_fewer_samples_than_ranks_left_are_repeated_only_with_pad():
    """9 samples, batch 4, 2 ranks: the last global batch has 1 sample. ``pad`` (stop): both
    ranks get it; ``pad=False`` (exact): rank 1 has one batch fewer, no repeat."""
    padded = rank_batches(9, 4, 2, shuffle=False, pad=True)
    assert [len(b) for b in padded] == [2, 2]
    seen = Counter(i for b in padded for batch in b for i in batch)
    assert set(seen) == set(range(9)) and sorted(seen.values()) == [1] * 8 + [2]
    exact = rank_batches(9, 4, 2, shuffle=False, pad=False)
    assert [len(b) for b in exact] == [2, 1]
    assert sorted(i for b in exact for batch in b for i in batch) == list(range(9))


def test_drop_last_keeps_batches_full_and_counts_equal():
    per_rank = rank_batches(203, 10, 3, drop_last=True)  # 20 full batches over 3 ranks
    assert [len(b) for b in per_rank] == [6, 6, 6]
    assert all(len(batch) == 10 for b in per_rank for batch in b)


def test_the_loaders_uneven_decides_an_unset_pad():
    bs = hi.LengthGroupedBatchSampler(lengths_of(9), 4, num_replicas=2, rank=1)
    assert bs.pads and len(bs) == 2  # a torch DataLoader: padded, as torch's sampler
    world = ThreadWorld(2).backends[1]  # no collective is run
    check_batch_sampler(bs, Rows(9), world, uneven="pad")
    assert not bs.pads and len(bs) == 1
    check_batch_sampler(bs, Rows(9), world, uneven="stop")
    assert bs.pads and len(bs) == 2
    fixed = hi.LengthGroupedBatchSampler(lengths_of(9), 4, num_replicas=2, rank=1, pad=True)
    with pytest.raises(ValueError, match=r"pad=True\) does not fit uneven='pad'.*pad=False"):
        check_batch_sampler(fixed, Rows(9), world, uneven="pad")
    with pytest.raises(TypeError, match="pad must be a bool or None"):
        hi.LengthGroupedBatchSampler([1, 2], 1, num_replicas=1, rank=0, pad=1)


def test_torch_dataloader_ranks_get_equal_lengths():
    """In a plain torch DataLoader (DDP), every rank's len() and batch count are equal."""
    for r in range(2):
        bs = hi.LengthGroupedBatchSampler(lengths_of(203), 10, num_replicas=2, rank=r)
        loader = DataLoader(Rows(203), batch_sampler=bs)
        assert len(loader) == 11 and sum(1 for _ in loader) == 11


def test_resume_on_another_world_keeps_every_sample_once():
    """A state saved after 5 steps on 2 ranks, resumed on 3: the rest dealt anew, the last
    step split over the 3 ranks; with the first 5 steps, every sample exactly once."""
    n, bs = 203, 10
    first = [hi.LengthGroupedBatchSampler(lengths_of(n), bs, num_replicas=2, rank=r)
             for r in range(2)]
    seen = []
    for s in first:
        it = iter(s)
        seen += [i for _ in range(5) for i in next(it)]
    state = first[0].state_dict()
    rest = []
    for r in range(3):
        s = hi.LengthGroupedBatchSampler(lengths_of(n), bs, num_replicas=3, rank=r)
        s.load_state_dict(state)
        rest.append(list(s))
    assert len({len(b) for b in rest}) == 1
    assert sorted(seen + [i for b in rest for batch in b for i in batch]) == list(range(n))


# ---- the loader on a thread world ------------------------------------------------------------
def epoch_ids(uneven: str, n: int, bs: int, world: int, epochs: int = 1,
              **kw: Any) -> list[list[list[list[int]]]]:
    """Per rank, per epoch, the ids of every batch a DistributedLoader yields."""
    def rank_fn(b: ThreadBackend) -> list[list[list[int]]]:
        sampler = hi.LengthGroupedBatchSampler(lengths_of(n), bs, num_replicas=b.size,
                                               rank=b.rank)
        loader = hi.DistributedLoader(Rows(n), batch_sampler=sampler, uneven=uneven,
                                      backend=b, timeout=60, **kw)
        out = []
        for e in range(epochs):
            loader.set_epoch(e)
            out.append([batch["x"].tolist() for batch in loader])
            assert len(out[-1]) == len(loader)
        return out

    return run_all(world, rank_fn)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # "stop ... does not train on" is a fail
def test_loader_stop_trains_every_sample_every_epoch():
    """Issue 21 row 5: 203 samples, batch 10, 2 ranks, the default uneven="stop". Before:
    200 of 203 trained each epoch (the last global batch never). Now all, with equal steps."""
    per_rank = epoch_ids("stop", 203, 10, 2, epochs=3)
    for e in range(3):
        assert [len(r[e]) for r in per_rank] == [11, 11]
        assert sorted(i for r in per_rank for b in r[e] for i in b) == list(range(203))


def test_loader_pad_gives_no_empty_batch_and_each_sample_once():
    """uneven="pad": before, rank 1 got an empty batch at the last step (a model crashes on
    it); now the last step's 3 samples are split over both ranks, each once."""
    per_rank = epoch_ids("pad", 203, 10, 2)
    assert all(len(b) > 0 for r in per_rank for b in r[0])
    assert sorted(i for r in per_rank for b in r[0] for i in b) == list(range(203))


def test_even_batches_with_a_batch_sampler_fill_the_padding_batch_with_marked_copies():
    """9 samples, batch 4, 2 ranks, uneven="pad": rank 1 has no batch at step 1. With
    even_batches (the sync as the loader builds it, rows from check_even_batches), it gets
    4 copies of a real row, all marked; the short batch of rank 0 is filled too. Before,
    check_even_batches refused every batch sampler."""
    def rank_fn(b: ThreadBackend) -> list[dict[str, Any]]:
        bs = hi.LengthGroupedBatchSampler(lengths_of(9), 4, shuffle=False,
                                          num_replicas=b.size, rank=b.rank)
        check_batch_sampler(bs, Rows(9), b, uneven="pad")
        rows = check_even_batches(True, hi.flag_padding(), uneven="pad", batch_sampler=bs)
        indices, count = batch_sampler_batches(bs, 0)
        fetch = BatchFetcher(Rows(9), None, False, b.rank)
        sync = EndOfDataSync((fetch(i) for i in indices), b, "pad", 60, num_batches=count,
                             even_rows=rows, mark_padding=hi.flag_padding(),
                             empty=lambda: fetch(np.zeros(1, dtype=np.int64)))
        return list(sync)

    per_rank = run_all(2, rank_fn)
    assert [len(r) for r in per_rank] == [2, 2]
    assert all(len(batch["x"]) == 4 for r in per_rank for batch in r)  # never empty
    real = [int(i) for r in per_rank for batch in r
            for i, pad in zip(batch["x"], batch["padding"]) if not pad]
    assert sorted(real) == list(range(9))  # the marks leave every sample once
    assert per_rank[1][1]["padding"].all()  # rank 1's padding batch: all copies


def test_loader_even_batches_with_a_batch_sampler():
    """The same through DistributedLoader(even_batches=True, mark_padding=...)."""
    per_rank = epoch_ids("pad", 9, 4, 2, even_batches=True, mark_padding=hi.flag_padding())
    assert [len(r[0]) for r in per_rank] == [2, 2]
    assert all(len(b) == 4 for r in per_rank for b in r[0])


def test_loader_pad_never_repeats_a_sample_of_a_batch_sampler():
    """uneven="pad" tells the batch sampler not to repeat: 9 samples, batch 4, 2 ranks (the
    last global batch has 1 sample): each sample once, rank 1 pads with an empty batch."""
    per_rank = epoch_ids("pad", 9, 4, 2)
    assert sorted(i for r in per_rank for b in r[0] for i in b) == list(range(9))
