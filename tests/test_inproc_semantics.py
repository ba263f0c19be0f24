"""In-process twins of the launched tests of tests/test_semantics.py (the grid of loader
configurations against torch's DataLoader + DistributedSampler), tests/test_sampler.py (ranks
agree without communicating; seed=None broadcast) and tests/test_backend.py (the collectives),
on a thread world."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from inproc_run import grid_run
from test_semantics import _check_grid, _grid
from thread_world import ThreadBackend, run_all, run_ranks

import horovod_iter as hi


@pytest.mark.parametrize("world", [2, 3, 4])
def test_grid_on_a_thread_world_equals_torch(world: int) -> None:
    grid = _grid(range(1, 41, 3), range(1, 6, 2))
    res = run_all(world, lambda b: grid_run(b, {"grid": grid, "workers": 0, "passes": 2}))
    _check_grid(res, grid, world)


def test_grid_on_a_thread_world_with_workers() -> None:
    grid = [[5, 2, False, False], [23, 2, True, True]]  # each pass starts 4 workers
    res = run_all(2, lambda b: grid_run(b, {"grid": grid, "workers": 2, "passes": 2}))
    _check_grid(res, grid, 2)


@settings(deadline=None, max_examples=20)
@given(n=st.integers(1, 40), world=st.integers(1, 4), batch=st.integers(1, 5),
       drop_last=st.booleans(), shuffle=st.booleans())
def test_any_configuration_on_any_world_equals_torch(n: int, world: int, batch: int,
                                                     drop_last: bool, shuffle: bool) -> None:
    grid = [[n, batch, drop_last, shuffle]]
    res = run_all(world, lambda b: grid_run(b, {"grid": grid, "workers": 0, "passes": 2}))
    _check_grid(res, grid, world)


@pytest.mark.parametrize("seed", [None, 11])
@pytest.mark.parametrize("world", [1, 3, 4])
def test_ranks_agree_without_communicating(seed: int | None, world: int) -> None:
    """Each rank's sampler, built with backend=: a partition of the data every epoch, a new
    order each epoch; seed=None draws rank 0's seed and broadcasts it."""
    n = 1001

    def fn(b: ThreadBackend) -> dict[str, Any]:
        s = hi.DistributedSampler(n, seed=seed, pad=False, backend=b)
        out: dict[str, Any] = {"rank": s.rank, "world": s.num_replicas, "seed": s.seed,
                               "epochs": []}
        for epoch in range(3):
            s.set_epoch(epoch)
            out["epochs"].append(list(s))
        return out

    res = run_all(world, fn)
    assert [v["rank"] for v in res] == list(range(world))
    assert {v["world"] for v in res} == {world}
    assert len({v["seed"] for v in res}) == 1
    if seed is not None:
        assert res[0]["seed"] == 11
    for e in range(3):
        assert sorted(i for v in res for i in v["epochs"][e]) == list(range(n))
    assert res[0]["epochs"][0] != res[0]["epochs"][1]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_and_collectives(world: int) -> None:
    """tests/workers/backend_facts.py's checks on the thread backend."""
    def fn(b: ThreadBackend) -> dict[str, Any]:
        t = torch.tensor([b.rank + 1, 10 * (b.rank + 1)], dtype=torch.int64)
        h = b.allreduce_async(t.clone(), "sum")
        return {"rank": b.rank, "size": b.size, "sum": b.allreduce(t, "sum").tolist(),
                "async_sum": h.wait(30).tolist(), "min": b.allreduce(t, "min").tolist(),
                "max": b.allreduce(t, "max").tolist(), "input": t.tolist(),
                "bcast": b.broadcast_object({"from": b.rank}, root=world - 1),
                "gather": b.allgather_object(b.rank * b.rank)}

    w = world
    for r, v in enumerate(run_all(world, fn)):
        assert (v["rank"], v["size"]) == (r, w)
        assert v["sum"] == v["async_sum"] == [w * (w + 1) // 2, 10 * w * (w + 1) // 2]
        assert v["min"] == [1, 10] and v["max"] == [w, 10 * w]
        assert v["input"] == [r + 1, 10 * (r + 1)]
        assert v["bcast"] == {"from": w - 1} and v["gather"] == [i * i for i in range(w)]


def test_async_wait_times_out_instead_of_hanging() -> None:
    """tests/workers/timeout_wait.py: rank 1 never joins the op; rank 0's bounded wait
    raises DataTimeoutError naming the op and the timeout."""
    def fn(b: ThreadBackend) -> Any:
        if b.rank == 1:
            b.stall()
        return b.allreduce_async(torch.tensor([1]), name="the test op").wait(
            0.3, what="the test op")

    res = run_ranks(2, fn)
    err = res[0]
    assert isinstance(err, hi.DataTimeoutError)
    assert "rank 0 of 2" in str(err) and "the test op" in str(err) and "0.3 s" in str(err)


@pytest.mark.parametrize("world", [2, 3])
def test_pad_evaluation_gathers_every_sample_once_with_gather_rows(world: int) -> None:
    """tests/test_frameworks.py's gather_rows case without accelerate: uneven="pad" over 17
    samples (some ranks' last batches empty); gather_rows(backend=) gathers every output once,
    in rank order, whatever the row counts."""
    def fn(b: ThreadBackend) -> list[int]:
        loader = hi.DistributedLoader(list(range(17)), batch_size=4, uneven="pad",
                                      shuffle=False, backend=b)
        mine = torch.cat([x for x in loader]) if len(loader) else torch.zeros(0)
        return hi.gather_rows(mine, backend=b).tolist()

    res = run_all(world, fn)
    assert all(r == res[0] for r in res) and sorted(res[0]) == list(range(17))
