"""In-process twins of tests/test_loader.py's launched tests: the loader over map-style and
iterable data on a thread world of 1-4 ranks (tests/thread_world.py), through the same
configuration as tests/workers/loader_run.py (tests/inproc_run.py). The launched originals
run under `-m slow`; one real launch per family and launcher stays in the default run."""
from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from inproc_run import flat, loader_run
from thread_world import RankDied, RankStalled, run_all, run_ranks

pytestmark = pytest.mark.filterwarnings("ignore:rank .* uneven='stop' ended:RuntimeWarning")


def run(world: int, **cfg: Any) -> list[dict[str, Any]]:
    return run_all(world, lambda b: loader_run(b, cfg))


def errors(res: list[dict[str, Any]]) -> list[Any]:
    return [r["error"] for r in res]


# ---- uneven iterables -----------------------------------------------------------------
@settings(deadline=None, max_examples=25)
@given(lengths=st.lists(st.integers(0, 13), min_size=1, max_size=4),
       batch=st.integers(1, 4), uneven=st.sampled_from(["stop", "pad", "error"]))
def test_iterable_uneven_stop_pad_error_over_worlds(lengths: list[int], batch: int,
                                                    uneven: str) -> None:
    """stop: equal step counts, the shortest rank's; pad: every sample once, empty batches
    after a rank's end; error: every rank raises at the first uneven step (test_loader's
    stop/pad/error tests on 1-4 ranks)."""
    steps = [-(-n // batch) for n in lengths]
    res = run(len(lengths), data="iter", lengths=lengths, batch_size=batch, uneven=uneven)
    if uneven == "stop":
        assert errors(res) == [None] * len(res)
        assert [len(r["batches"]) for r in res] == [min(steps)] * len(res)
    elif uneven == "pad":
        assert errors(res) == [None] * len(res)
        assert [len(r["batches"]) for r in res] == [max(steps)] * len(res)
        assert sorted(flat(b for r in res for b in r["batches"])) == list(range(sum(lengths)))
        for r, n in zip(res, steps):
            assert r["batches"][n:] == [[]] * (max(steps) - n)
            assert r["stats"]["padded_steps"] == max(steps) - n
    elif len(set(steps)) == 1:
        assert errors(res) == [None] * len(res)
    else:
        for r in res:
            assert r["error"].startswith("UnevenDataError"), r["error"]
            assert f"at step {min(steps)} some ranks have a batch" in r["error"]
            assert len(r["batches"]) == min(steps)


def test_stop_gives_equal_step_counts() -> None:
    res = run(3, data="iter", lengths=[7, 12, 4], batch_size=2, uneven="stop")
    assert errors(res) == [None] * 3
    assert [len(r["batches"]) for r in res] == [2, 2, 2]


@pytest.mark.parametrize("workers", [0, 2])
def test_pad_rank_without_any_data_gets_well_formed_empty_batches(workers: int) -> None:
    res = run(4, data="iter", lengths=[7, 12, 5, 0], batch_size=2, uneven="pad",
              workers=workers, scalar_leaf=True)
    assert errors(res) == [None] * 4
    assert [len(r["batches"]) for r in res] == [6] * 4
    assert res[3]["batches"] == [[]] * 6 and res[3]["stats"]["padded_steps"] == 6
    assert sorted(i for r in res for i in flat(r["batches"])) == list(range(24))


@pytest.mark.parametrize("data", ["map", "iter"])
def test_even_batches_have_one_shape_everywhere_and_mark_the_copies(data: str) -> None:
    cfg: dict[str, Any] = (dict(data="iter", lengths=[7, 12, 5, 0]) if data == "iter"
                           else dict(n=23))
    res = run(4 if data == "iter" else 3, **cfg, batch_size=4, uneven="pad", even=True,
              scalar_leaf=True)
    assert errors(res) == [None] * len(res)
    steps = 3 if data == "iter" else 2
    assert [r["rows"] for r in res] == [[4] * steps] * len(res)
    total = 24 if data == "iter" else 23
    assert sorted(i for r in res for i in flat(r["batches"])) == list(range(total))
    if data == "iter":
        assert res[3]["batches"] == [[]] * 3 and res[3]["stats"]["padded_steps"] == 3


def test_pad_with_a_zero_dim_leaf() -> None:
    res = run(2, data="iter", lengths=[2, 9], batch_size=2, uneven="pad", scalar_leaf=True)
    assert errors(res) == [None] * 2  # loader_run checks ntok == rows, 0 too
    assert res[0]["batches"][1:] == [[]] * 4


@pytest.mark.parametrize("mode", ["next", "get_next", "optional"])
def test_pad_iterable_exact(mode: str) -> None:
    res = run(3, data="iter", lengths=[7, 12, 1], batch_size=2, uneven="pad", mode=mode,
              prefetch=3)
    assert errors(res) == [None] * 3
    assert [len(r["batches"]) for r in res] == [6, 6, 6]
    assert sorted(i for r in res for i in flat(r["batches"])) == list(range(20))
    assert res[2]["batches"][1:] == [[]] * 5 and res[2]["stats"]["padded_steps"] == 5


def test_error_raises_on_every_rank() -> None:
    res = run(2, data="iter", lengths=[6, 9], batch_size=3, uneven="error")
    for r in res:
        assert r["error"] is not None and r["error"].startswith("UnevenDataError")
        assert "at step 2 some ranks have a batch and some have none" in r["error"]
        assert len(r["batches"]) == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_raising_iterable_names_rank_and_step(workers: int) -> None:
    res = run(2, data="iter", lengths=[20, 20], batch_size=2, raise_at=[1, 7],
              workers=workers, timeout=20)
    err = res[1]["error"]
    assert err.startswith("SampleError") and "rank 1" in err and "step 3" in err, err
    assert "corrupt record" in err
    assert res[0]["error"] is not None and res[0]["rank_failure"], res[0]
    assert [len(r["batches"]) for r in res] == [3, 3]


def test_device_transform_runs_in_the_pipeline() -> None:
    assert errors(run(2, n=20, batch_size=3, device_transform="double")) == [None] * 2


# ---- map-style ------------------------------------------------------------------------
@settings(deadline=None, max_examples=25)
@given(n=st.integers(1, 40), world=st.integers(1, 4), batch=st.integers(1, 5),
       workers=st.sampled_from([0, 0, 0, 2]), seed=st.integers(0, 3))
def test_map_pad_is_exact_on_any_world(n: int, world: int, batch: int, workers: int,
                                       seed: int) -> None:
    res = run(world, n=n, batch_size=batch, uneven="pad", workers=workers, seed=seed)
    assert errors(res) == [None] * world
    assert len({len(r["batches"]) for r in res}) == 1
    assert sorted(i for r in res for i in flat(r["batches"])) == list(range(n))
    assert {r["len"] for r in res} == {len(res[0]["batches"])}


@pytest.mark.parametrize("workers", [0, 2])
def test_map_pad_is_exact(workers: int) -> None:
    res = run(3, n=23, batch_size=4, uneven="pad", workers=workers)
    assert errors(res) == [None] * 3
    assert {len(r["batches"]) for r in res} == {2}
    assert sorted(i for r in res for i in flat(r["batches"])) == list(range(23))
    assert {r["len"] for r in res} == {2}


def test_map_error_raises_on_every_rank_when_counts_differ() -> None:
    res = run(3, n=23, batch_size=4, uneven="error")
    for r in res:  # 8, 8, 7 samples: refused at iter(), before any batch, on every rank
        assert r["error"] is not None and r["error"].startswith("UnevenDataError"), r["error"]
        assert "per rank: [8, 8, 7]" in r["error"] and r["batches"] == []
    res = run(3, n=24, batch_size=5, uneven="error")
    assert errors(res) == [None] * 3
    assert sorted(i for r in res for i in flat(r["batches"])) == list(range(24))


@settings(deadline=None, max_examples=20)
@given(n=st.integers(1, 40), world=st.integers(1, 4), per_rank=st.integers(1, 4))
def test_map_stop_pads_like_torch_and_covers(n: int, world: int, per_rank: int) -> None:
    res = run(world, n=n, global_batch_size=per_rank * world, uneven="stop")
    per_rank_samples = -(-n // world)  # torch pads every rank to ceil(n / W)
    steps = -(-per_rank_samples // per_rank)
    assert [len(r["batches"]) for r in res] == [steps] * world
    seen = Counter(i for r in res for i in flat(r["batches"]))
    assert set(seen) == set(range(n)) and sum(seen.values()) == per_rank_samples * world


@pytest.mark.parametrize("prefetch, workers", [(0, 0), (3, 0), (2, 2)])
def test_mid_epoch_resume_equals_uninterrupted(prefetch: int, workers: int) -> None:
    common = dict(n=50, batch_size=3, seed=5, epoch=2, prefetch=prefetch, workers=workers)
    full = run(2, **common)
    first = run(2, **common, stop_after=4)
    assert first[0]["state"] == first[1]["state"]
    resumed = run(2, **common, state_in=first[0]["state"])
    for f, r in zip(full, resumed):
        assert r["batches"] == f["batches"][4:]
        assert r["len"] == len(f["batches"])  # len(): a full pass, as torch's


@settings(deadline=None, max_examples=25)
@given(n=st.integers(1, 70), before=st.integers(1, 4), after=st.integers(1, 4),
       g=st.sampled_from([12, 24]), stop=st.integers(0, 6),
       uneven=st.sampled_from(["pad", "stop"]))
def test_resume_across_world_sizes_is_exactly_once(n: int, before: int, after: int, g: int,
                                                   stop: int, uneven: str) -> None:
    """Saved on one world mid-epoch, loaded on another (any of 1-4 ranks): every sample of
    the epoch once under pad (and at least once under stop, torch's padding)."""
    common: dict[str, Any] = dict(n=n, seed=9, uneven=uneven, epoch=1, global_batch_size=g)
    first = run(before, **common, stop_after=stop)
    assume("state" in first[0])  # stopped inside the epoch
    consumed = [i for r in first for i in flat(r["batches"])]
    rest = run(after, **common, state_in=first[0]["state"])
    got = consumed + [i for r in rest for i in flat(r["batches"])]
    assert errors(rest) == [None] * after
    if uneven == "pad":
        assert sorted(got) == list(range(n))
    else:
        assert set(got) == set(range(n))


def test_resume_across_world_sizes() -> None:
    common: dict[str, Any] = dict(n=61, seed=9, uneven="pad", epoch=1)
    before = run(2, **common, global_batch_size=4, stop_after=5)
    consumed = [i for r in before for i in flat(r["batches"])]
    assert len(consumed) == 20
    after = run(3, **common, global_batch_size=6, state_in=before[0]["state"])
    assert sorted(consumed + [i for r in after for i in flat(r["batches"])]) == list(range(61))


def test_global_batches_are_the_same_on_any_world() -> None:
    """global_batch_size=12 over 1, 2, 3, 4 ranks (and workers): the same sample set at
    every step."""
    def steps(res: list[dict[str, Any]]) -> list[list[int]]:
        k = max(len(r["batches"]) for r in res)
        return [sorted(i for r in res for i in (r["batches"][s] if s < len(r["batches"])
                                                else [])) for s in range(k)]

    common: dict[str, Any] = dict(n=41, seed=4, epoch=1, uneven="pad", global_batch_size=12)
    ref = steps(run(1, **common))
    assert sorted(i for s in ref for i in s) == list(range(41))
    for world, workers in ((2, 0), (3, 2), (4, 0)):
        assert steps(run(world, **common, workers=workers)) == ref, world


# ---- configurations that differ, ranks that stall, die or iterate alone -----------------
@pytest.mark.parametrize("key, values", [("batch_size_by_rank", {"1": 5})])
def test_mismatched_configuration_refused_on_every_rank(key: str, values: Any) -> None:
    res = run(2, n=40, batch_size=4, **{key: values})
    for r in res:
        assert r["error"] is not None and r["error"].startswith("ConfigMismatchError")
        assert "batch_size: rank 0=4, rank 1=5" in r["error"]
        assert r["batches"] == []


@settings(deadline=None, max_examples=10)
@given(world=st.integers(2, 4), data=st.data())
def test_a_batch_size_that_differs_on_one_rank_is_named_on_every_rank(world: int,
                                                                      data: Any) -> None:
    odd = data.draw(st.integers(0, world - 1))
    res = run(world, n=40, batch_size=4, batch_size_by_rank={str(odd): 3})
    for r in res:
        assert r["mismatch_error"] and f"rank {odd}=3" in r["error"], r["error"]


@pytest.mark.parametrize("data", ["map", "iter"])
def test_one_rank_iterating_alone_is_refused_at_once(data: str) -> None:
    """Refused by the next message (ConfigMismatchError), not after the 300 s timeout."""
    res = run(2, data=data, n=400, lengths=[300, 300], batch_size=2, peek_rank=0, timeout=300)
    for r in res:
        assert r["mismatch_error"], r
        assert "iterate the loader on every rank" in r["error"]


@pytest.mark.parametrize("n, world", [(300, 3), (6000, 3)])
def test_stalled_rank_makes_the_others_raise_within_timeout(n: int, world: int) -> None:
    """Rank 1 stops participating at step 3: the others raise DataTimeoutError at a
    heartbeat or at the end-of-pass confirmation, naming their step (test_loader's
    short-epoch and long-epoch stall tests)."""
    res = run_ranks(world, lambda b: loader_run(b, dict(n=n, batch_size=2, timeout=0.5,
                                                         stall=[1, 3])))
    assert isinstance(res[1], RankStalled)
    for r in (res[0], res[2]):
        assert r["error"] is not None and r["timeout_error"], r["error"]
        assert 3 <= len(r["batches"]) <= n // (2 * world)
        assert f"this rank is at step {len(r['batches'])}" in r["error"], r["error"]
        assert "waited more than 0.5 s" in r["error"]


@pytest.mark.parametrize("data", ["map", "iter"])
def test_killed_rank_makes_the_others_raise(data: str) -> None:
    res = run_ranks(3, lambda b: loader_run(b, dict(
        data=data, n=3000, lengths=[1000] * 3, batch_size=2, kill=[1, 5])))
    assert isinstance(res[1], RankDied)
    for r in (res[0], res[2]):
        assert r["error"] is not None and r["rank_failure"], r["error"]
        assert "rank" in r["error"] and "step" in r["error"]
        assert 5 <= len(r["batches"]) < 500


def test_a_rank_that_skips_an_epoch_is_refused_on_every_rank() -> None:
    """A rank one pass ahead of the others: its messages pair with theirs and every rank
    raises ConfigMismatchError (the faults matrix's skip_epoch)."""
    from toy_data import Ids

    import horovod_iter as hi

    def fn(b: Any) -> Any:
        loader = hi.DistributedLoader(Ids(40), batch_size=2, backend=b, timeout=60)
        for epoch in range(3):
            if b.rank == 0 and epoch == 1:
                continue
            loader.set_epoch(epoch)
            list(loader)

    res = run_ranks(2, fn)
    assert all(isinstance(e, hi.ConfigMismatchError) for e in res), res
