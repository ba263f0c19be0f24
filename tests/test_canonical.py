"""Elastic determinism of ShardedDataset: the canonical layout gives every full global step the
same set of records on any world x workers that can read it, each record exactly once, and a
position that is a count (saved on one rank, resumed on another world)."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from harness import launch, slow

import horovod_iter as hi
import horovod_iter.sharded as sharded
from horovod_iter.canonical import merge_offsets, stream_pieces, window_labels

pytestmark = pytest.mark.timeout(600)


def write_shards(d: Path, sizes) -> list[str]:
    k, paths = 0, []
    for i, n in enumerate(sizes):
        p = d / f"s{i:03d}.jsonl"
        with open(p, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"id": k}) + "\n")
                k += 1
        paths.append(str(p))
    return paths


def read(path, start=0):
    with open(path) as f:
        for i, line in enumerate(f):
            if i >= start:
                yield json.loads(line)["id"]


def read_no_seek(path):
    yield from read(path)


# -- the pure pieces ---------------------------------------------------------------------------
def test_streams_cut_the_epoch_into_equal_runs_of_whole_records():
    rng = random.Random(0)
    for _ in range(50):
        sizes = [rng.randrange(0, 40) for _ in range(rng.randrange(1, 12))]
        order = rng.sample(range(len(sizes)), len(sizes))
        streams = rng.randrange(1, 30)
        pieces = stream_pieces(order, sizes, streams)
        lengths = [sum(b - a for _, a, b in p) for p in pieces]
        assert sum(lengths) == sum(sizes) and max(lengths) - min(lengths) <= 1
        flat = [(s, i) for p in pieces for s, a, b in p for i in range(a, b)]
        assert flat == [(s, i) for s in order for i in range(sizes[s])]  # in the epoch's order


def test_a_windows_merge_reads_each_piece_in_order_and_maps_any_position():
    lengths = [700, 1500, 3, 0, 2100]
    key = [5, 1, 2, 0]
    labels = [int(x) for block in window_labels(key, lengths) for x in block]
    assert Counter(labels) == {i: n for i, n in enumerate(lengths) if n}
    assert labels != sorted(labels)  # merged, not one after another
    for start in (0, 1, 1023, 1024, 1500, 4302):
        assert merge_offsets(key, lengths, start) == [labels[:start].count(i)
                                                      for i in range(len(lengths))]
        tail = [int(x) for block in window_labels(key, lengths, start) for x in block]
        assert tail == labels[start:]
    other = [int(x) for block in window_labels([5, 2, 2, 0], lengths) for x in block]
    assert other != labels  # another epoch, another merge


# -- in one process: every layout the canonical one allows ------------------------------------
def consumer_batches(ds_args, world, workers, rank, worker, state=None, monkeypatch=None):
    monkeypatch.setattr(sharded, "get_worker_info", lambda: SimpleNamespace(
        num_workers=workers, id=worker) if workers > 1 else None)
    ds = hi.ShardedDataset(*ds_args[0], rank=rank, num_replicas=world, **ds_args[1])
    ds.set_batching(ds_args[2], ds_args[3])
    if state is not None:
        ds.load_state_dict(state)
    out = []
    for batch in ds.step_batches():
        out.append((list(batch), ds.state_dict()))
    return out, ds


def rank_sequence(per_worker):
    """torch's DataLoader: the workers' batches in turn, skipping a worker that is done."""
    lists = [list(b) for b in per_worker]
    seq = []
    while any(lists):
        for b in lists:
            if b:
                seq.append(b.pop(0))
    return seq


def global_steps(ds_args, world, workers, monkeypatch, state=None):
    ranks = []
    for r in range(world):
        per_worker = [consumer_batches(ds_args, world, workers, r, j, state, monkeypatch)[0]
                      for j in range(workers)]
        ranks.append(rank_sequence(per_worker))
    steps = max(len(s) for s in ranks)
    return ranks, [sorted(x for s in ranks if k < len(s) for x in s[k][0]) for k in range(steps)]


@pytest.mark.parametrize("drop_last", [False, True])
def test_the_same_global_batches_on_every_world_and_worker_count(tmp_path, monkeypatch,
                                                                 drop_last):
    sizes = [37, 50, 12, 80, 5, 61, 44, 20, 0, 33, 71, 9]
    total = sum(sizes)
    paths = write_shards(tmp_path, sizes)
    args = ((paths, read), dict(sizes=sizes, seed=3, interleave=3, canonical_ranks=12,
                                canonical_workers=4), 48, drop_last)
    _, ref = global_steps(args, 1, 1, monkeypatch)
    full = total // (12 * 4) // 4 * 4  # full uses of every stream x stream kinds
    for world, workers in [(1, 2), (2, 1), (2, 4), (3, 2), (4, 1), (4, 4), (6, 2), (12, 1)]:
        ranks, steps = global_steps(args, world, workers, monkeypatch)
        got = [x for s in steps for x in s]
        if drop_last:
            assert len(got) == len(set(got)) and len(got) >= full * 48
        else:
            assert sorted(got) == list(range(total)), (world, workers)  # exactly once
        assert steps[:full] == ref[:full], (world, workers)
        for s in ranks:  # every full step gives every rank its share of the global batch
            assert [len(b) for b, _ in s[:full]] == [48 // world] * full


def test_positions_are_a_count_that_matches_what_the_consumers_read(tmp_path, monkeypatch):
    sizes = [37, 50, 12, 80, 5, 61, 44, 20, 0, 33, 71, 9]
    paths = write_shards(tmp_path, sizes)
    args = ((paths, read), dict(sizes=sizes, seed=3, interleave=3, canonical_ranks=6,
                                canonical_workers=2), 24, False)
    for world, workers in [(1, 1), (2, 2), (3, 1), (6, 2)]:
        ds = hi.ShardedDataset(paths, read, rank=0, num_replicas=world, **args[1])
        ds.set_batching(24)
        lay = ds.layout(world, workers)
        plans = {(r, j): consumer_batches(args, world, workers, r, j, None, monkeypatch)[0]
                 for r in range(world) for j in range(workers)}
        assert [lay.rank_batches(r) for r in range(world)] == [
            sum(len(plans[r, j]) for j in range(workers)) for r in range(world)]
        for handed in (0, 1, 5, 9, 10, 1000):
            expect = lay.offsets()
            for r in range(world):
                seq = rank_sequence([[(j, st) for _, st in plans[r, j]]
                                     for j in range(workers)])[:handed]
                for _, st in seq:
                    for s, off in st["streams"]:
                        expect[s] = max(expect[s], off)
            assert lay.positions(handed) == expect, (world, workers, handed)


def test_resume_from_a_count_on_another_layout_is_exactly_once(tmp_path, monkeypatch):
    sizes = [37, 50, 12, 80, 5, 61, 44, 20, 0, 33, 71, 9]
    total = sum(sizes)
    paths = write_shards(tmp_path, sizes)
    for reader in (read, read_no_seek):
        args = ((paths, reader), dict(sizes=sizes, seed=3, interleave=3, canonical_ranks=12,
                                      canonical_workers=2), 48, False)
        ranks, ref = global_steps(args, 3, 2, monkeypatch)
        stop = 5
        ds = hi.ShardedDataset(paths, reader, rank=0, num_replicas=3, **args[1])
        ds.set_batching(48)
        state = ds.canonical_state(stop, None, 3, 2, {})
        json.dumps(state)
        before = [x for s in ranks for b, _ in s[:stop] for x in b]
        for world, workers in [(2, 1), (4, 2), (1, 1)]:
            _, steps = global_steps(args, world, workers, monkeypatch, state=state)
            after = [x for s in steps for x in s]
            assert sorted(before + after) == list(range(total)), (world, workers)
            full = total // 24 // 4 * 2 - stop  # full steps left after the resume
            assert steps[:full] == ref[stop:stop + full], (world, workers)


def test_layouts_that_cannot_read_it_are_refused_naming_the_fix(tmp_path):
    sizes = [30] * 8
    paths = write_shards(tmp_path, sizes)

    def layout(world, workers, batch, **kw):
        ds = hi.ShardedDataset(paths, read, sizes=sizes, rank=0, num_replicas=world,
                               **{"canonical_ranks": 12, "canonical_workers": 2, **kw})
        ds.set_batching(batch)
        return ds.layout(world, workers)

    with pytest.raises(ValueError, match=r"canonical_ranks=12, which 5 ranks cannot"):
        layout(5, 1, 60)
    with pytest.raises(ValueError, match=r"canonical_workers=2, which num_workers=4"):
        layout(2, 4, 48)
    with pytest.raises(ValueError, match=r"global batch size 50 is not a multiple of "
                                         r"canonical_ranks=12"):
        layout(2, 1, 50)
    with pytest.raises(ValueError, match="at least canonical_ranks x canonical_workers = 960"):
        layout(2, 1, 48, canonical_workers=80)
    with pytest.raises(ValueError, match="pass sizes="):
        hi.ShardedDataset(paths, read, canonical_ranks=4)
    with pytest.raises(ValueError, match="shuffle_buffer=0"):
        hi.ShardedDataset(paths, read, sizes=sizes, canonical_ranks=4, shuffle_buffer=10)
    with pytest.raises(ValueError, match="set_batching"):
        hi.ShardedDataset(paths, read, sizes=sizes, canonical_ranks=4, rank=0,
                          num_replicas=1).layout(1, 1)


def test_a_state_of_another_layout_or_sizes_is_refused(tmp_path):
    sizes = [30] * 8
    paths = write_shards(tmp_path, sizes)
    ds = hi.ShardedDataset(paths, read, sizes=sizes, canonical_ranks=4, rank=0,
                           num_replicas=1)
    ds.set_batching(8)
    state = ds.canonical_state(3, None, 1, 1, {})
    other = hi.ShardedDataset(paths, read, sizes=[31, *sizes[1:]], canonical_ranks=4,
                              rank=0, num_replicas=1)
    with pytest.raises(ValueError, match="other shard sizes"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="canonical_workers=2"):
        hi.ShardedDataset(paths, read, sizes=sizes, canonical_ranks=4, canonical_workers=2,
                          rank=0, num_replicas=1).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with canonical_ranks=4"):
        hi.ShardedDataset(paths, read, sizes=sizes, rank=0, num_replicas=1).load_state_dict(
            state)


def test_wrong_sizes_are_an_error_not_silent_data(tmp_path, monkeypatch):
    sizes = [30] * 4
    paths = write_shards(tmp_path, sizes)
    for bad, what in (([30, 30, 31, 30], "ended at record"), ([30, 29, 30, 30], "more records")):
        args = ((paths, read), dict(sizes=bad, seed=0, canonical_ranks=2), 4, False)
        with pytest.raises(hi.SampleError, match=what):
            for w in range(1):
                consumer_batches(args, 1, 1, 0, w, None, monkeypatch)


# -- real launches ------------------------------------------------------------------------------
def run(launcher, n, timeout=180, **cfg):
    return launch(launcher, n, "sharded_run.py", json.dumps(cfg), timeout=timeout)


def launch_steps(res, epoch):
    steps = max(len(r["epochs"][str(epoch)]) for r in res)
    return [sorted(i for r in res if k < len(r["epochs"][str(epoch)])
                   for i in r["epochs"][str(epoch)][k]) for k in range(steps)]


SIZES = [37, 50, 12, 80, 5, 61, 44, 20, 0, 33, 71, 9, 40, 26, 58]  # 546 records
CANON = dict(canonical=[12, 2], global_batch_size=24, interleave=4)
FULL = 546 // 24 // 2 * 2  # full steps: 22 records a stream, 2 per step, 2 stream kinds


@pytest.mark.distributed
@pytest.mark.slow
def test_real_launches_on_1_2_3_4_ranks_with_0_and_2_workers_give_the_same_global_batches(
        tmp_path):
    (tmp_path / "d").mkdir()
    write_shards(tmp_path / "d", SIZES)
    seqs = {}
    for world in (1, 2, 3, 4):
        for workers in (0, 2):
            res = run("torch", world, dir=str(tmp_path / "d"), workers=workers,
                      epochs=[0, 1], **CANON)
            assert [r["error"] for r in res] == [None] * world, res
            for e in (0, 1):
                got = [i for r in res for b in r["epochs"][str(e)] for i in b]
                assert sorted(got) == list(range(546)), (world, workers, e)
            seqs[world, workers] = [launch_steps(res, e)[:FULL] for e in (0, 1)]
    ref = seqs[1, 0]
    assert ref[0] != ref[1]  # a new order each epoch
    for key, got in seqs.items():
        assert got == ref, key


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["horovod", slow("torch")])  # torchrun: test_mixing's
def test_state_saved_on_rank_0_alone_resumes_on_another_world_exactly(launcher, tmp_path):
    (tmp_path / "d").mkdir()
    write_shards(tmp_path / "d", SIZES)
    whole = run("torch", 2, dir=str(tmp_path / "d"), workers=2, epochs=[1], **CANON)
    ref = launch_steps(whole, 1)
    state = tmp_path / "state.json"
    first = run(launcher, 3, dir=str(tmp_path / "d"), workers=2, epochs=[1], stop_after=7,
                state_out=str(state), rank0_saves=True, **CANON)
    assert [r["error"] for r in first] == [None] * 3, first
    assert json.loads(state.read_text())["dataset"]["positions"]  # a count, not a gather
    rest = run(launcher, 4, dir=str(tmp_path / "d"), workers=0, epochs=[1],
               state_in=str(state), **CANON)
    assert [r["error"] for r in rest] == [None] * 4, rest
    seen = [i for r in first + rest for b in r["epochs"]["1"] for i in b]
    assert sorted(seen) == list(range(546)), Counter(Counter(seen).values())
    assert launch_steps(first, 1) == ref[:7]
    assert launch_steps(rest, 1)[:FULL - 7] == ref[7:FULL]
