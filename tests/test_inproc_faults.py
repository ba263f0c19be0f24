"""In-process twins of tests/test_faults.py and tests/test_failures.py: the fault matrix of
scripts/faults.py (a rank killed, frozen, raising in the trainer's code or in its dataset,
interrupted, leaving the loop, a pass ahead) over the data kinds, `uneven` modes and worlds, on a
thread world. The contract: every other rank raises one of our errors (no hang: run_ranks
reports one with the stacks); without a fault every sample is trained exactly once. Exit codes,
leftover processes and the launchers' grace periods need real launches: they stay in
test_faults.py (a few by default, the rest under -m slow)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inproc_run import loader_run
from thread_world import RankDied, RankStalled, ThreadBackend, run_all, run_ranks
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import horovod_iter as hi

pytestmark = pytest.mark.filterwarnings("ignore:rank .* uneven='stop' ended:RuntimeWarning")
FAULTS = ("none", "kill", "stop", "sleep", "raise", "sigint", "dataset_raise",
          "dataset_stall", "leave", "skip_epoch")
DATA = ("list", "tensor", "custom", "iterable", "sharded")
OURS = (hi.DataTimeoutError, hi.RankFailureError, hi.ConfigMismatchError, hi.SampleError)
TIMEOUT = 0.5  # what a survivor waits for the faulty rank (only stalls cost it)


class _Armed:
    """The faulty rank's dataset fault: fires once armed (at the fault's step)."""

    def __init__(self, b: ThreadBackend, fault: str, faulty: bool) -> None:
        self.b, self.fault, self.faulty, self.armed = b, fault, faulty, False

    def __call__(self) -> None:
        if self.faulty and self.armed:
            if self.fault == "dataset_raise":
                raise KeyError("injected: corrupt record")
            if self.fault == "dataset_stall":
                self.b.stall()


class Custom(Dataset):
    def __init__(self, n: int, fire: _Armed) -> None:
        self.n, self.fire = n, fire

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.fire()
        return {"id": torch.tensor(i), "x": torch.full((2,), float(i))}


class Listing(list):  # type: ignore[type-arg]
    def __init__(self, items: Any, fire: _Armed) -> None:
        super().__init__(items)
        self.fire = fire

    def __getitem__(self, i: Any) -> Any:
        self.fire()
        return super().__getitem__(i)


class Tensors(TensorDataset):
    def __init__(self, t: torch.Tensor, fire: _Armed) -> None:
        super().__init__(t)
        self.fire = fire

    def __getitem__(self, i: int) -> Any:
        self.fire()
        return super().__getitem__(i)


class PerRank(IterableDataset):
    """Rank r yields its own ids, a few more on higher ranks (uneven on purpose)."""

    def __init__(self, n: int, b: ThreadBackend, fire: _Armed) -> None:
        self.lengths = [n // b.size + 3 * r for r in range(b.size)]
        self.rank, self.fire = b.rank, fire

    def __iter__(self) -> Any:
        first = sum(self.lengths[:self.rank])
        for i in range(first, first + self.lengths[self.rank]):
            self.fire()
            yield {"id": torch.tensor(i), "x": torch.full((2,), float(i))}


class ReadShard:
    def __init__(self, fire: _Armed) -> None:
        self.fire = fire

    def __call__(self, path: str) -> Any:
        with open(path) as f:
            for line in f:
                self.fire()
                yield json.loads(line)["id"]


def ids_of(batch: Any) -> list[int]:
    if isinstance(batch, dict):
        return batch["id"].tolist()
    if isinstance(batch, (list, tuple)):
        return batch[0].tolist()
    return batch.tolist()


def fault_run(b: ThreadBackend, cfg: dict[str, Any]) -> dict[str, Any]:
    """scripts/fault_worker.py on one thread rank (DataLoader workers: none)."""
    fault, faulty = cfg["fault"], b.rank == cfg["frank"]
    fire = _Armed(b, fault, faulty)
    n, kind = cfg["n"], cfg["data"]
    ds: Any
    if kind == "list":
        ds = Listing(range(n), fire)
    elif kind == "tensor":
        ds = Tensors(torch.arange(n), fire)
    elif kind == "custom":
        ds = Custom(n, fire)
    elif kind == "iterable":
        ds = PerRank(n, b, fire)
    else:
        shards = sorted(str(p) for p in Path(cfg["dir"]).glob("*.jsonl"))
        ds = hi.ShardedDataset(shards, ReadShard(fire), seed=1, rank=b.rank,
                               num_replicas=b.size)
    loader = hi.DistributedLoader(ds, batch_size=4, uneven=cfg["uneven"],
                                  timeout=cfg["timeout"], backend=b)
    seen: dict[str, list[int]] = {}
    step = 0
    epoch = 0
    while epoch < cfg["epochs"]:  # an error propagates: the rank's result is the exception
        loader.set_epoch(epoch)
        seen[str(epoch)] = ids = []
        action = None
        for batch in loader:
            ids.extend(ids_of(batch))
            if faulty and step == cfg["fstep"]:
                action = inject(b, fault, fire)
                if action:
                    break
            step += 1
        if action == "leave":  # this rank is done: it returns (its process exits)
            return {"error": None, "seen": seen, "left": True}
        epoch += 1
    return {"error": None, "seen": seen}


def inject(b: ThreadBackend, fault: str, fire: _Armed) -> str | None:
    if fault in ("dataset_raise", "dataset_stall"):
        fire.armed = True
    elif fault == "kill":
        b.die()
    elif fault in ("stop", "sleep"):
        b.stall()
    elif fault == "raise":
        raise RuntimeError(f"injected: the trainer's code raised on rank {b.rank}")
    elif fault == "sigint":
        raise KeyboardInterrupt
    elif fault in ("leave", "skip_epoch"):
        return "leave" if fault == "leave" else "skip"
    return None


def write_shards(d: Path, n: int, per: int = 10) -> None:
    for s, k in enumerate(range(0, n, per)):
        (d / f"s{s:03d}.jsonl").write_text(
            "".join(json.dumps({"id": i}) + "\n" for i in range(k, min(n, k + per))))


def expected_ids(data: str, n: int, world: int) -> list[int] | None:
    if data == "iterable":
        return None  # the ranks' streams differ in length: checked for repeats only
    return list(range(n))


def check_case(fault: str, data: str, uneven: str, world: int, frank: int, fstep: int,
               shards: Path, n: int = 120) -> None:
    cfg = dict(fault=fault, frank=frank, fstep=fstep, data=data, uneven=uneven,
               timeout=TIMEOUT if fault != "none" else 60, n=n, epochs=3, dir=str(shards))
    res = run_ranks(world, lambda b: fault_run(b, cfg))
    if fault == "none":
        for e in ("0", "1", "2"):
            got = sorted(i for r in res for i in r["seen"][e])
            want = expected_ids(data, n, world)
            if want is None:
                assert len(got) == len(set(got)), e
            elif uneven == "pad":
                assert got == want, e
            else:
                assert set(got) <= set(want) and len(set(got)) >= n - 4 * world * 2, e
        return
    own = res[frank]
    if fault == "kill":
        assert isinstance(own, RankDied)
    elif fault in ("stop", "sleep", "dataset_stall"):
        assert isinstance(own, RankStalled)
    elif fault == "sigint":
        assert isinstance(own, KeyboardInterrupt)
    elif fault == "raise":
        assert isinstance(own, RuntimeError) and "injected" in str(own)
    elif fault == "leave":
        assert own["left"] and own["error"] is None
    for r in range(world):
        if r == frank:
            continue
        err = res[r]["error"] if isinstance(res[r], dict) else res[r]
        assert isinstance(err, OURS), (r, err)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fault-shards")
    write_shards(d, 120)
    return d


# the CI sample of tests/test_faults.py, with both launchers' cases merged
SAMPLE = [
    ("none", "list", "pad", 2, 0), ("none", "sharded", "pad", 3, 2),
    ("none", "iterable", "pad", 2, 0), ("kill", "custom", "stop", 3, 1),
    ("kill", "sharded", "pad", 2, 1), ("stop", "tensor", "pad", 2, 1),
    ("stop", "custom", "stop", 2, 1), ("sleep", "iterable", "pad", 2, 1),
    ("sleep", "list", "stop", 3, 2), ("raise", "sharded", "stop", 2, 1),
    ("raise", "tensor", "pad", 2, 1), ("sigint", "custom", "pad", 2, 1),
    ("sigint", "iterable", "stop", 2, 1), ("dataset_raise", "iterable", "stop", 2, 1),
    ("dataset_raise", "custom", "pad", 3, 1), ("dataset_stall", "custom", "stop", 2, 1),
    ("dataset_stall", "sharded", "pad", 2, 1), ("leave", "custom", "stop", 2, 0),
    ("leave", "tensor", "pad", 2, 1), ("skip_epoch", "iterable", "pad", 2, 1),
    ("skip_epoch", "sharded", "pad", 2, 0),
]


def test_the_sample_covers_every_fault() -> None:
    assert {c[0] for c in SAMPLE} == set(FAULTS)


@pytest.mark.parametrize("fault, data, uneven, world, frank", SAMPLE,
                         ids=["-".join(map(str, c)) for c in SAMPLE])
def test_fault_ends_every_rank_with_our_error(fault: str, data: str, uneven: str, world: int,
                                             frank: int, shards: Path) -> None:
    check_case(fault, data, uneven, world, frank, fstep=5, shards=shards)


@settings(deadline=None, max_examples=25, suppress_health_check=[
    HealthCheck.function_scoped_fixture])
@given(fault=st.sampled_from(FAULTS), data=st.sampled_from(DATA),
       uneven=st.sampled_from(["stop", "pad"]), world=st.integers(2, 4), st_=st.data())
def test_the_fault_matrix(fault: str, data: str, uneven: str, world: int, st_: Any,
                          shards: Path) -> None:
    frank = st_.draw(st.integers(0, world - 1))
    fstep = st_.draw(st.integers(0, 6))
    check_case(fault, data, uneven, world, frank, fstep, shards)


# ---- tests/workers/fault_cases.py ---------------------------------------------------------
def test_one_rank_evaluating_alone_is_refused_at_once_on_every_rank() -> None:
    """Rank 0 iterates an evaluation loader alone mid-training: ConfigMismatchError on every
    rank from the next message - not a DataTimeoutError after the 300 s timeout."""
    def fn(b: ThreadBackend) -> Any:
        train = hi.DistributedLoader(list(range(4000)), batch_size=2, timeout=300, backend=b)
        evaluation = hi.DistributedLoader(list(range(100)), batch_size=2, timeout=300,
                                          backend=b)
        for step, _ in enumerate(train):
            if step == 5 and b.rank == 0:
                for _ in evaluation:
                    pass

    res = run_ranks(2, fn)
    for e in res:
        assert type(e) is hi.ConfigMismatchError, e
        assert "iterate the loader on every rank" in str(e)


class Mine(IterableDataset):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __iter__(self) -> Any:
        yield from range(12 if self.rank == 0 else 0)


def test_padding_batches_keep_the_scripts_own_class() -> None:
    @dataclasses.dataclass
    class Local:
        ids: torch.Tensor

    def fn(b: ThreadBackend) -> Any:
        loader = hi.DistributedLoader(Mine(b.rank), batch_size=4, uneven="pad", timeout=30,
                                      collate_fn=lambda s: Local(torch.tensor(s)), backend=b)
        batches = list(loader)
        return [len(x.ids) for x in batches], all(type(x) is Local for x in batches)

    res = run_all(2, fn)
    assert res[0] == ([4, 4, 4], True) and res[1] == ([0, 0, 0], True)


def test_iterating_after_the_backend_is_closed_raises_our_error() -> None:
    def fn(b: ThreadBackend) -> Any:
        loader = hi.DistributedLoader(list(range(40)), batch_size=2, timeout=30, backend=b)
        first = len(list(loader))
        b.close()
        try:
            list(loader)
        except hi.BackendError as e:
            return first, str(e)
        return first, None

    for first, err in run_all(2, fn):
        assert first == 10 and err is not None and "shut down" in err


def test_map_style_stall_in_getitem_is_noticed_mid_pass() -> None:
    """Rank 1's dataset stops in its 21st __getitem__ (step 10 of 10000): rank 0 hears no
    heartbeat and raises mid-pass, not at the end-of-pass confirmation (a heartbeat period is
    at most 1024 steps, two in flight: rank 0 stops within about 2100 steps, whatever the
    machine's load)."""
    def fn(b: ThreadBackend) -> Any:
        calls = [0]

        class Ids(Dataset):
            def __len__(self) -> int:
                return 40000

            def __getitem__(self, i: int) -> Any:
                calls[0] += 1
                if b.rank == 1 and calls[0] == 21:
                    b.stall()
                return {"id": torch.tensor(i), "x": torch.full((3,), float(i))}

        loader = hi.DistributedLoader(Ids(), batch_size=2, timeout=TIMEOUT, shuffle=False,
                                      backend=b)
        got = 0
        try:
            for _ in loader:
                got += 1
        except hi.DataTimeoutError as e:
            return got, e
        return got, None

    res = run_ranks(2, fn)
    assert isinstance(res[1], RankStalled)
    got, err = res[0]
    assert isinstance(err, hi.DataTimeoutError) and 10 <= got < 10000, (got, err)


@pytest.mark.parametrize("before, after", [(3, 2), (2, 4)])
def test_checkpoint_stop_resume_on_fewer_and_more_ranks_exactly_once(before: int,
                                                                     after: int) -> None:
    common: dict[str, Any] = dict(n=101, batch_size=3, uneven="pad", prefetch=3, workers=1,
                                  epoch=4)
    first = run_all(before, lambda b: loader_run(b, {**common, "stop_after": 5}))
    assert all(r["error"] is None for r in first)
    consumed = [i for r in first for bt in r["batches"] for i in bt]
    rest = run_all(after, lambda b: loader_run(b, {**common, "state_in": first[0]["state"]}))
    assert all(r["error"] is None for r in rest)
    assert len(consumed) == 5 * 3 * before
    assert sorted(consumed + [i for r in rest for bt in r["batches"] for i in bt]) == \
        list(range(101))
