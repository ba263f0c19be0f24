"""MixedDataset: sources mixed in fixed proportions, each source through its own epochs exactly
once, deterministic from the seed, resumable on another world (real launches)."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from harness import launch
from toy_data import Named

import horovod_iter as hi


def mix(**kw):
    return hi.MixedDataset({"web": Named("web", 50), "code": Named("code", 13),
                            "books": Named("books", 200)}, **{
        "weights": [0.5, 0.3, 0.2], "samples_per_epoch": 90, "seed": 11, **kw})


def epoch_samples(ds, epoch):
    ds.set_epoch(epoch)
    return [ds[i] for i in range(len(ds))]


def test_proportions_and_every_source_epoch_exactly_once():
    """45/27/18 of 90 per mixed epoch; the small source (13) runs through ~2 of its epochs per
    mixed epoch, the big one (200) takes 11 mixed epochs for one of its own: in each source's
    own epoch every sample is drawn exactly once, in an order that changes per source epoch."""
    ds = mix()
    assert ds.counts == [45, 27, 18] and len(ds) == 90
    draws = {"web": [], "code": [], "books": []}
    for e in range(12):
        for s in epoch_samples(ds, e):  # positions in order: each source's draws in order
            name, i = s.split(":")
            draws[name].append(int(i))
    for name, n in (("web", 50), ("code", 13), ("books", 200)):
        seq = draws[name]
        epochs = [seq[k:k + n] for k in range(0, len(seq) - n + 1, n)]
        assert epochs and all(sorted(x) == list(range(n)) for x in epochs), name
        assert len(epochs) == 1 or epochs[0] != epochs[1]


def test_deterministic_batched_and_checked():
    assert epoch_samples(mix(), 3) == epoch_samples(mix(), 3)
    assert epoch_samples(mix(), 3) != epoch_samples(mix(seed=12), 3)
    ds = mix()
    ds.set_epoch(2)
    assert ds.__getitems__([5, 80, 46]) == [ds[5], ds[80], ds[46]]
    with pytest.raises(IndexError, match="out of range"):
        ds[90]
    with pytest.raises(ValueError, match="weights must be 3 positive numbers"):
        mix(weights=[1, 0, 1])
    with pytest.raises(ValueError, match="source 'x' is empty"):
        hi.MixedDataset({"x": Named("x", 0)})
    with pytest.raises(TypeError, match="not a map-style dataset"):
        hi.MixedDataset([iter([1])])
    assert hi.MixedDataset([Named("a", 3), Named("b", 1)]).counts == [3, 1]  # concatenation


def test_the_loader_follows_the_epoch_and_reports_the_realised_mix():
    loader = hi.DistributedLoader(mix(), batch_size=8, collate_fn=list)
    seen = {}
    for e in (0, 1):
        loader.set_epoch(e)
        seen[e] = [s for b in loader for s in b]
        assert loader.stats()["source_counts"] == {"web": 45, "code": 27, "books": 18}
        assert loader.stats()["source_proportions"]["web"] == 0.5
    assert Counter(seen[0]) == Counter(epoch_samples(mix(), 0))
    assert Counter(seen[1]) == Counter(epoch_samples(mix(), 1)) != Counter(seen[0])
    with pytest.raises(ValueError, match="persistent_workers=True"):
        hi.DistributedLoader(mix(), batch_size=8, num_workers=1, persistent_workers=True)


@pytest.mark.distributed
@pytest.mark.slow
def test_mixed_epochs_exactly_once_across_a_resume_on_another_world(tmp_path):
    """2 ranks save after 4 steps of epoch 0 (global batch 12), 3 ranks resume and finish
    epochs 0 and 1: every position of each mixed epoch once, the sources in proportion."""
    state = tmp_path / "state.json"
    first = launch("torch", 2, "mixed_run.py", json.dumps(dict(
        epochs=[0], global_batch_size=12, stop_after=4, state_out=str(state))), timeout=120)
    second = launch("torch", 3, "mixed_run.py", json.dumps(dict(
        epochs=[0, 1], global_batch_size=12, state_in=str(state))), timeout=120)
    e0 = [s for r in first for s in r["epochs"]["0"]] + [s for r in second
                                                       for s in r["epochs"]["0"]]
    assert Counter(e0) == Counter(epoch_samples(mix(), 0))
    e1 = [s for r in second for s in r["epochs"]["1"]]
    assert Counter(e1) == Counter(epoch_samples(mix(), 1))
    totals = np.sum([list(r["stats"]["1"].values()) for r in second], axis=0).tolist()
    assert totals == [45, 27, 18]


# -- streaming sources: ShardedDatasets with a canonical layout, as a MixedStream -------------
def jsonl_source(d, prefix, sizes, **kw):
    """Shards of records "prefix:k" (k over the whole source) and its canonical dataset."""
    d.mkdir(parents=True, exist_ok=True)
    paths, k = [], 0
    for i, n in enumerate(sizes):
        p = d / f"s{i:03d}.jsonl"
        p.write_text("".join(json.dumps({"id": f"{prefix}:{k + j}"}) + "\n" for j in range(n)))
        paths.append(str(p))
        k += n

    def read(path, start=0):
        with open(path) as f:
            for i, line in enumerate(f):
                if i >= start:
                    yield json.loads(line)["id"]

    return paths, read, sizes


def stream_mix(tmp_path, world=1, rank=0, **kw):
    big = jsonl_source(tmp_path / "big", "big", [37, 50, 12, 80, 5, 61, 44, 20])
    small = jsonl_source(tmp_path / "small", "small", [9, 14, 7])
    srcs = {name: hi.ShardedDataset(p, r, sizes=s, seed=j, interleave=3, canonical_ranks=4,
                                    canonical_workers=k, rank=rank, num_replicas=world)
            for j, (name, (p, r, s), k) in enumerate((("big", big, 4), ("small", small, 4)))}
    return hi.MixedStream(srcs, weights=[0.75, 0.25], samples_per_epoch=240, rank=rank,
                          num_replicas=world, **kw)


def mix_steps(tmp_path, world, workers, epochs, monkeypatch, state=None):
    from types import SimpleNamespace

    import horovod_iter.sharded as sharded
    from horovod_iter import mixing

    out = []
    for e in epochs:
        ranks = []
        for r in range(world):
            per_worker = []
            for j in range(workers):
                info = SimpleNamespace(num_workers=workers, id=j) if workers > 1 else None
                monkeypatch.setattr(mixing, "get_worker_info", lambda info=info: info)
                monkeypatch.setattr(sharded, "get_worker_info", lambda info=info: info)
                ds = stream_mix(tmp_path, world, r)
                ds.set_batching(24)
                ds.set_epoch(e)
                if state is not None and e == epochs[0]:
                    ds.load_state_dict(state)
                per_worker.append(list(ds.step_batches()))
            seq = []
            while any(per_worker):
                for b in per_worker:
                    if b:
                        seq.append(b.pop(0))
            ranks.append(seq)
        out += [sorted(x for s in ranks for x in s[k]) for k in range(len(ranks[0]))]
    return out


def test_streaming_sources_mix_exactly_in_every_batch_and_alike_on_any_world(tmp_path,
                                                                            monkeypatch):
    """Weights 0.75/0.25 of a global batch of 24 (canonical ranks 4): 20 + 4 records in every
    global batch; the big source (309 records) is read once before any record twice, the
    small one (30) runs through several of its epochs; the same global batches on 1, 2, 4
    ranks x 1, 2 workers."""
    ref = mix_steps(tmp_path, 1, 1, [0, 1, 2], monkeypatch)
    assert len(ref) == 3 * 10  # 240 // 24 steps per mixed epoch
    for batch in ref:
        c = Counter(x.split(":")[0] for x in batch)
        assert c == {"big": 18, "small": 6}  # 0.75 x 24 exactly
    big = Counter(x for b in ref for x in b if x.startswith("big"))
    small = Counter(x for b in ref for x in b if x.startswith("small"))
    assert len(big) == 309 and max(big.values()) - min(big.values()) <= 1   # 540 reads
    assert len(small) == 30 and max(small.values()) - min(small.values()) <= 2  # 180 reads
    assert ref[:10] != ref[10:20]
    for world, workers in [(2, 1), (2, 2), (4, 2), (1, 4)]:
        assert mix_steps(tmp_path, world, workers, [0, 1, 2], monkeypatch) == ref, (
            world, workers)


def test_a_streaming_mix_resumes_from_a_count_on_another_world(tmp_path, monkeypatch):
    ref = mix_steps(tmp_path, 2, 2, [1, 2], monkeypatch)
    ds = stream_mix(tmp_path, 2, 0)
    ds.set_batching(24)
    ds.set_epoch(1)
    state = ds.canonical_state(4, None, 2, 2, {})
    json.dumps(state)
    rest = mix_steps(tmp_path, 4, 1, [1, 2], monkeypatch, state=state)
    assert rest == ref[4:]


def test_streaming_mix_bad_arguments(tmp_path):
    ds = stream_mix(tmp_path)
    with pytest.raises(ValueError, match="not a multiple of canonical_ranks=4"):
        ds.set_batching(30)
    with pytest.raises(ValueError, match=r"gives source.*'small'.*no record"):
        hi.MixedStream({"big": ds.sources[0], "small": ds.sources[1]},
                       weights=[0.99, 0.01]).set_batching(8)
    with pytest.raises(ValueError, match="seed= and shuffle= to each ShardedDataset"):
        hi.MixedStream(ds.sources, seed=3)
    plain = hi.ShardedDataset(["x"], lambda p: iter(()), sizes=[3], rank=0, num_replicas=1)
    with pytest.raises(TypeError, match="canonical layout"):
        hi.MixedStream([ds.sources[0], plain])
    ds.set_batching(24)
    state = ds.canonical_state(2, None, 1, 1, {})
    other = stream_mix(tmp_path)
    other.set_batching(48)
    with pytest.raises(ValueError, match="global_batch_size=24"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="canonical_ranks=4, which 3 ranks cannot"):
        ds.layout(3, 1)
    with pytest.raises(ValueError, match="canonical_workers=4, which num_workers=3"):
        ds.layout(1, 3)


@pytest.mark.distributed
def test_a_streaming_mix_under_torchrun_resumes_from_rank_0s_count_on_another_world(
        tmp_path, monkeypatch):
    """2 ranks x 2 workers read 4 steps of mixed epoch 0, rank 0 alone saves the state (a
    count: no collective), 4 ranks without workers read the rest and epoch 1: the same global
    batches as one process reading it all, and the realised proportions in stats()."""
    ref = mix_steps(tmp_path, 1, 1, [0, 1], monkeypatch)
    state = tmp_path / "state.json"
    first = launch("torch", 2, "mixed_run.py", json.dumps(dict(
        stream_dir=str(tmp_path), epochs=[0], global_batch_size=24, workers=2, stop_after=4,
        state_out=str(state))), timeout=180)
    rest = launch("torch", 4, "mixed_run.py", json.dumps(dict(
        stream_dir=str(tmp_path), epochs=[0, 1], global_batch_size=24,
        state_in=str(state))), timeout=180)

    def steps(res, epoch):
        n = max(len(r["batches"][str(epoch)]) for r in res)
        return [sorted(x for r in res for x in r["batches"][str(epoch)][k]) for k in range(n)]

    assert steps(first, 0) == ref[:4]
    assert steps(rest, 0) == ref[4:10] and steps(rest, 1) == ref[10:20]
    for r in rest:  # what each rank really got, by source; 0.75 / 0.25 over the world
        assert Counter(r["stats"]["1"]) == Counter(x.split(":")[0] for x in r["epochs"]["1"])
    assert sum((Counter(r["stats"]["1"]) for r in rest), Counter()) == {"big": 180,
                                                                         "small": 60}
