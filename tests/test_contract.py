"""The data contract (issue 21's table): every rank agrees on everything that decides which
sample lands where, and on the position a pass starts from; a state loads only into the
configuration it was made for; the state's shape does not depend on the position. In one
process, on the thread world (N ranks as threads behind the real Backend)."""
from __future__ import annotations

import json
import time

import pytest
import torch
from thread_world import run_ranks
from torch.utils.data import IterableDataset
from toy_data import Ids, Named

import horovod_iter as hi
from horovod_iter.errors import ConfigMismatchError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def read_shard(shard, start=0):
    """Shard ``s`` holds the records ``s*100 .. s*100+size-1``."""
    s, size = shard
    return iter(range(s * 100 + start, s * 100 + size))


SHARDS = [(s, 5 + s % 3) for s in range(12)]


def sharded(b, **kw):
    return hi.ShardedDataset(SHARDS, read_shard, rank=b.rank, num_replicas=b.size,
                             sizes=[n for _, n in SHARDS], **kw)


def _mismatch_everywhere(results, field):
    """Every rank raised ConfigMismatchError naming ``field``."""
    for r, res in enumerate(results):
        assert isinstance(res, ConfigMismatchError), f"rank {r}: {res!r}"
        assert field in str(res), f"rank {r}: {res}"


def flat(batches):
    return [int(x) for b in batches for x in (b.tolist() if b.dim() else [b.item()])]


# -- row 1: ShardedDataset with num_workers that differs between ranks ---------------------
def test_row1_sharded_num_workers_differing_between_ranks_is_refused():
    def fn(b):
        loader = hi.DistributedLoader(sharded(b), batch_size=2, uneven="pad", backend=b,
                                      num_workers=1 if b.rank == 1 else 0, timeout=20)
        return list(loader)

    _mismatch_everywhere(run_ranks(2, fn, timeout=60), "num_workers")


# -- row 2: a MixedDataset built differently on one rank -----------------------------------
@pytest.mark.parametrize("what", ["weights", "seed", "shorter_source"])
def test_row2_mixed_dataset_built_otherwise_on_one_rank_is_refused(what):
    def fn(b):
        odd = b.rank == 1
        a = Named("a", 50 if (odd and what == "shorter_source") else 60)
        weights = [0.7, 0.3] if (odd and what == "weights") else [0.5, 0.5]
        mix = hi.MixedDataset([a, Named("b", 40)], weights, samples_per_epoch=80,
                              seed=3 if (odd and what == "seed") else 0)
        loader = hi.DistributedLoader(mix, batch_size=4, backend=b, collate_fn=list)
        return list(loader)

    _mismatch_everywhere(run_ranks(2, fn, timeout=60), "dataset")


# -- row 3: a MixedDataset state loaded into another mix ----------------------------------
def test_row3_mixed_state_refused_by_another_mix():
    def make(w):
        mix = hi.MixedDataset([Named("a", 60), Named("b", 40)], w, samples_per_epoch=80)
        return hi.DistributedLoader(mix, batch_size=4, collate_fn=list)

    old = make([0.5, 0.5])
    it = iter(old)
    next(it), next(it)
    state = json.loads(json.dumps(old.state_dict()))
    with pytest.raises(ValueError, match="dataset: saved"):
        make([0.7, 0.3]).load_state_dict(state)
    make([0.5, 0.5]).load_state_dict(state)  # the same mix loads


# -- row 4: ranks resumed from different checkpoints --------------------------------------
def _two_checkpoints(make_loader):
    """States after 1 and after 2 steps of a 2-rank run."""
    def fn(b):
        loader = make_loader(b)
        it = iter(loader)
        next(it)
        first = loader.state_dict()
        next(it)
        second = loader.state_dict()
        loader.close()
        return first, second

    res = run_ranks(2, fn, timeout=60)
    assert all(isinstance(r, tuple) for r in res), res
    return res[0]


def loader_of(kind, b):
    """A loader of each kind the position checks cover, on backend ``b``."""
    if kind == "map":
        return hi.DistributedLoader(Ids(40), batch_size=2, backend=b)
    if kind == "sharded":
        return hi.DistributedLoader(sharded(b), batch_size=2, backend=b, uneven="pad")
    return hi.DistributedLoader(sharded(b, canonical_ranks=2), global_batch_size=4, backend=b)


@pytest.mark.parametrize("kind", ["map", "sharded", "canonical"])
def test_row4_ranks_resumed_from_different_checkpoints_are_refused(kind):
    def make(b):
        return loader_of(kind, b)

    first, second = _two_checkpoints(make)

    def fn(b):
        loader = make(b)
        loader.load_state_dict(first if b.rank == 0 else second)
        return list(loader)

    _mismatch_everywhere(run_ranks(2, fn, timeout=60), "resume")


def test_row4_a_load_on_one_rank_only_is_refused_naming_load_state_dict():
    def make(b):
        return hi.DistributedLoader(Ids(40), batch_size=2, backend=b)

    first, _ = _two_checkpoints(make)

    def fn(b):
        loader = make(b)
        if b.rank == 0:
            loader.load_state_dict(first)
        return list(loader)

    res = run_ranks(2, fn, timeout=60)
    _mismatch_everywhere(res, "load_state_dict")


# -- row 9: a map-style state loaded into a loader over an IterableDataset -----------------
class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(40))


def test_row9_map_state_refused_by_an_iterable_loader():
    old = hi.DistributedLoader(Ids(40), batch_size=2)
    it = iter(old)
    next(it), next(it)
    state = old.state_dict()
    with pytest.raises(ValueError, match="kind: saved 'sampler', this loader 'replay'"):
        hi.DistributedLoader(Stream(), batch_size=2).load_state_dict(state)


# -- row 12: the state's shape is the same for a fresh and a used loader (DCP) -------------
def _keys(value, path=()):
    """The paths DCP flattens a state dict into (it descends into dicts only)."""
    if isinstance(value, dict):
        return {p for k, v in value.items() for p in _keys(v, (*path, str(k)))}
    return {path}


@pytest.mark.parametrize("kind", ["map", "sharded", "canonical"])
def test_row12_fresh_and_used_states_have_the_same_keys(kind):
    def make(b):
        return loader_of(kind, b)

    def fn(b):
        fresh = make(b).state_dict()
        used = make(b)
        it = iter(used)
        next(it), next(it)
        return fresh, used.state_dict()

    for fresh, used in run_ranks(2, fn, timeout=60):
        assert _keys(fresh) == _keys(used)


def test_row12_dcp_round_trip_into_a_fresh_loader(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")

    class App:
        def __init__(self, loader):
            self.loader = loader

        def state_dict(self):
            return {"dataloader": self.loader.state_dict()}

        def load_state_dict(self, sd):
            self.loader.load_state_dict(sd["dataloader"])

    def make():
        return hi.DistributedLoader(hi.ShardedDataset(SHARDS, read_shard, rank=0,
                                                      num_replicas=1), batch_size=3)

    loader = make()
    it = iter(loader)
    seen = flat([next(it) for _ in range(4)])
    dcp.save({"app": App(loader)}, checkpoint_id=str(tmp_path))
    rest = flat(list(it))
    fresh = make()
    dcp.load({"app": App(fresh)}, checkpoint_id=str(tmp_path))
    assert flat(list(fresh)) == rest
    assert sorted(seen + rest) == sorted(s * 100 + i for s, n in SHARDS for i in range(n))


# -- rows 7 and 8: epochs as torch and the frameworks set them -----------------------------
def test_row8_set_epoch_between_iter_and_the_first_batch_applies_to_that_pass():
    loader = hi.DistributedLoader(Ids(20), batch_size=20, seed=1)
    loader.set_epoch(1)
    expect = next(iter(loader)).tolist()
    loader = hi.DistributedLoader(Ids(20), batch_size=20, seed=1)
    it = iter(loader)          # Lightning: iter() first ...
    loader.sampler.set_epoch(1)  # ... then sampler.set_epoch (resumed from an epoch end)
    assert next(it).tolist() == expect
    # torch's DataLoader + DistributedSampler does the same with num_workers=0
    sampler = torch.utils.data.DistributedSampler(range(20), num_replicas=1, rank=0, seed=1)
    dl = torch.utils.data.DataLoader(Ids(20), batch_size=20, sampler=sampler)
    it = iter(dl)
    sampler.set_epoch(1)
    assert sorted(next(it).tolist()) == sorted(expect)


def test_row8_resumed_from_an_epoch_end_the_next_epoch_is_new():
    loader = hi.DistributedLoader(Ids(12), batch_size=4, seed=2)
    orders = []
    for e in range(2):
        loader.set_epoch(e)
        orders.append(flat(loader))
    state = loader.state_dict()  # epoch 1, finished
    resumed = hi.DistributedLoader(Ids(12), batch_size=4, seed=2)
    resumed.load_state_dict(state)
    it = iter(resumed)
    resumed.sampler.set_epoch(2)
    got = flat(it)
    fresh = hi.DistributedLoader(Ids(12), batch_size=4, seed=2)
    fresh.set_epoch(2)
    assert got == flat(fresh)
    assert got not in orders


def test_row7_iterable_data_reshuffles_when_a_framework_sets_the_epoch_on_sampler():
    """Lightning calls set_epoch on ``dataloader.sampler`` only (lightning.fabric's
    ``_set_sampler_epoch``); for iterable data it must reach the loader."""
    ds = hi.ShardedDataset(SHARDS, read_shard, rank=0, num_replicas=1)
    loader = hi.DistributedLoader(ds, batch_size=4)
    orders = []
    for e in range(3):
        sampler = getattr(loader, "sampler", None)
        assert callable(getattr(sampler, "set_epoch", None))
        sampler.set_epoch(e)
        orders.append(flat(loader))
    assert len({tuple(o) for o in orders}) == 3
    assert all(sorted(o) == sorted(orders[0]) for o in orders)


# -- issue 22 row 5: a rank whose data raised reports its own error -------------------------
class Failing(IterableDataset):
    """Rank 1's stream raises at its 7th item."""

    def __init__(self, rank):
        self.rank = rank

    def __iter__(self):
        for i in range(40):
            if self.rank == 1 and i == 6:
                raise OSError("shard s3://bucket/bad.tar is corrupt")
            yield i


def test_the_rank_whose_data_raised_reports_its_own_error_when_the_others_left_first():
    """Under Horovod the other rank may see this rank's end and shut down before this rank
    reaches the failed step: its next message fails, and it must still report its own
    error (the shard that failed), not "Horovod has been shut down"."""
    def fn(b):
        loader = hi.DistributedLoader(Failing(b.rank), batch_size=2, backend=b, timeout=10)
        for step, _ in enumerate(loader):
            if b.rank == 0 and step == 1:
                raise SystemExit("rank 0 leaves (as after Horovod's shutdown)")
            if b.rank == 1:
                time.sleep(0.2)

    res = run_ranks(2, fn, timeout=60)
    assert isinstance(res[1], hi.SampleError), repr(res[1])
    assert "bad.tar" in str(res[1])


# -- a shuffle buffer: resumed twice, every record once; refused without the buffer ---------
def test_sharded_shuffle_buffer_resumes_twice_exactly_once_and_needs_its_buffer():
    def make(b, buffer=4):
        return hi.DistributedLoader(sharded(b, shuffle_buffer=buffer), batch_size=2,
                                    backend=b, uneven="pad")

    def fn(b):
        seen, state = [], None
        for cut in (2, 3, None):  # two interruptions, then to the end of the epoch
            loader = make(b)
            if state is not None:
                loader.load_state_dict(state)
            it = iter(loader)
            for k, batch in enumerate(it):
                seen += flat([batch])
                if cut is not None and k + 1 == cut:
                    break
            state = json.loads(json.dumps(loader.state_dict()))
            loader.close()
        try:
            make(b, buffer=0).load_state_dict(state)
        except ValueError as e:
            return seen, str(e)
        return seen, None

    res = run_ranks(2, fn, timeout=60)
    assert all(isinstance(r, tuple) for r in res), res
    allseen = sorted(x for seen, _ in res for x in seen)
    assert allseen == sorted(s * 100 + i for s, n in SHARDS for i in range(n))
    assert all(err is not None and "dataset" in err for _, err in res)
