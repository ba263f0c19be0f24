"""ShardedDataset and stateful iterables: each record exactly once per epoch over the world,
resumable mid-epoch on other world sizes, worker counts and launchers, with real launches."""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from harness import launch, slow

import horovod_iter as hi

pytestmark = pytest.mark.timeout(600)


def write_shards(d: Path, sizes) -> int:
    k = 0
    for i, n in enumerate(sizes):
        with open(d / f"s{i:03d}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"id": k}) + "\n")
                k += 1
    return k


def ids(res, epoch=0):
    return [i for r in res for b in r["epochs"][str(epoch)] for i in b]


def run(launcher, n, timeout=180, **cfg):
    return launch(launcher, n, "sharded_run.py", json.dumps(cfg), timeout=timeout)


# layouts: fewer shards than consumers, more, empty shards, one huge shard
LAYOUTS = {"few": [7, 5], "many": [3, 9, 0, 4, 11, 6, 2, 8, 5, 1, 7, 3], "empty": [0, 6, 0, 0, 9],
           "huge": [1, 400, 2, 3]}


DEFAULT_CASES = [("horovod", 0, "many"), ("torch", 2, "many")]  # the rest: -m slow


@pytest.mark.distributed
@pytest.mark.parametrize("launcher, workers, layout", DEFAULT_CASES + [
    slow(launcher, workers, layout) for layout in LAYOUTS for workers in (0, 2)
    for launcher in ("horovod", "torch") if (launcher, workers, layout) not in DEFAULT_CASES])
def test_every_record_exactly_once_and_a_new_order_each_epoch(launcher, workers, layout,
                                                              tmp_path):
    total = write_shards(tmp_path, LAYOUTS[layout])
    world = 3 if layout != "huge" else 2
    res = run(launcher, world, dir=str(tmp_path), batch_size=4, workers=workers,
              epochs=[0, 1])
    assert [r["error"] for r in res] == [None] * world
    for e in (0, 1):
        assert sorted(ids(res, e)) == list(range(total)), (layout, e)
        assert len({len(r["epochs"][str(e)]) for r in res}) == 1  # lockstep
    if layout == "many":
        assert ids(res, 0) != ids(res, 1)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world, workers, sizes", [(2, 2, [7, 5]), (2, 0, [12]), (3, 0, [7, 5])])
def test_fewer_shards_than_ranks_under_stop_is_refused_on_every_rank(world, workers, sizes,
                                                                     tmp_path):
    """A rank without a shard would stop every rank at step 0 under uneven='stop' (an epoch
    of nothing): refused on every rank, naming the fix; uneven='pad' reads every record."""
    total = write_shards(tmp_path, sizes)
    res = run("torch", world, dir=str(tmp_path), batch_size=2, workers=workers, uneven="stop")
    for r in res:
        assert r["error"] and r["error"].startswith("ShardingError"), r
        assert "would train on nothing" in r["error"] and "uneven='pad'" in r["error"]
    res = run("torch", world, dir=str(tmp_path), batch_size=2, workers=workers, uneven="pad")
    assert [r["error"] for r in res] == [None] * world
    assert sorted(ids(res)) == list(range(total))


@pytest.mark.distributed
@pytest.mark.slow
def test_stop_that_leaves_a_ranks_data_unread_warns(tmp_path):
    """uneven='stop' over shards of 40 and 4 records: the pass ends after 2 steps, and the
    rank with 38 records left says so (a warning naming uneven='pad'), the other does not."""
    write_shards(tmp_path, [40, 4])
    res = run("torch", 2, dir=str(tmp_path), batch_size=2, uneven="stop")
    assert [r["error"] for r in res] == [None] * 2
    assert [len(r["epochs"]["0"]) for r in res] == [2, 2]
    warned = [r for r in res if any("uneven='pad'" in w for w in r["warnings"])]
    assert len(warned) == 1 and "more batches" in warned[0]["warnings"][0]


@pytest.mark.distributed
@pytest.mark.parametrize("before, after", [
    (("horovod", 3, 0), ("torch", 2, 2)),
    slow(("torch", 2, 2), ("horovod", 4, 0)),
    slow(("horovod", 2, 1), ("horovod", 2, 1)),
])
def test_checkpoint_mid_epoch_resumes_on_another_world_exactly_once(before, after, tmp_path):
    total = write_shards(tmp_path, LAYOUTS["many"])
    state = tmp_path / "state.json"
    (l1, n1, w1), (l2, n2, w2) = before, after
    first = run(l1, n1, dir=str(tmp_path), batch_size=3, workers=w1, stop_after=3,
                state_out=str(state), epochs=[1])
    assert [r["error"] for r in first] == [None] * n1
    rest = run(l2, n2, dir=str(tmp_path), batch_size=3, workers=w2, state_in=str(state),
               epochs=[1])
    assert [r["error"] for r in rest] == [None] * n2
    seen = ids(first, 1) + ids(rest, 1)
    assert len(ids(first, 1)) == 3 * 3 * n1
    assert sorted(seen) == list(range(total)), Counter(Counter(seen).values())


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovod", "torch"])
def test_ranks_with_different_shard_lists_are_refused_on_every_rank(launcher, tmp_path):
    write_shards(tmp_path, [4] * 6)
    res = run(launcher, 2, dir=str(tmp_path), batch_size=2, reversed_on_rank=1)
    for r in res:
        assert r["error"] is not None and r["error"].startswith("ConfigMismatchError"), r
        assert "dataset: rank 0=" in r["error"] and r["epochs"] == {}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovod", "torch"])
def test_state_dict_on_rank_0_alone_is_an_error_not_a_hang(launcher, tmp_path):
    write_shards(tmp_path, [9] * 8)
    res = launch(launcher, 2, "sharded_run.py", json.dumps(dict(
        dir=str(tmp_path), batch_size=2, stop_after=2, state_out=str(tmp_path / "s.json"),
        state_on_rank0_only=True)), timeout=150, expect_fail=None)
    assert res[0] is not None and res[0]["error"] is not None, res
    assert "call loader.state_dict() on every rank at the same step" in res[0]["error"]
    assert res[1] is None or res[1]["error"] is not None, res  # no silent success


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovod", "torch"])
def test_a_read_that_raises_names_the_shard_and_the_rank(launcher, tmp_path):
    write_shards(tmp_path, [4] * 6)
    res = launch(launcher, 2, "sharded_run.py", json.dumps(dict(
        dir=str(tmp_path), batch_size=2, raise_shard=4)), timeout=120, expect_fail=None)
    errors = [r["error"] for r in res if r and r["error"]]
    assert any("s004.jsonl" in e and "disk read error" in e and "rank" in e for e in errors), res


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovod", "torch"])
@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_iterable_resumes_without_replay(launcher, workers, tmp_path):
    """Each worker's copy reports its state with its batches and loads its own on resume:
    after the resume only the samples not consumed are generated (no replay)."""
    state = tmp_path / "state.json"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = run(launcher, 2, stateful_stream=48, batch_size=4, stop_after=4, workers=workers,
                state_out=str(state), gen_dir=str(tmp_path / "a"))
    assert [r["error"] for r in first] == [None] * 2
    rest = run(launcher, 2, stateful_stream=48, batch_size=4, state_in=str(state),
               workers=workers, gen_dir=str(tmp_path / "b"))
    assert [r["error"] for r in rest] == [None] * 2
    for a, b in zip(first, rest):
        seen = sorted(i % 1_000_000 for bt in a["epochs"]["0"] + b["epochs"]["0"] for i in bt)
        assert seen == list(range(48))
        assert b["generated"] == 48 - 16  # exactly the rest: no replay of the 16 consumed


# ---- in one process ---------------------------------------------------------------------
def read_jsonl(path):
    with open(path) as f:
        for line in f:
            yield json.loads(line)["id"]


def test_a_chain_of_resumes_on_changing_layouts_is_exactly_once(tmp_path):
    """Resume after resume with 1, 2, 3, 1 consumers (the later ones on a re-dealt layout):
    every record of the epoch exactly once."""
    total = write_shards(tmp_path, [5, 0, 9, 3, 12, 1, 7, 4, 6, 2, 8])
    shards = sorted(map(str, tmp_path.glob("*.jsonl")))
    seen, state = [], None
    for workers, steps in ((0, 3), (2, 4), (3, 5), (0, 2), (2, None)):
        loader = hi.DistributedLoader(hi.ShardedDataset(shards, read_jsonl, seed=4),
                                      batch_size=2, num_workers=workers, uneven="pad",
                                      collate_fn=torch.tensor)
        loader.set_epoch(3)
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))
        it = iter(loader)
        for k, batch in enumerate(it):
            seen += batch.tolist()
            if steps is not None and k + 1 == steps:
                break
        state = loader.state_dict()
        it.close()
    assert sorted(seen) == list(range(total)), Counter(Counter(seen).values())


def test_seek_is_used_when_read_accepts_start(tmp_path):
    total = write_shards(tmp_path, [10, 10])
    calls = []

    def read(path, start=0):
        calls.append(start)
        with open(path) as f:
            for k, line in enumerate(f):
                if k >= start:
                    yield json.loads(line)["id"]

    shards = sorted(map(str, tmp_path.glob("*.jsonl")))
    loader = hi.DistributedLoader(hi.ShardedDataset(shards, read, seed=0), batch_size=3,
                                  collate_fn=torch.tensor)
    it = iter(loader)
    head = [next(it).tolist() for _ in range(2)]
    state = loader.state_dict()
    again = hi.DistributedLoader(hi.ShardedDataset(shards, read, seed=0), batch_size=3,
                                 collate_fn=torch.tensor)
    again.load_state_dict(state)
    calls.clear()
    rest = [i for b in again for i in b.tolist()]
    assert sum(calls) == 6 and len(calls) == 2  # both open shards sought, nothing re-read
    assert sorted([i for b in head for i in b] + rest) == list(range(total))


def test_shuffle_buffer_is_exactly_once_and_resumes_on_the_same_layout(tmp_path):
    total = write_shards(tmp_path, [20, 30, 10])
    shards = sorted(map(str, tmp_path.glob("*.jsonl")))

    def make():
        return hi.DistributedLoader(hi.ShardedDataset(shards, read_jsonl, seed=0,
                                                      shuffle_buffer=8),
                                    batch_size=4, collate_fn=torch.tensor)

    full = [i for b in make() for i in b.tolist()]
    assert sorted(full) == list(range(total)) and full != sorted(full)
    loader = make()
    it = iter(loader)
    head = [i for _ in range(5) for i in next(it).tolist()]
    again = make()
    again.load_state_dict(loader.state_dict())
    assert head + [i for b in again for i in b.tolist()] == full


def test_len_with_sizes_and_bad_arguments(tmp_path):
    write_shards(tmp_path, [3, 4])
    shards = sorted(map(str, tmp_path.glob("*.jsonl")))
    assert len(hi.ShardedDataset(shards, read_jsonl, sizes=[3, 4])) == 7
    with pytest.raises(TypeError, match="sizes="):
        len(hi.ShardedDataset(shards, read_jsonl))
    with pytest.raises(TypeError, match="sequence of shard descriptors"):
        hi.ShardedDataset("train-*.jsonl", read_jsonl)
    with pytest.raises(ValueError, match="sizes must give"):
        hi.ShardedDataset(shards, read_jsonl, sizes=[1])


class Records(torch.utils.data.IterableDataset):
    """Raw records of ``size`` bytes (undecoded JPEG/audio, say), counting what it made."""

    def __init__(self, n, size):
        self.n, self.size, self.made = n, size, 0

    def __iter__(self):
        for i in range(self.n):
            self.made += 1
            yield {"id": i, "raw": bytes(self.size), "text": "x" * 100}


def keep_raw(samples):  # the usual webdataset-style batch: bytes decoded later
    return {"id": torch.tensor([s["id"] for s in samples]), "raw": [s["raw"] for s in samples],
            "text": [s["text"] for s in samples]}


def test_look_ahead_is_bounded_by_the_bytes_a_batch_really_holds():
    """Batches of 4 x 256 KiB bytes records (no tensor bytes to speak of) with
    lookahead_bytes=4 MiB: the look-ahead holds at most the budget plus one batch; by default
    (256 MiB) it pulls further ahead; stats() reports both."""
    batch = 4 * (256 << 10)
    ds = Records(400, 256 << 10)
    loader = hi.DistributedLoader(ds, batch_size=4, collate_fn=keep_raw,
                                  lookahead_bytes=4 << 20)
    assert len([b["id"] for b in loader]) == 100
    st = loader.stats()
    assert batch <= st["lookahead_max_bytes"] <= (4 << 20) + 2 * batch, st
    assert 1 <= st["lookahead_max_batches"] <= 6, st
    wide = hi.DistributedLoader(Records(400, 256 << 10), batch_size=4, collate_fn=keep_raw)
    list(wide)
    assert wide.stats()["lookahead_max_batches"] > 6
    with pytest.raises(ValueError, match="lookahead_bytes must be a positive int"):
        hi.DistributedLoader(ds, batch_size=4, lookahead_bytes=0)


def test_the_first_batch_goes_out_before_the_look_ahead_is_full():
    """The look-ahead ramps up from one batch: when the first batch reaches the trainer, at
    most two batches of records have been made (it used to be a full 16-batch look-ahead)."""
    ds = Records(400, 16)
    it = iter(hi.DistributedLoader(ds, batch_size=4, collate_fn=keep_raw))
    first = next(it)
    assert first["id"].tolist() == [0, 1, 2, 3] and ds.made <= 2 * 4, ds.made
    assert len(list(it)) == 99


def test_host_bytes_counts_what_a_batch_holds():
    import numpy as np

    from horovod_iter._tree import host_bytes
    assert host_bytes(torch.zeros(10, dtype=torch.float64)) == 80
    assert host_bytes(np.zeros(10, dtype=np.int32)) == 40
    assert host_bytes(bytes(1 << 20)) >= 1 << 20
    assert host_bytes(["x" * 1000] * 10) >= 10_000
    assert host_bytes({"a": [bytes(1000), {"b": np.zeros(100)}]}) >= 1800


def test_stateless_iterable_resume_warns_about_replay():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(10))

    loader = hi.DistributedLoader(Stream(), batch_size=2)
    it = iter(loader)
    next(it)
    again = hi.DistributedLoader(Stream(), batch_size=2)
    again.load_state_dict(loader.state_dict())
    with pytest.warns(UserWarning, match="replaying 1 batches"):
        rest = [b.tolist() for b in again]
    assert rest == [[2, 3], [4, 5], [6, 7], [8, 9]]


def test_webdataset_layout_tar_shards(tmp_path):
    """WebDataset's layout (samples as key.ext members of plain tar files), read with the
    standard library."""
    k = 0
    for s in range(3):
        with tarfile.open(tmp_path / f"shard-{s:02d}.tar", "w") as tar:
            for _ in range(5 + s):
                for ext, payload in (("cls", str(k % 10)), ("json", json.dumps({"id": k}))):
                    data = payload.encode()
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(data)
                    import io

                    tar.addfile(info, io.BytesIO(data))
                k += 1

    def read_tar(path):
        with tarfile.open(path) as tar:
            sample: dict = {}
            for m in tar:
                key, ext = m.name.rsplit(".", 1)
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample["__key__"] = key
                sample[ext] = tar.extractfile(m).read()
            if sample:
                yield sample

    shards = sorted(map(str, tmp_path.glob("*.tar")))
    ds = hi.ShardedDataset(shards, read_tar, seed=1)
    loader = hi.DistributedLoader(
        ds, batch_size=4, collate_fn=lambda ss: [json.loads(s["json"])["id"] for s in ss])
    got = [i for b in loader for i in b]
    assert sorted(got) == list(range(k))


def test_parquet_row_groups(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    k = 0
    for s in range(3):
        table = pa.table({"id": list(range(k, k + 10 + s))})
        pq.write_table(table, tmp_path / f"part-{s}.parquet", row_group_size=4)
        k += 10 + s
    # each row group is a shard: (path, row group)
    shards = [(str(p), g) for p in sorted(tmp_path.glob("*.parquet"))
              for g in range(pq.ParquetFile(p).num_row_groups)]

    def read_group(shard):
        path, group = shard
        yield from pq.ParquetFile(path).read_row_group(group).column("id").to_pylist()

    loader = hi.DistributedLoader(hi.ShardedDataset(shards, read_group), batch_size=5,
                                  collate_fn=torch.tensor)
    assert sorted(i for b in loader for i in b.tolist()) == list(range(k))


def test_hugging_face_datasets_through_the_loader():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"id": list(range(50)), "x": [[float(i)] * 3
                                                                 for i in range(50)]})
    ds = ds.with_format("torch")
    loader = hi.DistributedLoader(ds, batch_size=8, seed=0)
    got = [b["id"] for b in loader]
    assert sorted(torch.cat(got).tolist()) == list(range(50))
    assert all(torch.equal(b["x"][:, 0], b["id"].float()) for b in loader)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_len_is_the_steps_every_rank_takes_together(tmp_path, workers):
    """ShardedDataset(sizes=...) with uneven="pad": len(loader) is the same on every rank and
    is the number of steps each takes (Lightning trusts len() to end its epoch)."""
    write_shards(tmp_path, [9, 30, 4, 17, 11])
    res = launch("torch", 2, "sharded_run.py", json.dumps(dict(
        dir=str(tmp_path), batch_size=4, workers=workers, uneven="pad", with_sizes=True,
        epochs=[0, 1])), timeout=120)
    for e in ("0", "1"):
        lens = {r["len"][e] for r in res}
        steps = {len(r["epochs"][e]) for r in res}
        assert len(lens) == 1 and lens == steps, (lens, steps)
