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
