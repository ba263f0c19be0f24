"""In-process twins of the launched tests of tests/test_sharded.py and tests/test_canonical.py:
ShardedDataset (default and canonical layouts) and stateful iterables through the loader on a
thread world of 1-4 ranks, with the configuration of tests/workers/sharded_run.py."""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from inproc_run import ids, sharded_run, write_shards
from thread_world import run_all

import horovod_iter as hi

pytestmark = pytest.mark.filterwarnings("ignore:rank .* uneven='stop' ended:RuntimeWarning",
                                        "ignore:rank .* the resumed epoch:RuntimeWarning")
LAYOUTS = {"few": [7, 5], "many": [3, 9, 0, 4, 11, 6, 2, 8, 5, 1, 7, 3],
           "empty": [0, 6, 0, 0, 9], "huge": [1, 400, 2, 3]}
FUNCTION = [HealthCheck.function_scoped_fixture]


def run(world: int, **cfg: Any) -> list[dict[str, Any]]:
    return run_all(world, lambda b: sharded_run(b, cfg))


def errors(res: list[dict[str, Any]]) -> list[Any]:
    return [r["error"] for r in res]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_record_exactly_once_and_a_new_order_each_epoch(workers: int, layout: str,
                                                              tmp_path: Path) -> None:
    total = write_shards(tmp_path, LAYOUTS[layout])
    world = 3 if layout != "huge" else 2
    res = run(world, dir=str(tmp_path), batch_size=4, workers=workers, epochs=[0, 1])
    assert errors(res) == [None] * world
    for e in (0, 1):
        assert sorted(ids(res, e)) == list(range(total)), (layout, e)
        assert len({len(r["epochs"][str(e)]) for r in res}) == 1  # lockstep
    if layout == "many":
        assert ids(res, 0) != ids(res, 1)


@settings(deadline=None, max_examples=20, suppress_health_check=FUNCTION)
@given(sizes=st.lists(st.integers(0, 12), min_size=1, max_size=9), world=st.integers(1, 4),
       batch=st.integers(1, 4), uneven=st.sampled_from(["pad", "stop"]))
def test_any_shard_list_on_any_world(sizes: list[int], world: int, batch: int, uneven: str,
                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    """pad: every record once; stop: equal step counts, no record twice; a layout that
    leaves a rank without a shard under stop is refused on every rank."""
    d = tmp_path_factory.mktemp("shards")
    total = write_shards(d, sizes)
    res = run(world, dir=str(d), batch_size=batch, uneven=uneven)
    if uneven == "pad":
        assert errors(res) == [None] * world
        assert sorted(ids(res)) == list(range(total))
    elif all(r["error"] is None for r in res):
        got = ids(res)
        assert len(got) == len(set(got)) and set(got) <= set(range(total))
        assert len({len(r["epochs"]["0"]) for r in res}) == 1
    else:
        assert all(r["error"].startswith("ShardingError") for r in res), errors(res)
        assert len(sizes) < world  # the only reason: a rank without a shard


@pytest.mark.parametrize("world, workers, sizes", [(2, 2, [7, 5]), (2, 0, [12]), (3, 0, [7, 5])])
def test_fewer_shards_than_ranks_under_stop_is_refused_on_every_rank(
        world: int, workers: int, sizes: list[int], tmp_path: Path) -> None:
    total = write_shards(tmp_path, sizes)
    res = run(world, dir=str(tmp_path), batch_size=2, workers=workers, uneven="stop")
    for r in res:
        assert r["error"] and r["error"].startswith("ShardingError"), r
        assert "would train on nothing" in r["error"] and "uneven='pad'" in r["error"]
    res = run(world, dir=str(tmp_path), batch_size=2, workers=workers, uneven="pad")
    assert errors(res) == [None] * world
    assert sorted(ids(res)) == list(range(total))


def test_stop_that_leaves_a_ranks_data_unread_warns(tmp_path: Path) -> None:
    write_shards(tmp_path, [40, 4])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run(2, dir=str(tmp_path), batch_size=2, uneven="stop")
    assert errors(res) == [None] * 2
    assert [len(r["epochs"]["0"]) for r in res] == [2, 2]
    warned = [str(w.message) for w in caught if "uneven='pad'" in str(w.message)
              and issubclass(w.category, RuntimeWarning)]
    assert len(warned) == 1 and "more batches" in warned[0]  # the rank with data left only


@settings(deadline=None, max_examples=12, suppress_health_check=FUNCTION)
@given(before=st.tuples(st.integers(1, 4), st.sampled_from([0, 0, 1, 2])),
       after=st.tuples(st.integers(1, 4), st.sampled_from([0, 0, 1, 2])),
       stop=st.integers(1, 5))
def test_checkpoint_mid_epoch_resumes_on_another_world_exactly_once(
        before: tuple[int, int], after: tuple[int, int], stop: int,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    d = tmp_path_factory.mktemp("shards")
    total = write_shards(d, LAYOUTS["many"])
    (n1, w1), (n2, w2) = before, after
    first = run(n1, dir=str(d), batch_size=3, workers=w1, stop_after=stop, epochs=[1])
    assert errors(first) == [None] * n1
    assume("state" in first[0])
    rest = run(n2, dir=str(d), batch_size=3, workers=w2, state_in=first[0]["state"],
               epochs=[1])
    assert errors(rest) == [None] * n2
    seen = ids(first, 1) + ids(rest, 1)
    assert sorted(seen) == list(range(total)), Counter(Counter(seen).values())


def test_checkpoint_mid_epoch_resumes_on_more_ranks_with_workers(tmp_path: Path) -> None:
    total = write_shards(tmp_path, LAYOUTS["many"])
    first = run(3, dir=str(tmp_path), batch_size=3, workers=0, stop_after=3, epochs=[1])
    assert len(ids(first, 1)) == 3 * 3 * 3
    rest = run(4, dir=str(tmp_path), batch_size=3, workers=2, state_in=first[0]["state"],
               epochs=[1])
    assert sorted(ids(first, 1) + ids(rest, 1)) == list(range(total))


def test_ranks_with_different_shard_lists_are_refused_on_every_rank(tmp_path: Path) -> None:
    write_shards(tmp_path, [4] * 6)
    res = run(2, dir=str(tmp_path), batch_size=2, reversed_on_rank=1)
    for r in res:
        assert r["error"] is not None and r["error"].startswith("ConfigMismatchError"), r
        assert "dataset: rank 0=" in r["error"] and r["epochs"] == {}


def test_state_dict_on_rank_0_alone_is_an_error_not_a_hang(tmp_path: Path) -> None:
    write_shards(tmp_path, [9] * 8)
    res = run(2, dir=str(tmp_path), batch_size=2, stop_after=2, state_on_rank0_only=True)
    assert res[0]["error"] is not None
    assert "call loader.state_dict() on every rank at the same step" in res[0]["error"]
    assert res[1]["error"] is not None  # no silent success


@pytest.mark.parametrize("workers", [0, 2])
def test_a_read_that_raises_names_the_shard_and_the_rank(workers: int, tmp_path: Path) -> None:
    write_shards(tmp_path, [4] * 6)
    res = run(2, dir=str(tmp_path), batch_size=2, raise_shard=4, workers=workers)
    errs = [r["error"] for r in res if r["error"]]
    assert any("s004.jsonl" in e and "disk read error" in e and "rank" in e for e in errs), res
    assert all(isinstance(r["exception"], hi.HorovodIterError) or "s004" in r["error"]
               for r in res)


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_iterable_resumes_without_replay(workers: int, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = run(2, stateful_stream=48, batch_size=4, stop_after=4, workers=workers,
                gen_dir=str(tmp_path / "a"))
    assert errors(first) == [None] * 2
    rest = run(2, stateful_stream=48, batch_size=4, state_in=first[0]["state"],
               workers=workers, gen_dir=str(tmp_path / "b"))
    assert errors(rest) == [None] * 2
    for a, b in zip(first, rest):
        seen = sorted(i % 1_000_000 for bt in a["epochs"]["0"] + b["epochs"]["0"] for i in bt)
        assert seen == list(range(48))
        assert b["generated"] == 48 - 16  # exactly the rest: no replay of the 16 consumed


@pytest.mark.parametrize("workers", [0, 2])
def test_len_is_the_steps_every_rank_takes_together(workers: int, tmp_path: Path) -> None:
    write_shards(tmp_path, [9, 30, 4, 17, 11])
    res = run(2, dir=str(tmp_path), batch_size=4, workers=workers, uneven="pad",
              with_sizes=True, epochs=[0, 1])
    for e in ("0", "1"):
        lens = {r["len"][e] for r in res}
        steps = {len(r["epochs"][e]) for r in res}
        assert len(lens) == 1 and lens == steps, (lens, steps)


# ---- the canonical layout (test_canonical.py's launches) --------------------------------
SIZES = [37, 50, 12, 80, 5, 61, 44, 20, 0, 33, 71, 9, 40, 26, 58]  # 546 records
CANON: dict[str, Any] = dict(canonical=[12, 2], global_batch_size=24, interleave=4)
FULL = 546 // 24 // 2 * 2


def steps_of(res: list[dict[str, Any]], epoch: int) -> list[list[int]]:
    n = max(len(r["epochs"][str(epoch)]) for r in res)
    return [sorted(i for r in res if k < len(r["epochs"][str(epoch)])
                   for i in r["epochs"][str(epoch)][k]) for k in range(n)]


@pytest.fixture(scope="module")
def canon_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("canon")
    write_shards(d, SIZES)
    return d


@pytest.fixture(scope="module")
def canon_ref(canon_dir: Path) -> list[list[list[int]]]:
    res = run(1, dir=str(canon_dir), workers=0, epochs=[0, 1], **CANON)
    return [steps_of(res, e) for e in (0, 1)]


@pytest.mark.parametrize("world, workers", [(1, 2), (2, 0), (2, 2), (3, 0), (4, 2)])
def test_canonical_global_batches_are_the_same_on_any_world(
        world: int, workers: int, canon_dir: Path, canon_ref: list[Any]) -> None:
    res = run(world, dir=str(canon_dir), workers=workers, epochs=[0, 1], **CANON)
    assert errors(res) == [None] * world, res
    for e in (0, 1):
        assert sorted(ids(res, e)) == list(range(546)), (world, workers, e)
        assert steps_of(res, e)[:FULL] == canon_ref[e][:FULL]
    assert canon_ref[0] != canon_ref[1]


@settings(deadline=None, max_examples=8)
@given(before=st.tuples(st.sampled_from([1, 2, 3, 4]), st.sampled_from([0, 2])),
       after=st.tuples(st.sampled_from([1, 2, 3, 4]), st.sampled_from([0, 2])),
       stop=st.integers(1, 10))
@pytest.mark.usefixtures("canon_dir")
def test_canonical_state_saved_on_rank_0_alone_resumes_on_another_world_exactly(
        before: tuple[int, int], after: tuple[int, int], stop: int, canon_dir: Path,
        canon_ref: list[Any]) -> None:
    (n1, w1), (n2, w2) = before, after
    first = run(n1, dir=str(canon_dir), workers=w1, epochs=[1], stop_after=stop,
                rank0_saves=True, **CANON)
    assert errors(first) == [None] * n1, first
    state = first[0]["state"]
    assert state["dataset"]["positions"]  # a count, not a gather
    rest = run(n2, dir=str(canon_dir), workers=w2, epochs=[1], state_in=state, **CANON)
    assert errors(rest) == [None] * n2, rest
    seen = ids(first, 1) + ids(rest, 1)
    assert sorted(seen) == list(range(546)), Counter(Counter(seen).values())
    assert steps_of(first, 1) == canon_ref[1][:stop]
    assert steps_of(rest, 1)[:FULL - stop] == canon_ref[1][stop:FULL]
