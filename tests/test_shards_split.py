"""Pins `ShardedDataset`'s behaviour across its split into ``horovod_iter/shards/`` (issue 21;
the design review's step 8): which records each consumer reads, in which order, and the
states it saves must not change - the merged state is saved in users' checkpoints.

* ``test_golden_*``: a fixed grid of datasets (default layout: interleave, shuffle buffer,
  seeking reads or not, ``sizes`` or not, empty shards; canonical layouts) read by chains of
  passes on changing ranks x workers; every consumer's exact records, every state (per
  consumer and merged, key order included), ``shard_counts``, ``consumer_counts``, ``order``,
  ``len``, the canonical streams' records and the words of the errors, against
  ``tests/data/shards_golden.json``, written by the code before the split. Regenerate it
  (``python tests/test_shards_split.py``) only for an intended change of behaviour.
* Hypothesis: the deal (the consumer's plan), ``merge_states``, ``shard_counts`` and
  ``consumer_counts`` against a verbatim copy of the code before the split on generated shard
  lists and states; and every record exactly once across generated resume chains.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import pickle
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import horovod_iter as hi
from horovod_iter.permutation import permute
from horovod_iter.shards import deal
from horovod_iter.shards.deal import Position

GOLDEN = Path(__file__).parent / "data" / "shards_golden.json"
TYPE, VERSION = "horovod_iter.ShardedDataset", 2


# -- what the tests read through: the only lines that follow the code's move -----------------
def plan_of(ds: hi.ShardedDataset, consumer: int, consumers: int,
            state: dict[str, Any] | None) -> list[tuple[int, int]]:
    """The consumer's (shard, first record) list of a pass resumed from ``state``."""
    base = None if state is None else Position.from_state(state, len(ds.shards), ds.seed,
                                                          ds.shuffle)
    return deal.plan(ds.order(), consumer, consumers,
                     base if base is not None and base.epoch == ds.epoch else None)


def canonical_stream(ds: hi.ShardedDataset, j: int, epoch: int, start: int) -> list[Any]:
    """Canonical stream ``j`` of ``epoch`` from its record ``start`` on."""
    return list(ds.streams.stream(j, epoch, start))


# -- data ---------------------------------------------------------------------------------------
class Seek:
    """Shard ``"s<i>"`` has records ``i*1000 + 0 .. i*1000 + n-1``; reads from ``start=``."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def __call__(self, shard: str, start: int = 0) -> Iterator[int]:
        i = int(shard[1:])
        return iter(range(i * 1000 + start, i * 1000 + self.sizes[i]))


class Scan:
    """The same records, read from the start only (a resume skips by reading)."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def __call__(self, shard: str) -> Iterator[int]:
        i = int(shard[1:])
        return iter(range(i * 1000, i * 1000 + self.sizes[i]))


def make(case: dict[str, Any], rank: int, ranks: int) -> hi.ShardedDataset:
    sizes = case["sizes"]
    actual = case.get("actual", sizes)
    kw = {k: case[k] for k in ("shuffle", "seed", "interleave", "shuffle_buffer") if k in case}
    if case.get("known", True):
        kw["sizes"] = sizes
    if "canonical" in case:
        kw["canonical_ranks"], kw["canonical_workers"] = case["canonical"]
    read = Seek(actual) if case.get("seeks", True) else Scan(actual)
    return hi.ShardedDataset([f"s{i}" for i in range(len(sizes))], read, rank=rank,
                             num_replicas=ranks, **kw)


@contextlib.contextmanager
def worker(workers: int, j: int) -> Iterator[None]:
    """Be DataLoader worker ``j`` of ``workers`` (0 or 1: no workers) for the package."""
    info = SimpleNamespace(num_workers=workers, id=j) if workers > 1 else None
    mods = [m for name, m in list(sys.modules.items())
            if name.startswith("horovod_iter") and hasattr(m, "get_worker_info")]
    old = [(m, m.get_worker_info) for m in mods]
    for m in mods:
        m.get_worker_info = lambda: info
    try:
        yield
    finally:
        for m, f in old:
            m.get_worker_info = f


def error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def plain(x: Any) -> Any:
    """As JSON has it (tuples as lists), key order kept."""
    return json.loads(json.dumps(x))


# -- the golden grid ------------------------------------------------------------------------------
SIZES = {"mixed": [3, 0, 5, 2, 7, 1, 4], "even": [4, 4, 4, 4, 4], "one": [6], "none": []}
CHAINS = [((1, 1), (1, 1), (1, 1)), ((2, 1), (3, 1), (1, 1)), ((2, 2), (4, 1), (2, 1)),
          ((3, 1), (3, 1), (2, 2)), ((4, 2), (1, 1), (3, 1))]
EPOCHS = [(0, 0, 0), (1, 1, 2), (0, 0, 1)]


def default_cases() -> list[dict[str, Any]]:
    grid = list(itertools.product(SIZES, [True, False], [True, False], [0, 11], [1, 3, 64],
                                  [0, 4], [True, False], range(len(CHAINS)), range(len(EPOCHS))))
    picked = random.Random(2026).sample(grid, 90)
    picked += [("mixed", True, True, 0, 3, 0, True, 1, 0), ("mixed", False, True, 0, 64, 0,
               False, 2, 2), ("even", True, False, 11, 1, 4, True, 3, 0)]
    return [{"id": f"d{n}", "sizes": SIZES[s], "known": known, "shuffle": shuffle, "seed": seed,
             "interleave": inter, "shuffle_buffer": buf, "seeks": seeks, "chain": CHAINS[c],
             "epochs": EPOCHS[e]}
            for n, (s, known, shuffle, seed, inter, buf, seeks, c, e) in enumerate(picked)]


CSIZES = {"mixed": [5, 3, 8, 0, 6, 2, 7, 4], "even": [6, 6, 6, 6, 6, 6]}


def canonical_cases() -> list[dict[str, Any]]:
    out = []
    rng = random.Random(73)
    for n in range(40):
        r, k = rng.choice([(1, 1), (2, 1), (2, 2), (4, 2)])
        worlds = [(w, j) for w in (1, 2, 4) for j in (1, 2) if r % w == 0 and k % j == 0]
        chain = [(*rng.choice(worlds), rng.randint(0, 5)) for _ in range(3)]
        out.append({"id": f"c{n}", "sizes": CSIZES[rng.choice(list(CSIZES))],
                    "canonical": [r, k], "interleave": rng.choice([1, 2, 64]),
                    "shuffle": rng.random() < 0.8, "seed": rng.choice([0, 5]),
                    "g": r * rng.choice([1, 2, 3]), "drop": rng.random() < 0.3,
                    "seeks": rng.random() < 0.7, "chain": chain,
                    "epochs": rng.choice([(0, 0, 0), (0, 0, 1), (2, 2, 2)])})
    base = {"sizes": [5, 3, 8, 6], "canonical": [2, 1], "interleave": 2, "shuffle": True,
            "seed": 1, "g": 4, "drop": False, "seeks": True, "chain": [(2, 1, 1), (1, 1, 0)],
            "epochs": (0, 0)}
    out.append({**base, "id": "c-short", "actual": [5, 3, 7, 6]})
    out.append({**base, "id": "c-long", "actual": [5, 3, 9, 6]})
    return out


def run_default(case: dict[str, Any]) -> dict[str, Any]:
    probe = make(case, 0, 1)
    total = sum(case["sizes"])
    out: dict[str, Any] = {"fingerprint": probe.fingerprint(),
                           "order": [probe.order(e) for e in (0, 1, 2)], "stages": []}
    if case["known"]:
        out["consumer_counts"] = {c: probe.consumer_counts(c) for c in (1, 2, 3, 5)}
        out["len"] = [len(make(case, r, 3)) for r in range(3)]
    state: dict[str, Any] | None = None
    for n, ((ranks, workers), epoch) in enumerate(zip(case["chain"], case["epochs"])):
        consumers = ranks * workers
        last = n == len(case["chain"]) - 1
        rng = random.Random(f"{case['id']}:{n}")
        stage: dict[str, Any] = {}
        out["stages"].append(stage)
        try:
            stage["shard_counts"] = probe.shard_counts(consumers, state)
        except Exception as e:
            stage["shard_counts"] = error(e)
        try:
            streams, states = [], []
            ds = probe
            for c in range(consumers):
                rank, j = divmod(c, workers)
                ds = make(case, rank, ranks)
                if state is not None:
                    ds.load_state_dict(state)
                ds.set_epoch(epoch)
                take = None if last else rng.randint(0, math.ceil(total / consumers) + 1)
                with worker(workers, j):
                    it = iter(ds)
                streams.append(list(itertools.islice(it, take)))
                states.append(None if take == 0 else ds.state_dict())
            merged = ds.merge_states(states, consumers, state)
            stage.update(streams=streams, states=states, merged=merged)
            state = merged
        except Exception as e:
            stage["error"] = error(e)
            break
    return plain(out)


def run_canonical(case: dict[str, Any]) -> dict[str, Any]:
    r, k = case["canonical"]
    probe = make(case, 0, 1)
    out: dict[str, Any] = {"fingerprint": probe.fingerprint(), "stages": [], "streams": {}}
    for j in sorted({0, r * k - 1}):
        for e in (0, 1):
            for start in (0, 2, 7):
                try:
                    got: Any = canonical_stream(probe, j, e, start)
                except Exception as ex:
                    got = error(ex)
                out["streams"][f"{j}:{e}:{start}"] = got
    state: dict[str, Any] | None = None
    for (world, workers, steps), epoch in zip(case["chain"], case["epochs"]):
        stage: dict[str, Any] = {}
        out["stages"].append(stage)
        try:
            consumers: list[Any] = []
            ds = probe
            for rank in range(world):
                for j in range(workers):
                    ds = make(case, rank, world)
                    ds.set_batching(case["g"], case["drop"])
                    if state is not None:
                        ds.load_state_dict(state)
                    ds.set_epoch(epoch)
                    with worker(workers, j):
                        batches = ds.step_batches()
                    consumers.append([[list(b), ds.state_dict()] for b in batches])
            stage["consumers"] = consumers
            stage["layout"] = dataclasses.asdict(ds.layout(world, workers))
            stage["consumer_counts"] = ds.consumer_counts(world * workers)
            stage["len"] = len(ds)
            state = ds.canonical_state(steps, state, world, workers, {})
            stage["state"] = state
        except Exception as e:
            stage["error"] = error(e)
            break
    return plain(out)


def run_errors() -> dict[str, Any]:
    """The words of the checks: bad arguments, and states that do not fit the dataset."""
    out: dict[str, Any] = {}
    bad_args = {"shards": ("abc", {}), "read": ([1], {"read": None}),
                "shuffle": ([1], {"shuffle": 1}), "seed": ([1], {"seed": 1.5}),
                "sizes": ([1, 2], {"sizes": [1]}), "interleave": ([1], {"interleave": 0}),
                "buffer": ([1], {"shuffle_buffer": -1}), "ahead": ([1], {"download_ahead": -1}),
                "ranks": ([1], {"canonical_ranks": 0, "sizes": [1]}),
                "workers": ([1], {"canonical_ranks": 1, "canonical_workers": 0, "sizes": [1]}),
                "nosizes": ([1], {"canonical_ranks": 2}),
                "canbuf": ([1], {"canonical_ranks": 2, "sizes": [1], "shuffle_buffer": 2}),
                "timeout": ([1], {"timeout": -1}), "world": ([1], {"rank": 2})}
    for name, (shards, kw) in bad_args.items():
        read = kw.pop("read", Seek([1, 1]))
        kw.setdefault("rank", 0)
        try:
            hi.ShardedDataset(shards, read, num_replicas=2, **kw)  # type: ignore[arg-type]
            out[name] = None
        except Exception as e:
            out[name] = error(e)
    plain_case = {"sizes": [3, 4, 5], "seed": 2, "shuffle": True}
    can_case = {**plain_case, "canonical": [2, 1], "interleave": 2}
    ds, can = make(plain_case, 0, 1), make(can_case, 0, 1)
    good = ds.merge_states([None], 1)
    can.set_batching(4)
    cgood = can.canonical_state(1, None, 1, 1, {})
    states = {"none": None, "list": [], "empty": {}, "type": {"type": "x"},
              "version": {**good, "version": 1}, "seed": {**good, "seed": 3},
              "shards": {**good, "shards": 2}, "shuffle": {**good, "shuffle": False},
              "nodone": {k: v for k, v in good.items() if k != "done"},
              "badpartial": {**good, "partial": [[7, 1]]}, "neg": {**good, "partial": [[1, -1]]},
              "yielded": {**good, "yielded": [0, 0]}, "redealt": {**good, "redealt": 1},
              "canonical": cgood, "c-version": {**cgood, "version": 3},
              "c-sizes": {**cgood, "sizes": "x"}, "c-layout": {**cgood, "canonical": [4, 1]},
              "c-interleave": {**cgood, "interleave": 1},
              "c-positions": {**cgood, "positions": [1]}, "c-step": {**cgood, "step": -1},
              "c-none": {**cgood, "canonical": None}}
    for name, state in states.items():
        for which, d in (("plain", ds), ("canonical", can)):
            try:
                d.load_state_dict(state)
                out[f"{which}:{name}"] = None
            except Exception as e:
                out[f"{which}:{name}"] = error(e)
    for name, call in (("shard_counts", lambda: can.shard_counts(2)),
                       ("layout", lambda: ds.layout(1, 1)),
                       ("nobatch", lambda: make(can_case, 0, 1).layout(1, 1)),
                       ("nobatch-len", lambda: len(make(can_case, 0, 1))),
                       ("nosizes-len", lambda: len(make({**plain_case, "known": False}, 0, 1))),
                       ("layout-world", lambda: can.layout(3, 1)),
                       ("layout-workers", lambda: can.layout(1, 2)),
                       ("batch", lambda: (can.set_batching(3), can.layout(1, 1))),
                       ("epoch", lambda: ds.set_epoch(-1)),
                       ("set_world", lambda: ds.set_world(2, 2)),
                       ("batching", lambda: can.set_batching(0))):
        try:
            call()
            out[name] = None
        except Exception as e:
            out[name] = error(e)
    return plain(out)


def golden() -> dict[str, Any]:
    out: dict[str, Any] = {"cases": {}, "outputs": {}}
    for case in default_cases():
        out["cases"][case["id"]] = plain(case)
        out["outputs"][case["id"]] = run_default(case)
    for case in canonical_cases():
        out["cases"][case["id"]] = plain(case)
        out["outputs"][case["id"]] = run_canonical(case)
    out["outputs"]["errors"] = run_errors()
    return out


def _golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"cases": {}, "outputs": {}}


EXPECTED = _golden()


def same(got: Any, want: Any) -> None:
    assert got == want
    assert json.dumps(got) == json.dumps(want)  # the key order too: states are saved as JSON


@pytest.mark.parametrize("case_id", [c for c in EXPECTED["cases"] if c.startswith("d")])
def test_golden_default_layout(case_id: str) -> None:
    same(run_default(EXPECTED["cases"][case_id]), EXPECTED["outputs"][case_id])


@pytest.mark.parametrize("case_id", [c for c in EXPECTED["cases"] if c.startswith("c")])
def test_golden_canonical_layout(case_id: str) -> None:
    same(run_canonical(EXPECTED["cases"][case_id]), EXPECTED["outputs"][case_id])


def test_golden_errors() -> None:
    same(run_errors(), EXPECTED["outputs"]["errors"])


def test_the_golden_grid_is_the_one_pinned() -> None:
    """The cases on file are the ones this module builds (a grid edited by mistake would
    pin nothing), and they cover what they should."""
    assert GOLDEN.exists(), "run `python tests/test_shards_split.py` on the code to pin"
    cases = [*default_cases(), *canonical_cases()]
    assert [c["id"] for c in cases] == list(EXPECTED["cases"])
    assert [plain(c) for c in cases] == list(EXPECTED["cases"].values())
    outs = EXPECTED["outputs"]
    stages = [s for c in cases if c["id"].startswith("d") for s in outs[c["id"]]["stages"]]
    assert sum("merged" in s for s in stages) > 150
    assert any("error" in s for s in stages)  # the shuffle buffer on other consumers


@pytest.mark.parametrize("canonical", [False, True])
def test_a_pickled_dataset_reads_as_the_original(canonical: bool) -> None:
    """DataLoader workers get the dataset pickled: the same records, the same states."""
    case = {"sizes": [3, 0, 5, 2, 7], "seed": 4, "interleave": 2}
    if canonical:
        case["canonical"] = [2, 1]
    ds = make(case, 1, 2)
    if canonical:
        ds.set_batching(4)
        ds.layout(2, 1)  # fills the pieces' cache, which travels too
        want = [list(b) for b in ds.step_batches()]
        again = pickle.loads(pickle.dumps(ds))
        assert [list(b) for b in again.step_batches()] == want
    else:
        list(ds)
        want = list(ds)
        again = pickle.loads(pickle.dumps(ds))
        assert list(again) == want
    assert again.state_dict() == ds.state_dict()


# -- Hypothesis: the deal against the code before the split -------------------------------------
def ref_order(n: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    if not shuffle or not n:
        return list(range(n))
    return permute(np.arange(n), n, seed, epoch).tolist()


def ref_normalise(state: dict[str, Any]) -> dict[str, Any]:
    return {"epoch": int(state["epoch"]), "consumers": int(state["consumers"]),
            "redealt": state["redealt"],
            "done": {s for a, b in state["done"] for s in range(int(a), int(b))},
            "partial": {int(s): int(o) for s, o in state["partial"]},
            "yielded": [int(y) for y in state["yielded"]]}


def ref_plan(order: list[int], epoch: int, consumer: int, consumers: int,
             resume: dict[str, Any] | None) -> list[tuple[int, int]]:
    if resume is None or resume["epoch"] != epoch:
        return [(s, 0) for s in order[consumer::consumers]]
    done, partial = resume["done"], resume["partial"]
    if resume["consumers"] == consumers and not resume["redealt"]:
        return [(s, partial.get(s, 0)) for s in order[consumer::consumers] if s not in done]
    where = {s: p for p, s in enumerate(order)}
    todo = [(s, partial[s]) for s in sorted(partial, key=where.__getitem__)]
    todo += [(s, 0) for s in order if s not in done and s not in partial]
    return todo[consumer::consumers]


def ref_ranges(values: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][1] == v:
            out[-1][1] = v + 1
        else:
            out.append([v, v + 1])
    return out


def ref_merge(n: int, seed: int, shuffle: bool, epoch: int, states: list[Any], consumers: int,
              base: dict[str, Any] | None) -> dict[str, Any]:
    order = ref_order(n, shuffle, seed, epoch)
    b = ref_normalise(base) if base is not None else None
    if b is not None and b["epoch"] != epoch:
        b = None
    done = set(b["done"]) if b else set()
    partial = dict(b["partial"]) if b else {}
    for c, st_ in enumerate(states):
        if st_ is None:
            continue
        plan = ref_plan(order, epoch, c, consumers, b)
        for i in st_["finished"]:
            done.add(plan[i][0])
            partial.pop(plan[i][0], None)
        for i, offset in st_["offsets"]:
            if offset > 0:
                partial[plan[i][0]] = offset
    redealt = b is not None and (b["redealt"] or b["consumers"] != consumers)
    return {"type": TYPE, "version": VERSION, "epoch": epoch, "shards": n, "seed": seed,
            "shuffle": shuffle, "consumers": consumers, "redealt": redealt,
            "done": ref_ranges(sorted(done)), "partial": sorted([s, o] for s, o in partial.items()),
            # changed from the old code: a consumer that handed nothing out since the resume
            # keeps the base's count (the old 0 replayed another stream order, and with a
            # shuffle buffer repeated its records)
            "yielded": [st_["yielded"] if st_ else (
                b["yielded"][c] if b and b["consumers"] == consumers and not b["redealt"]
                else 0) for c, st_ in enumerate(states)]}


@st.composite
def merged_states(draw: st.DrawFn, n: int, seed: int, shuffle: bool) -> dict[str, Any]:
    """A merged state of this shard list, as `merge_states` writes them."""
    consumers = draw(st.integers(1, 5))
    shards = st.sampled_from(range(n)) if n else st.nothing()
    done = draw(st.sets(shards)) if n else set()
    partial = {s: draw(st.integers(1, 9)) for s in (draw(st.sets(shards)) if n else ())
               if s not in done}
    return {"type": TYPE, "version": VERSION, "epoch": draw(st.integers(0, 2)), "shards": n,
            "seed": seed, "shuffle": shuffle, "consumers": consumers,
            "redealt": draw(st.booleans()), "done": ref_ranges(sorted(done)),
            "partial": sorted([s, o] for s, o in partial.items()),
            "yielded": draw(st.lists(st.integers(0, 50), min_size=consumers,
                                     max_size=consumers))}


@settings(deadline=None, max_examples=150)
@given(data=st.data(), sizes=st.lists(st.integers(0, 9), max_size=12),
       shuffle=st.booleans(), seed=st.integers(-5, 2**40), epoch=st.integers(0, 2),
       consumers=st.integers(1, 6), resumed=st.booleans())
def test_deal_merge_and_counts_as_before_the_split(data: st.DataObject, sizes: list[int],
                                                   shuffle: bool, seed: int, epoch: int,
                                                   consumers: int, resumed: bool) -> None:
    n = len(sizes)
    ds = make({"sizes": sizes, "shuffle": shuffle, "seed": seed}, 0, 1)
    ds.set_epoch(epoch)
    order = ref_order(n, shuffle, seed, epoch)
    assert ds.order() == order
    assert ds.consumer_counts(consumers) == [sum(sizes[s] for s in order[c::consumers])
                                             for c in range(consumers)]
    base = data.draw(merged_states(n, seed, shuffle)) if resumed else None
    b = ref_normalise(base) if base is not None else None
    plans = [ref_plan(order, epoch, c, consumers, b) for c in range(consumers)]
    assert [plan_of(ds, c, consumers, base) for c in range(consumers)] == plans
    assert ds.shard_counts(consumers, base) == [len(p) for p in plans]
    states: list[Any] = []
    for c, plan in enumerate(plans):
        if data.draw(st.booleans()):
            states.append(None)
            continue
        finished = data.draw(st.sets(st.sampled_from(range(len(plan))))) if plan else set()
        offsets = [(i, data.draw(st.integers(0, 9))) for i in range(len(plan))
                   if i not in finished and data.draw(st.booleans())]
        states.append({"consumer": c, "consumers": consumers, "epoch": epoch,
                       "finished": sorted(finished), "offsets": offsets,
                       "yielded": data.draw(st.integers(0, 99))})
    got = ds.merge_states(states, consumers, base)
    same(got, ref_merge(n, seed, shuffle, epoch, states, consumers, base))


# -- Hypothesis: every record exactly once across resume chains --------------------------------
@settings(deadline=None, max_examples=60)
@given(sizes=st.lists(st.integers(0, 8), min_size=1, max_size=8), known=st.booleans(),
       seeks=st.booleans(), seed=st.integers(0, 9), interleave=st.integers(1, 4),
       chain=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 2)), min_size=1, max_size=3),
       cut=st.integers(0, 2**20))
def test_every_record_once_across_resumes(sizes: list[int], known: bool, seeks: bool,
                                          seed: int, interleave: int,
                                          chain: list[tuple[int, int]], cut: int) -> None:
    """Passes cut at any point on any ranks x workers, resumed from the merged state: each
    record once; on the same consumers never redealt, each consumer's very stream."""
    case = {"sizes": sizes, "known": known, "seeks": seeks, "seed": seed,
            "interleave": interleave}
    rng = random.Random(cut)
    read: list[int] = []
    state: dict[str, Any] | None = None
    chain = [*chain, (1, 1)]
    ranks0, workers0 = chain[0]
    full, heads = {}, {}  # consumer -> its uninterrupted stream, what it read so far
    for c in range(ranks0 * workers0):
        with worker(workers0, c % workers0):
            full[c] = list(make(case, c // workers0, ranks0))
        heads[c] = []
    for n, (ranks, workers) in enumerate(chain):
        consumers, last = ranks * workers, n == len(chain) - 1
        if consumers != ranks0 * workers0:
            heads = {}  # another layout: the shards are dealt anew
        states: list[Any] = []
        ds = make(case, 0, ranks)
        for c in range(consumers):
            ds = make(case, c // workers, ranks)
            if state is not None:
                ds.load_state_dict(state)
            with worker(workers, c % workers):
                it = iter(ds)
            take = None if last else rng.randint(0, sum(sizes) // consumers + 1)
            got = list(itertools.islice(it, take))
            if c in heads:
                heads[c] += got
                assert heads[c] == full[c][:len(heads[c])], c
            if take == 0:  # handed nothing: its draws are not counted (see the report)
                heads.pop(c, None)
            read += got
            states.append(None if take == 0 else ds.state_dict())
        state = ds.merge_states(states, consumers, state)
    want = sorted(i * 1000 + k for i, n in enumerate(sizes) for k in range(n))
    assert sorted(read) == want


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden(), separators=(",", ":")) + "\n")
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")
