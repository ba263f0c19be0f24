"""Bad input, tried systematically: every row of docs/troubleshooting.md's table that can be
tried in one process, and Hypothesis fuzzing of the constructor and of ``load_state_dict``.

The contract: a bad value gives ValueError or TypeError naming it - never another exception,
a crash, a hang, or an iteration that yields data from the wrong place.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import horovod_iter as hi
from horovod_iter import SampleError

N = 13


def tds(n: int = N) -> TensorDataset:
    return TensorDataset(torch.arange(n))


def ids(loader) -> list[int]:
    return [i for b in loader for i in b[0].tolist()]


class _Iter(IterableDataset):
    def __iter__(self):
        return iter(range(3))


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"batch_size": -3}, ValueError, "batch_size must be a positive int, got -3"),
    ({"batch_size": 2.5}, ValueError, "batch_size must be a positive int, got 2.5"),
    ({"batch_size": "8"}, ValueError, "batch_size must be a positive int, got '8'"),
    ({"batch_size": True}, ValueError, "batch_size must be a positive int, got True"),
    ({"global_batch_size": 0}, ValueError, "global_batch_size must be a positive int"),
    ({"batch_size": 2, "num_workers": 1.5}, ValueError, "num_workers must be an int >= 0"),
    ({"batch_size": 2, "timeout": -1}, ValueError, "timeout must be a positive number"),
    ({"batch_size": 2, "timeout": "60"}, ValueError, "timeout must be a positive number"),
    ({"batch_size": 2, "timeout": True}, ValueError, "timeout must be a positive number"),
    ({"batch_size": 2, "drop_last": "yes"}, TypeError, "drop_last must be a bool"),
    ({"batch_size": 2, "shuffle": 1}, TypeError, "shuffle must be a bool"),
    ({"batch_size": 2, "progress": None}, TypeError, "progress must be a bool"),
    ({"batch_size": 2, "seed": 1.5}, TypeError, "seed must be an int"),
    ({"batch_size": 2, "seed": "0"}, TypeError, "seed must be an int"),
])
def test_bad_constructor_values_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        hi.DistributedLoader(tds(), **kwargs)


def test_bad_datasets_are_named():
    with pytest.raises(TypeError, match=r"map-style dataset .* or a torch IterableDataset"):
        hi.DistributedLoader(object(), batch_size=2)
    with pytest.raises(ValueError, match="rank 0: the dataset is empty"):
        hi.DistributedLoader(tds(0), batch_size=2)
    with pytest.raises(ValueError, match="sampler is for map-style datasets"):
        hi.DistributedLoader(_Iter(), batch_size=2, sampler=range(3))


class _Odd(Dataset):
    """Sample 6 has another structure; sample 9 raises."""

    def __init__(self, raise_at: int | None = None, odd_at: int | None = None) -> None:
        self.raise_at, self.odd_at = raise_at, odd_at

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        if i == self.raise_at:
            raise KeyError(f"no sample {i}")
        if i == self.odd_at:
            return (torch.zeros(3),)
        return {"x": torch.zeros(3)}


@pytest.mark.parametrize("workers", [0, 2])
def test_inconsistent_sample_structure_names_the_index_and_rank(workers):
    loader = hi.DistributedLoader(_Odd(odd_at=6), batch_size=4, shuffle=False,
                                  num_workers=workers)
    seen = []
    with pytest.raises(SampleError, match=r"rank 0: dataset\[6\] does not have the structure "
                                          r"of dataset\[4\]"):
        for b in loader:
            seen.append(b["x"].shape[0])
    assert seen == [4]  # the batch before it arrived; the error comes at its own step


@pytest.mark.parametrize("workers", [0, 2])
def test_raising_sample_names_the_index_and_rank(workers):
    loader = hi.DistributedLoader(_Odd(raise_at=9), batch_size=4, shuffle=False,
                                  num_workers=workers)
    with pytest.raises(SampleError, match=r"rank 0: dataset\[9\] raised KeyError"):
        list(loader)


# ---- fuzzing ---------------------------------------------------------------------------
anything = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True),
    st.text(max_size=4), st.lists(st.integers(0, 3), max_size=3),
    st.sampled_from(["stop", "pad", "error", "cuda", "cpu"]),
)
maybe = st.one_of(st.just(None), anything)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch_size=maybe, global_batch_size=maybe, prefetch=anything, uneven=anything,
       drop_last=anything, shuffle=anything, seed=anything, timeout=anything,
       workers=st.one_of(st.sampled_from([0, 0, 0, 1]), anything))
def test_fuzz_constructor(batch_size, global_batch_size, prefetch, uneven, drop_last, shuffle,
                          seed, timeout, workers):
    kwargs = dict(batch_size=batch_size, global_batch_size=global_batch_size,
                  prefetch=prefetch, uneven=uneven, drop_last=drop_last, shuffle=shuffle,
                  seed=seed, timeout=timeout, num_workers=workers, device="cpu")
    try:
        loader = hi.DistributedLoader(tds(), **kwargs)
    except (ValueError, TypeError) as e:
        assert str(e), "an error must say what is wrong"
        return
    if loader.num_workers > 1:
        return  # accepted; iterating many worker processes per example is too slow here
    got = ids(loader)
    # accepted arguments give a correct epoch: one rank sees every sample once (minus a
    # dropped short batch)
    expected = N - (N % loader.batch_size if loader.drop_last else 0)
    assert len(got) == expected and len(set(got)) == expected
    assert set(got) <= set(range(N))
    assert len(loader) == -(-expected // loader.batch_size)


def _valid_state(stop_after: int = 2) -> dict:
    loader = hi.DistributedLoader(tds(), batch_size=2, seed=5)
    it = iter(loader)
    for _ in range(stop_after):
        next(it)
    it.close()
    return json.loads(json.dumps(loader.state_dict()))


def _paths(d, prefix=()):
    for k, v in d.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from _paths(v, (*prefix, k))


def _check_load(state) -> None:
    fresh = hi.DistributedLoader(tds(), batch_size=2, seed=5)
    try:
        fresh.load_state_dict(state)
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    # accepted: the rest of the epoch is a set of distinct, valid samples
    fresh.set_epoch(fresh.epoch)
    rest = ids(fresh)
    assert len(rest) == len(set(rest)) and set(rest) <= set(range(N))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), stop_after=st.integers(0, 7))
def test_fuzz_load_state_dict_mutated(data, stop_after):
    state = _valid_state(stop_after)
    paths = list(_paths(state))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = state
        for k in path[:-1]:
            parent = parent.get(k) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        if data.draw(st.booleans()):
            parent.pop(path[-1], None)  # truncated
        else:
            parent[path[-1]] = data.draw(anything)  # wrong type or value
    _check_load(state)


@settings(max_examples=100, deadline=None)
@given(state=st.one_of(anything, st.dictionaries(st.text(max_size=8), anything, max_size=6)))
def test_fuzz_load_state_dict_random(state):
    _check_load(state)


@pytest.mark.parametrize("version", [0, 4, "1", "2", None])
def test_other_state_versions_refused(version):
    state = _valid_state()
    bad = copy.deepcopy(state)
    bad["version"] = version
    with pytest.raises(ValueError, match="version"):
        hi.DistributedLoader(tds(), batch_size=2, seed=5).load_state_dict(bad)
    bad = copy.deepcopy(state)
    bad["sampler"]["version"] = version
    with pytest.raises(ValueError, match="version"):
        hi.DistributedLoader(tds(), batch_size=2, seed=5).load_state_dict(bad)
