"""The position model: the loops a torch user writes give torch's answer (issue 9's table),
side by side with torch's DataLoader + DistributedSampler, in one process and under both
launchers; torchdata's StatefulDataLoader and SamplerWrapper resume exactly; and a model-based
Hypothesis test of iter / next / break / set_epoch / save / load sequences."""
from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
import torch
from harness import launch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler as TorchSampler
from toy_data import Ids

import horovod_iter as hi


class Stream(IterableDataset):
    def __init__(self, n=20):
        self.n = n

    def __iter__(self):  # split over DataLoader workers, as torch users must
        return hi.split_stream(range(self.n), rank=0, num_replicas=1)


def ids(batches):
    return [b.tolist() if isinstance(b, torch.Tensor) else b[0].tolist() for b in batches]


def torch_batches(n, world, rank, batch, drop_last, shuffle, epoch=0):
    s = TorchSampler(range(n), world, rank, shuffle=shuffle, seed=7, drop_last=drop_last)
    s.set_epoch(epoch)
    dl = DataLoader(Ids(n), batch_size=batch, sampler=s, drop_last=drop_last)
    return [b.tolist() for b in dl], len(dl)


# ---- the table of issue 9, one process -------------------------------------------------
def test_validation_loader_iterated_three_times_without_set_epoch():
    loader = hi.DistributedLoader(TensorDataset(torch.arange(7.)), 3, drop_last=True,
                                  shuffle=False)
    dl = DataLoader(TensorDataset(torch.arange(7.)), 3, drop_last=True)
    assert [len(list(loader)) for _ in range(3)] == [len(list(dl)) for _ in range(3)] == [2] * 3
    assert len(loader) == len(dl) == 2


def test_peek_then_epoch_loop_sees_the_whole_epoch():
    loader = hi.DistributedLoader(Ids(20), 4, seed=1)
    first = next(iter(loader))
    epoch = ids(loader)
    assert sum(map(len, epoch)) == 20 and sorted(itertools.chain(*epoch)) == list(range(20))
    assert epoch[0] == first.tolist()  # the same epoch, from its beginning


def test_break_then_full_loop():
    loader = hi.DistributedLoader(Ids(20), 4, shuffle=False)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    assert ids(loader) == [list(range(k, k + 4)) for k in range(0, 20, 4)]


def test_len_is_constant_inside_the_loop():
    loader = hi.DistributedLoader(Ids(40), 4)
    seen = [len(loader) for _ in loader]
    assert seen == [10] * 10
    it = iter(loader)
    next(it)
    assert len(it) == 10 and it.num_steps == 10


def test_set_epoch_during_a_pass_changes_nothing_in_flight():
    loader = hi.DistributedLoader(Ids(1000), 10, seed=3)
    it = iter(loader)
    head = [next(it) for _ in range(40)]
    loader.set_epoch(1)
    rest = list(it)
    got = sorted(i for b in head + rest for i in b.tolist())
    assert got == list(range(1000))


def test_pad_with_a_padding_sampler_is_refused():
    with pytest.raises(ValueError, match=r"sampler pads.*pad=False"):
        hi.DistributedLoader(Ids(10), 2, uneven="pad", sampler=hi.DistributedSampler(10, 1, 0))
    with pytest.raises(ValueError, match="sampler pads"):
        hi.DistributedLoader(Ids(11), 2, uneven="pad", sampler=TorchSampler(range(11), 2, 0))
    # an exact sampler is fine
    loader = hi.DistributedLoader(Ids(10), 2, uneven="pad",
                                  sampler=hi.DistributedSampler(10, 1, 0, pad=False))
    assert sorted(i for b in ids(loader) for i in b) == list(range(10))


@pytest.mark.parametrize("workers", [0, 2])
def test_iterable_break_then_state_counts_only_the_new_pass(workers):
    loader = hi.DistributedLoader(Stream(20), batch_size=2, num_workers=workers)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    it = iter(loader)
    got = [next(it).tolist()]  # one batch of a new pass
    state = loader.state_dict()
    it.close()
    again = hi.DistributedLoader(Stream(20), batch_size=2, num_workers=workers)
    again.load_state_dict(state)
    with pytest.warns(UserWarning, match="replaying 1 batches"):
        got += ids(again)
    assert sorted(i for b in got for i in b) == list(range(20))


def test_foreign_sampler_resumes_in_samples_with_another_batch_size():
    sampler = torch.utils.data.SequentialSampler(range(30))
    loader = hi.DistributedLoader(Ids(30), batch_size=4, sampler=sampler)
    it = iter(loader)
    got = [next(it).tolist() for _ in range(3)]
    state = loader.state_dict()
    again = hi.DistributedLoader(Ids(30), batch_size=5, sampler=sampler)
    again.load_state_dict(state)
    got += ids(again)
    assert [i for b in got for i in b] == list(range(30))


def test_iterable_resume_with_another_batch_size_is_refused_with_advice():
    loader = hi.DistributedLoader(Stream(20), batch_size=4)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    with pytest.raises(ValueError, match=r"batch_size=4 .*build the loader with batch_size=4"):
        hi.DistributedLoader(Stream(20), batch_size=5).load_state_dict(state)


@pytest.mark.parametrize("before, after", [("stop", "pad"), ("pad", "stop"), ("stop", "error")])
def test_resume_with_another_uneven_is_exact(before, after):
    loader = hi.DistributedLoader(Ids(50), batch_size=4, uneven=before, seed=2)
    it = iter(loader)
    head = [next(it).tolist() for _ in range(5)]
    again = hi.DistributedLoader(Ids(50), batch_size=4, uneven=after, seed=2)
    again.load_state_dict(loader.state_dict())
    rest = ids(again)
    assert sorted(i for b in head + rest for i in b) == list(range(50))


def test_resume_with_another_batch_size_is_exact():
    loader = hi.DistributedLoader(Ids(50), batch_size=4, seed=2)
    it = iter(loader)
    head = [next(it).tolist() for _ in range(5)]
    again = hi.DistributedLoader(Ids(50), batch_size=7, seed=2)
    again.load_state_dict(loader.state_dict())
    rest = ids(again)
    assert all(len(b) == 7 for b in rest[:-1])
    assert [i for b in head + rest for i in b] == [i for b in ids(hi.DistributedLoader(
        Ids(50), batch_size=50, seed=2)) for i in b]


def test_sampler_has_torchs_dataset_attribute():
    ds = Ids(5)
    assert hi.DistributedSampler(ds, 1, 0).dataset is ds


def test_prefetched_batches_are_not_counted():
    loader = hi.DistributedLoader(Ids(40), batch_size=2, prefetch=5, shuffle=False)
    it = iter(loader)
    next(it), next(it)
    assert loader.state_dict()["steps"] == 2
    assert loader.state_dict()["sampler"]["samples_consumed"] == 4


# ---- torchdata --------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_torchdata_stateful_dataloader_resumes_our_sampler_exactly(workers):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")

    def make():
        s = hi.DistributedSampler(100, 2, 1, seed=3)
        s.set_epoch(2)
        return sdl.StatefulDataLoader(list(range(100)), batch_size=5, sampler=s,
                                      num_workers=workers)

    full = [x for b in make() for x in b.tolist()]
    dl = make()
    head = []
    for i, b in enumerate(dl):
        head += b.tolist()
        if i == 3:
            state = dl.state_dict()
            break
    again = make()
    again.load_state_dict(state)
    rest = [x for b in again for x in b.tolist()]
    assert head + rest == full and len(rest) == 30
    assert [x for b in again for x in b.tolist()] == full  # then a whole epoch again


def test_torchdata_sampler_wrapper_resumes_exactly():
    nodes = pytest.importorskip("torchdata.nodes")
    full = list(nodes.SamplerWrapper(hi.DistributedSampler(50, 1, 0, seed=1)))
    w = nodes.SamplerWrapper(hi.DistributedSampler(50, 1, 0, seed=1))
    it = iter(w)
    head = [next(it) for _ in range(20)]
    state = w.state_dict()
    w2 = nodes.SamplerWrapper(hi.DistributedSampler(50, 1, 0, seed=1))
    w2.reset(state)
    assert head + list(w2) == full


# ---- grid vs torch ----------------------------------------------------------------------
def _grid(ns, batches):
    return [[n, b, d, s] for n in ns for b in batches for d in (False, True)
            for s in (False, True)]


def _check_grid(res, grid, world):
    for k, (n, batch, drop_last, shuffle) in enumerate(grid):
        ours = [r["runs"][k] for r in res]
        theirs = [torch_batches(n, world, r, batch, drop_last, shuffle) for r in range(world)]
        for r in range(world):
            want, want_len = theirs[r]
            for p in ours[r]:
                assert p["len"] == want_len and p["lens"] == [want_len] * len(want), (k, r)
                if not shuffle:
                    assert p["batches"] == want, (k, r)
                else:
                    assert len(p["batches"]) == len(want)
        if shuffle:  # the same multiset over the ranks
            mine = Counter(i for r in range(world) for b in ours[r][0]["batches"] for i in b)
            want = Counter(i for r in range(world) for b in theirs[r][0] for i in b)
            assert sorted(mine.values()) == sorted(want.values()) and set(mine) <= set(range(n))


def test_grid_single_process_equals_torch():
    for n, batch, drop_last, shuffle in _grid(range(1, 41), range(1, 6)):
        loader = hi.DistributedLoader(Ids(n), batch_size=batch, drop_last=drop_last,
                                      shuffle=shuffle, seed=7)
        want, want_len = torch_batches(n, 1, 0, batch, drop_last, shuffle)
        for _ in range(2):
            got = ids(loader)
            assert len(loader) == want_len and len(got) == len(want)
            if not shuffle:
                assert got == want
            else:  # the same number of distinct samples, each as often as torch's
                mine, theirs = Counter(itertools.chain(*got)), Counter(itertools.chain(*want))
                assert sorted(mine.values()) == sorted(theirs.values())
                assert set(mine) <= set(range(n))


@pytest.mark.parametrize("workers", [0, 2])
def test_grid_single_process_with_workers(workers):
    grid = _grid([1, 7, 23], [1, 3])
    for n, batch, drop_last, _ in grid:
        loader = hi.DistributedLoader(Ids(n), batch_size=batch, drop_last=drop_last,
                                      shuffle=False, num_workers=workers)
        assert ids(loader) == torch_batches(n, 1, 0, batch, drop_last, False)[0]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovod", "torch"])
@pytest.mark.parametrize("world", [2, 3])
def test_grid_under_launchers_equals_torch(launcher, world):
    grid = _grid(range(1, 41, 3), range(1, 6, 2))
    res = launch(launcher, world, "grid_run.py",
                 json.dumps({"grid": grid, "workers": 0, "passes": 2}), timeout=300)
    _check_grid(res, grid, world)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovod", "torch"])
def test_grid_under_launchers_with_workers(launcher):
    grid = _grid([5, 23], [2])
    res = launch(launcher, 2, "grid_run.py",
                 json.dumps({"grid": grid, "workers": 2, "passes": 2}), timeout=300)
    _check_grid(res, grid, 2)


# ---- model-based: random operation sequences against the semantics ---------------------
N = 23
ops = st.lists(st.one_of(
    st.tuples(st.just("iter")), st.tuples(st.just("next"), st.integers(1, 4)),
    st.tuples(st.just("set_epoch"), st.integers(0, 2)), st.tuples(st.just("reload"),
                                                                   st.integers(1, 4)),
    st.tuples(st.just("len"))), max_size=14)


def _reference_epochs(batch, shuffle):
    out = {}
    for e in range(3):
        loader = hi.DistributedLoader(Ids(N), batch_size=batch, shuffle=shuffle, seed=11)
        loader.set_epoch(e)
        out[e] = ids(loader)
    return out


@settings(max_examples=150, deadline=None)
@given(ops=ops, batch=st.integers(1, 5), shuffle=st.booleans(), workers=st.sampled_from([0]))
def test_operation_sequences_follow_the_model(ops, batch, shuffle, workers):
    """Model: every iter() starts the epoch over, except the first after a load, which
    resumes; set_epoch(e != epoch) drops a pending load; the position counts handed batches."""
    ref = _reference_epochs(batch, shuffle)

    def make(b):
        return hi.DistributedLoader(Ids(N), batch_size=b, shuffle=shuffle, seed=11,
                                    num_workers=workers)

    loader, it = make(batch), None
    epoch, pending, pos = 0, None, None  # model: pending load (samples), current pass (samples)
    size = batch
    for op in ops:
        if op[0] == "iter":
            it = iter(loader)
            pos, pending = (pending if pending is not None else 0), None
        elif op[0] == "next" and it is not None:
            full = [i for b in ref[epoch] for i in b]
            for _ in range(op[1]):
                got = next(it, None)
                expect = full[pos:pos + size]
                if not expect:
                    assert got is None
                    break
                assert got.tolist() == expect
                pos += len(expect)
        elif op[0] == "set_epoch":
            if op[1] != epoch:
                epoch, pending, pos, it = op[1], None, None, None
            loader.set_epoch(op[1])
        elif op[0] == "reload":  # save, then a new loader (another batch size) loads it
            state = json.loads(json.dumps(loader.state_dict()))
            saved = pending if pending is not None else (pos or 0)
            assert state["sampler"]["samples_consumed"] == min(saved, N)
            loader, it, size = make(op[1]), None, op[1]
            loader.load_state_dict(state)
            pending, pos = min(saved, N), None
        elif op[0] == "len":
            assert len(loader) == -(-N // size)


sampler_ops = st.lists(st.one_of(
    # iter on every rank, take k each, maybe run to the end, maybe checkpoint and restart
    st.tuples(st.just("pass"), st.integers(0, 12), st.booleans(), st.booleans()),
    st.tuples(st.just("resize"), st.integers(1, 4)),     # checkpoint, restart on W ranks
    st.tuples(st.just("set_epoch"), st.integers(0, 2))), max_size=10)


@settings(max_examples=200, deadline=None)
@given(ops=sampler_ops, n=st.integers(0, 40), w=st.integers(1, 4), seed=st.integers(0, 9))
def test_sampler_sequences_with_world_changes_exactly_once(ops, n, w, seed):
    """Every rank's sampler steps alike (as under a launcher). The samples handed out in the
    chain of passes since the epoch's start (a restart resumes the chain; a plain iter()
    starts it over) are each at most once (pad=False); a pass run to its end completes the
    epoch; the saved position is the chain's length."""
    ranks = _samplers(n, w, seed)
    epoch, chain, resumed = 0, [], False
    for op in ops:
        if op[0] == "pass":
            _, k, finish, restart = op
            if not resumed:
                chain = []
            its = [iter(s) for s in ranks]
            for it in its:
                chain += [i for i in itertools.islice(it, k)]
                if finish:
                    chain += list(it)
            assert len(chain) == len(set(chain))
            if finish:
                assert sorted(chain) == list(range(n))
            assert ranks[0].state_dict()["samples_consumed"] == len(chain)
            resumed = False
            if restart:
                ranks, resumed = _restart(ranks[0].state_dict(), n, len(ranks), seed), True
        elif op[0] == "resize":
            ranks, resumed = _restart(ranks[0].state_dict(), n, op[1], seed), True
        elif op[0] == "set_epoch":
            for s in ranks:
                s.set_epoch(op[1])
            if op[1] != epoch:
                epoch, chain, resumed = op[1], [], False


def _samplers(n, world, seed):
    return [hi.DistributedSampler(n, world, r, seed=seed, pad=False) for r in range(world)]


def _restart(state, n, world, seed):
    fresh = _samplers(n, world, seed)
    for s in fresh:
        s.load_state_dict(json.loads(json.dumps(state)))
    return fresh
