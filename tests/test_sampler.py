from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from harness import launch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data.distributed import DistributedSampler as TorchSampler

import horovod_iter as hi
from horovod_iter.permutation import permutation, permute


def ours(n, w, **kw):
    return [hi.DistributedSampler(n, w, r, **kw) for r in range(w)]


def torch_lists(n, w, shuffle=False, drop_last=False):
    return [list(TorchSampler(range(n), w, r, shuffle=shuffle, drop_last=drop_last))
            for r in range(w)]


sizes = st.integers(0, 300)
worlds = st.integers(1, 9)


@settings(max_examples=300, deadline=None)
@given(n=sizes, w=worlds, drop_last=st.booleans())
def test_unshuffled_equals_torch(n, w, drop_last):
    mine = ours(n, w, shuffle=False, drop_last=drop_last)
    theirs = torch_lists(n, w, drop_last=drop_last)
    assert [list(s) for s in mine] == theirs
    assert [len(s) for s in mine] == [len(t) for t in theirs]
    assert all(s.num_samples == len(t) for s, t in zip(mine, theirs))


@settings(max_examples=300, deadline=None)
@given(n=sizes, w=worlds, drop_last=st.booleans(), seed=st.integers(-2**70, 2**70),
       epoch=st.integers(0, 10**6))
def test_shuffled_lengths_and_counts_match_torch(n, w, drop_last, seed, epoch):
    mine = ours(n, w, seed=seed, drop_last=drop_last)
    for s in mine:
        s.set_epoch(epoch)
    lists = [list(s) for s in mine]
    theirs = torch_lists(n, w, shuffle=True, drop_last=drop_last)
    assert [len(x) for x in lists] == [len(t) for t in theirs]
    assert sorted(Counter(i for x in lists for i in x).values()) == sorted(
        Counter(i for x in theirs for i in x).values())
    if drop_last:  # disjoint
        flat = [i for x in lists for i in x]
        assert len(flat) == len(set(flat))


@settings(max_examples=300, deadline=None)
@given(n=sizes, w=worlds, seed=st.integers(0, 2**63), epoch=st.integers(0, 50),
       shuffle=st.booleans())
def test_pad_false_is_an_exact_partition(n, w, seed, epoch, shuffle):
    mine = ours(n, w, seed=seed, shuffle=shuffle, pad=False)
    lists = []
    for s in mine:
        s.set_epoch(epoch)
        lists.append(list(s))
    flat = sorted(i for x in lists for i in x)
    assert flat == list(range(n))
    assert max(map(len, lists)) - min(map(len, lists)) <= 1
    assert [len(s) for s in mine] == [len(x) for x in lists]


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 200), seed=st.integers(0, 2**40), epoch=st.integers(0, 100))
def test_permutation_is_a_permutation_and_deterministic(n, seed, epoch):
    p = permutation(n, seed, epoch)
    assert sorted(p.tolist()) == list(range(n))
    assert p.tolist() == permutation(n, seed, epoch).tolist()
    if n:
        idx = np.array([0, n - 1, n // 2])
        assert permute(idx, n, seed, epoch).tolist() == p[idx].tolist()


def test_epochs_differ_and_do_not_alias_across_seeds():
    n = 1000
    base = permutation(n, 5, 3)
    assert not np.array_equal(base, permutation(n, 5, 4))
    assert not np.array_equal(base, permutation(n, 6, 3))
    # Horovod's ElasticSampler seeds with seed + epoch: (s, e+1) == (s-1, e+2) there; not here
    for s, e in [(5, 3), (0, 1), (10, 0)]:
        assert not np.array_equal(permutation(n, s, e + 1), permutation(n, s - 1, e + 2))


def test_shuffle_positions_are_uniform_over_epochs():
    """Chi-square: where index i lands, over many epochs, is uniform over the n positions."""
    n, epochs = 16, 4000
    where = np.zeros((n, n))
    for e in range(epochs):
        p = permutation(n, 123, e)
        where[p, np.arange(n)] += 1
    expected = epochs / n
    chi2 = ((where - expected) ** 2 / expected).sum(axis=1)
    # 15 degrees of freedom: the 99.99th percentile is ~ 44.3
    assert chi2.max() < 44.3, chi2


def test_shuffle_neighbours_are_decorrelated():
    for n in (1000, 2**16, 100_003):
        p = permutation(n, 7, 0).astype(float)
        corr = np.corrcoef(p[:-1], p[1:])[0, 1]
        assert abs(corr) < 4 / np.sqrt(n), (n, corr)
        # rank correlation with the identity is ~0 too: the order is not "mostly sorted"
        assert abs(np.corrcoef(p, np.arange(n))[0, 1]) < 4 / np.sqrt(n)


def test_all_orders_of_a_small_set_are_equally_likely():
    counts = Counter(tuple(permutation(3, 9, e)) for e in range(6000))
    assert len(counts) == 6
    assert all(850 < c < 1150 for c in counts.values()), counts


def take(sampler, k):
    """Iterate ``k`` indices of a new pass (as a DataLoader loop would), leave it open."""
    it = iter(sampler)
    return [next(it) for _ in range(k)]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), w=worlds, drop_last=st.booleans(), pad=st.booleans(),
       seed=st.integers(0, 99), epoch=st.integers(0, 5), batch=st.integers(1, 7),
       data=st.data())
def test_resume_equals_uninterrupted(n, w, drop_last, pad, seed, epoch, batch, data):
    full = ours(n, w, seed=seed, drop_last=drop_last, pad=pad)
    for s in full:
        s.set_epoch(epoch)
    expected = [list(s) for s in full]
    k = data.draw(st.integers(0, min(map(len, expected)) // batch))
    savers = ours(n, w, seed=seed, drop_last=drop_last, pad=pad)
    for r, s in enumerate(savers):
        s.set_epoch(epoch)
        assert take(s, k * batch) == expected[r][: k * batch]
    states = [json.loads(json.dumps(s.state_dict())) for s in savers]
    assert all(st_ == states[0] for st_ in states), "state must be identical on every rank"
    resumed = ours(n, w, seed=seed, drop_last=drop_last, pad=pad)
    for r, s in enumerate(resumed):
        s.load_state_dict(states[0])
        s.set_epoch(epoch)  # a resumed trainer calls this too: must keep the load
        assert list(s) == expected[r][k * batch:]
        assert len(s) == len(expected[r])  # len() is always the full pass (torch's)
        assert list(s) == expected[r]  # the iteration after the resumed one starts over


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300), w=worlds, w2=worlds, pad=st.booleans(), pad2=st.booleans(),
       seed=st.integers(0, 99), batch=st.integers(1, 7), data=st.data())
def test_elastic_resume_exactly_once(n, w, w2, pad, pad2, seed, batch, data):
    before = ours(n, w, seed=seed, pad=pad)
    lists = [list(s) for s in ours(n, w, seed=seed, pad=pad)]
    k = data.draw(st.integers(0, min(map(len, lists)) // batch))
    consumed = [i for s in before for i in take(s, k * batch)]
    state = before[0].state_dict()
    after = ours(n, w2, seed=seed, pad=pad2)
    rest = []
    for s in after:
        s.load_state_dict(state)
        rest += list(s)
    if not pad:
        # nothing was repeated before the resize: every sample of the epoch exactly once
        # (unless the resumed layout pads)
        if not pad2:
            assert sorted(consumed + rest) == list(range(n))
        assert set(consumed) | set(rest) == set(range(n))
    elif k * batch * w <= n:  # stopped before the padding: nothing repeated, nothing lost
        assert len(consumed) == len(set(consumed))
        assert set(consumed).isdisjoint(rest) or (pad2 and w2 == w)
        assert set(consumed) | set(rest) == set(range(n))
    # the next epoch is a normal one at the new world size
    for s in after:
        s.set_epoch(1)
    nxt = sorted(i for s in after for i in s)
    assert nxt == sorted(i for s in ours(n, w2, seed=seed, pad=pad2)
                         for i in (s.set_epoch(1) or s))


def test_set_world_keeps_progress():
    s = hi.DistributedSampler(100, 4, 0, seed=1, pad=False)
    take(s, 10)
    s.set_world(2, 1)
    assert s.num_replicas == 2 and len(s) == 50  # len(): a full pass at the new size
    assert len(list(s)) == 30  # the next iter() resumes the rest: 60 samples over 2 ranks


def test_every_iter_starts_the_epoch_over_like_torch():
    s = hi.DistributedSampler(10, 2, 0, seed=3)
    first = list(s)
    assert list(s) == first and len(s) == 5
    take(s, 2)  # an aborted pass
    assert list(s) == first


def test_set_epoch_never_changes_a_pass_in_flight():
    s = hi.DistributedSampler(1000, 1, 0, seed=3)
    it = iter(s)
    head = [next(it) for _ in range(500)]
    s.set_epoch(1)
    assert sorted(head + list(it)) == list(range(1000))
    assert list(s) != head + list(range(500))  # the next pass is epoch 1


def test_state_dict_follows_the_current_iterator_without_extra_calls():
    from torch.utils.data import DataLoader

    s = hi.DistributedSampler(100, 1, 0, seed=3)
    dl = DataLoader(range(100), batch_size=10, sampler=s)
    full = [x for b in dl for x in b.tolist()]
    got = []
    for i, b in enumerate(dl):
        got += b.tolist()
        if i == 4:
            state = s.state_dict()
            break
    assert state["samples_consumed"] == 50
    s2 = hi.DistributedSampler(100, 1, 0, seed=3)
    s2.load_state_dict(state)
    got += [x for b in DataLoader(range(100), batch_size=10, sampler=s2) for x in b.tolist()]
    assert got == full
    assert not hasattr(s, "record")  # the old manual protocol is gone: nothing to misuse
    assert s.dataset == 100


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"dataset": -1}, ValueError, "length must be >= 0, got -1"),
    ({"dataset": object()}, TypeError, "sized dataset"),
    ({"num_replicas": 0}, ValueError, "num_replicas must be an int >= 1, got 0"),
    ({"rank": 2}, ValueError, r"Invalid rank 2, rank should be in the interval \[0, 1\]"),
    ({"rank": -1}, ValueError, "Invalid rank -1"),
    ({"seed": 1.5}, TypeError, "seed must be an int"),
    ({"seed": "1"}, TypeError, "seed must be an int"),
    ({"shuffle": "yes"}, TypeError, "shuffle must be a bool"),
])
def test_bad_arguments(kwargs, exc, match):
    args = {"dataset": 10, "num_replicas": 2, "rank": 0, **kwargs}
    with pytest.raises(exc, match=match):
        hi.DistributedSampler(**args)


def test_bad_epoch_and_world():
    s = hi.DistributedSampler(10, 1, 0)
    with pytest.raises(ValueError, match="epoch must be an int >= 0, got -1"):
        s.set_epoch(-1)
    with pytest.raises(ValueError, match="Invalid rank 3"):
        s.set_world(2, 3)


def _state(**over):
    s = hi.DistributedSampler(10, 2, 0, seed=4).state_dict()
    s.update(over)
    return s


@pytest.mark.parametrize("state, exc, match", [
    ([1, 2], TypeError, "must be a dict"),
    ({}, ValueError, "not a horovod_iter sampler state"),
    (_state(version=99), ValueError, "version 99 is not supported"),
    (_state(n=11), ValueError, "length 11, but this sampler has length 10"),
    (_state(seed=5), ValueError, "saved with seed=5, but this sampler has seed=4"),
    (_state(shuffle=False), ValueError, "saved with shuffle=False"),
    (_state(epoch="1"), ValueError, "'epoch' must be an int"),
    (_state(consumed=99), ValueError, "consumed=99 exceeds"),
    (_state(start=11), ValueError, "start=11 must lie in"),
    (_state(world_size=0), ValueError, "world_size=0"),
])
def test_bad_state_dicts(state, exc, match):
    s = hi.DistributedSampler(10, 2, 0, seed=4)
    with pytest.raises(exc, match=match):
        s.load_state_dict(state)


def test_seed_none_adopts_saved_seed():
    s = hi.DistributedSampler(10, 1, 0, seed=None)
    s.load_state_dict(_state(seed=77))
    assert s.seed == 77


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovod", "torch"])
@pytest.mark.parametrize("seed", ["none", "11"])
def test_ranks_agree_without_communicating(launcher, seed):
    n, w = 1001, 3
    res = launch(launcher, w, "sampler_ranks.py", n, seed)
    assert [v["rank"] for v in res] == list(range(w)) and {v["world"] for v in res} == {w}
    assert len({v["seed"] for v in res}) == 1  # seed=None: rank 0's draw was broadcast
    if seed != "none":
        assert res[0]["seed"] == 11
    for e in range(3):
        flat = sorted(i for v in res for i in v["epochs"][e])
        assert flat == list(range(n))
    assert res[0]["epochs"][0] != res[0]["epochs"][1]


# ---- issue 21 row 6: a dataset whose length changes between epochs ---------------------------
class Growing:
    """A map-style dataset whose length the test changes (a list of ids)."""

    def __init__(self, n):
        self.items = list(range(n))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def grow(self, k):
        self.items += range(len(self.items), len(self.items) + k)


def test_a_grown_dataset_is_dealt_from_the_next_epoch():
    """torch's DataLoader takes the new samples at the next epoch; so do we (torch's
    DistributedSampler raises). Before: the first length for ever."""
    ds = Growing(100)
    samplers = [hi.DistributedSampler(ds, 2, r, seed=1) for r in range(2)]
    assert sorted(i for s in samplers for i in s) == list(range(100))
    ds.grow(21)
    for s in samplers:
        s.set_epoch(1)
    assert [len(s) for s in samplers] == [61, 61] and samplers[0].length == 121
    got = [i for s in samplers for i in s]
    assert set(got) == set(range(121)) and len(got) == 122  # torch's padding: one repeat
    ds.items = ds.items[:50]  # and shrinks: read again at every iter(), even in one epoch
    assert sorted(i for s in samplers for i in s) == list(range(50))


def test_a_pass_in_flight_keeps_its_length():
    ds = Growing(100)
    s = hi.DistributedSampler(ds, 1, 0, seed=1)
    it = iter(s)
    head = [next(it) for _ in range(30)]
    ds.grow(50)
    s.set_epoch(0)  # the same epoch: the pass in flight goes on over the first 100
    assert sorted(head + list(it)) == list(range(100))
    assert s.state_dict()["n"] == 100
    assert sorted(s) == list(range(150))  # the next pass takes the new length


def test_a_state_refuses_a_length_it_was_not_made_for():
    ds = Growing(100)
    s = hi.DistributedSampler(ds, 2, 0, seed=1)
    take(s, 10)
    mid = s.state_dict()
    list(s)
    end = s.state_dict()  # a finished pass
    ds.grow(20)
    fresh = hi.DistributedSampler(ds, 2, 0, seed=1)
    with pytest.raises(ValueError, match=r"length 100, but this sampler has length 120.*"
                                         r"middle of epoch 0"):
        fresh.load_state_dict(mid)
    fresh.load_state_dict(end)  # the end of an epoch loads into any length ...
    with pytest.raises(ValueError, match=r"dataset of length 100, but the dataset now has "
                                         r"length 120.*set_epoch\(1\)"):
        list(fresh)  # ... but resuming its epoch would deal other samples
    fresh.set_epoch(1)
    assert len(list(fresh)) == 60
    # loaded, then the dataset changes before iter(): refused at iter()
    again = hi.DistributedSampler(ds, 2, 0, seed=1)
    take(again, 5)
    state = again.state_dict()
    other = hi.DistributedSampler(ds, 2, 0, seed=1)
    other.load_state_dict(state)
    ds.grow(1)
    with pytest.raises(ValueError, match="length 120, but the dataset now has length 121"):
        iter(other)


# ---- issue 21 row 11: generator= ----------------------------------------------------------
def gen(seed):
    import torch

    return torch.Generator().manual_seed(seed)


def test_generator_seeds_the_shuffle_as_in_torch():
    """torch: RandomSampler(generator=g1) and (generator=g5) give two orders. Before: ours
    ignored the generator (one order)."""
    import torch
    from torch.utils.data import RandomSampler

    assert list(RandomSampler(range(50), generator=gen(1))) != list(
        RandomSampler(range(50), generator=gen(5)))
    def ranks(seed):  # each rank its own generator, seeded alike (one per process)
        return [list(hi.DistributedSampler(50, 2, r, generator=gen(seed))) for r in range(2)]

    one, five = ranks(1), ranks(5)
    assert one != five
    assert one == ranks(1)  # seeded alike: alike
    assert sorted(one[0] + one[1]) == list(range(50))  # every rank alike: a partition
    s = hi.DistributedSampler(50, 1, 0, generator=gen(1))
    assert s.seed == int(torch.empty((), dtype=torch.int64).random_(generator=gen(1)).item())
    assert s.generator is not None
    unshuffled = hi.DistributedSampler(50, 1, 0, shuffle=False, generator=gen(1))
    assert list(unshuffled) == list(range(50))


def test_a_rank_dependent_generator_gives_each_rank_another_seed():
    """What the loader's fingerprint compares: the drawn seed differs per rank."""
    seeds = [hi.DistributedSampler(50, 2, r, generator=gen(r)).seed for r in range(2)]
    assert seeds[0] != seeds[1]


def test_generator_arguments_and_resume():
    with pytest.raises(ValueError, match="pass seed or generator, not both"):
        hi.DistributedSampler(10, 1, 0, seed=3, generator=gen(1))
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator"):
        hi.DistributedSampler(10, 1, 0, generator=1)
    s = hi.DistributedSampler(100, 1, 0, generator=gen(7))
    it = iter(s)
    head = [next(it) for _ in range(40)]
    state = s.state_dict()
    again = hi.DistributedSampler(100, 1, 0, generator=gen(7))
    again.load_state_dict(state)
    assert head + list(again) == list(hi.DistributedSampler(100, 1, 0, generator=gen(7)))
    with pytest.raises(ValueError, match=r"drew seed=.* from its generator; seed the generator"):
        hi.DistributedSampler(100, 1, 0, generator=gen(8)).load_state_dict(state)


# ---- the same through DistributedLoader (a thread world) ----------------------------------
def test_loader_takes_the_new_samples_of_a_grown_dataset():
    """Issue 21 row 6: 2 ranks, 40 samples, then 60. Before: the loader kept 40 for ever
    (len() too); now epoch 1 trains all 60 and len() follows."""
    from thread_world import run_all

    def rank_fn(b):
        ds = Growing(40)
        loader = hi.DistributedLoader(ds, batch_size=5, backend=b, timeout=60)
        epochs = [[int(i) for x in loader for i in x]]
        ds.grow(20)
        loader.set_epoch(1)
        lens = len(loader)
        epochs.append([int(i) for x in loader for i in x])
        return epochs, lens

    per_rank = run_all(2, rank_fn)
    assert sorted(i for ep, _ in per_rank for i in ep[0]) == list(range(40))
    assert sorted(i for ep, _ in per_rank for i in ep[1]) == list(range(60))
    assert [n for _, n in per_rank] == [6, 6]


def test_loader_generator_seeds_the_shuffle():
    """Issue 21 row 11: generator seeds 1 and 5 give two orders, as torch's DataLoader."""
    from torch.utils.data import DataLoader

    def order(loader_cls, seed, **kw):
        return [int(i) for x in loader_cls(list(range(40)), batch_size=4, shuffle=True,
                                           generator=gen(seed), **kw) for i in x]

    assert order(DataLoader, 1) != order(DataLoader, 5)
    assert order(hi.DistributedLoader, 1) != order(hi.DistributedLoader, 5)
    assert order(hi.DistributedLoader, 1) == order(hi.DistributedLoader, 1)
