from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from harness import launch, slow
from torch.utils.data import IterableDataset, TensorDataset

import horovod_iter as hi
from horovod_iter.plan import EpochPlan

pytestmark = pytest.mark.timeout(600)
LAUNCHERS = ["horovod", "torch"]


def run(launcher, nproc, **cfg):
    res = launch(launcher, nproc, "loader_run.py", json.dumps(cfg), timeout=120)
    return res


def flat(batches):
    return [i for b in batches for i in b]


# ---- uneven iterables -----------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_stop_gives_equal_step_counts(launcher):
    lengths = [7, 12, 4]  # batch 2: 4, 6, 2 batches
    res = run(launcher, 3, data="iter", lengths=lengths, batch_size=2, uneven="stop")
    assert [r["error"] for r in res] == [None] * 3
    assert [len(r["batches"]) for r in res] == [2, 2, 2]


@pytest.mark.distributed
@pytest.mark.parametrize("launcher, workers", [("horovod", 0), ("torch", 2), slow("horovod", 2),
                                               slow("torch", 0)])
def test_pad_rank_without_any_data_gets_well_formed_empty_batches(launcher, workers):
    """3 files over 4 ranks, the common evaluation case: the rank with no data learns the
    batch structure from the others (one collective at the first uneven step)."""
    res = run(launcher, 4, data="iter", lengths=[7, 12, 5, 0], batch_size=2, uneven="pad",
              workers=workers, scalar_leaf=True)
    assert [r["error"] for r in res] == [None] * 4
    assert [len(r["batches"]) for r in res] == [6] * 4
    assert res[3]["batches"] == [[]] * 6 and res[3]["stats"]["padded_steps"] == 6
    assert sorted(i for r in res for i in flat(r["batches"])) == list(range(24))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("data", ["map", "iter"])
def test_even_batches_have_one_shape_everywhere_and_mark_the_copies(launcher, data):
    """even_batches=True: every batch has batch_size rows on every rank (what gathers of
    equal shapes need); the copies are flagged, and the real rows are every sample once - a
    rank with no data at all included (its rows copy another rank's row)."""
    cfg = dict(data="iter", lengths=[7, 12, 5, 0]) if data == "iter" else dict(n=23)
    res = run(launcher, 4 if data == "iter" else 3, **cfg, batch_size=4, uneven="pad",
              even=True, scalar_leaf=True)
    assert [r["error"] for r in res] == [None] * len(res)
    steps = 3 if data == "iter" else 2
    assert [r["rows"] for r in res] == [[4] * steps] * len(res)
    total = 24 if data == "iter" else 23
    assert sorted(i for r in res for i in flat(r["batches"])) == list(range(total))
    if data == "iter":
        assert res[3]["batches"] == [[]] * 3 and res[3]["stats"]["padded_steps"] == 3


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_pad_with_a_zero_dim_leaf(launcher):
    res = run(launcher, 2, data="iter", lengths=[2, 9], batch_size=2, uneven="pad",
              scalar_leaf=True)
    assert [r["error"] for r in res] == [None] * 2  # the worker checks ntok == rows, 0 too
    assert res[0]["batches"][1:] == [[]] * 4


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_short_epoch_stall_is_detected_by_every_rank(launcher):
    """50 steps per epoch, rank 1 asleep at step 3 for longer than the timeout: the others
    do not finish and leave; they raise at a heartbeat (or, if the epoch's steps all pass
    before one is due, at the end-of-epoch confirmation), naming the step."""
    res = launch(launcher, 3, "loader_run.py", json.dumps(dict(
        n=300, batch_size=2, timeout=3, stall=[1, 3, 12])), timeout=120, expect_fail=None)
    for r in (res[0], res[2]):
        assert r is not None and r["error"] is not None and r["rank_failure"], r
        assert f"this rank is at step {len(r['batches'])}" in r["error"], r["error"]
        assert 3 <= len(r["batches"]) <= 50


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("data", ["map", "iter"])
def test_one_rank_iterating_alone_is_refused_at_once(launcher, data):
    res = launch(launcher, 2, "loader_run.py", json.dumps(dict(
        data=data, n=400, lengths=[300, 300], batch_size=2, peek_rank=0, timeout=60)),
        timeout=120, expect_fail=None)
    for r in res:  # at once: a ConfigMismatchError, not the DataTimeoutError of the timeout
        assert r is not None and r["mismatch_error"], r
        assert "iterate the loader on every rank" in r["error"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("workers", [0, 2])
def test_raising_iterable_names_rank_and_step(launcher, workers):
    res = launch(launcher, 2, "loader_run.py", json.dumps(dict(
        data="iter", lengths=[20, 20], batch_size=2, raise_at=[1, 7], workers=workers,
        timeout=20)), timeout=120, expect_fail=None)
    err = res[1]["error"]
    assert err.startswith("SampleError") and "rank 1" in err and "step 3" in err, err
    assert "corrupt record" in err
    assert res[0]["error"] is not None and res[0]["rank_failure"], res[0]


@pytest.mark.distributed
def test_loader_before_the_trainers_init_process_group(tmp_path):
    res = launch("torch", 2, "init_order.py", timeout=120)
    assert [r["sum"] for r in res] == [3, 3]
    assert [r["backend"] for r in res] == ["torch", "torch"]
    assert sorted(i for r in res for b in r["batches"] for i in b) == list(range(10))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_device_transform_runs_in_the_pipeline(launcher):
    res = run(launcher, 2, n=20, batch_size=3, device_transform="double")
    assert [r["error"] for r in res] == [None] * 2  # the worker checks x == 2 * id


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("mode", ["next", "get_next", "optional"])
def test_pad_iterable_exact(launcher, mode):
    lengths = [7, 12, 1]
    res = run(launcher, 3, data="iter", lengths=lengths, batch_size=2, uneven="pad",
              mode=mode, prefetch=3)
    assert [r["error"] for r in res] == [None] * 3
    assert [len(r["batches"]) for r in res] == [6, 6, 6]  # everyone steps until all are done
    seen = sorted(i for r in res for i in flat(r["batches"]))
    assert seen == list(range(sum(lengths)))
    assert res[2]["batches"][1:] == [[]] * 5  # empty batches: same structure, zero rows
    assert res[2]["stats"]["padded_steps"] == 5


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_error_raises_on_every_rank(launcher):
    res = run(launcher, 2, data="iter", lengths=[6, 9], batch_size=3, uneven="error")
    for r in res:
        assert r["error"] is not None and r["error"].startswith("UnevenDataError")
        assert "at step 2 some ranks have a batch and some have none" in r["error"]
        assert len(r["batches"]) == 2


# ---- map-style ------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("launcher, workers", [("horovod", 0), ("torch", 2), slow("horovod", 2),
                                               slow("torch", 0)])
def test_map_pad_is_exact(launcher, workers):
    res = run(launcher, 3, n=23, batch_size=4, uneven="pad", workers=workers)
    assert [r["error"] for r in res] == [None] * 3
    steps = {len(r["batches"]) for r in res}
    assert steps == {2}  # ranks get 8, 8, 7 samples: 2 steps each
    assert sorted(i for r in res for i in flat(r["batches"])) == list(range(23))
    assert {r["len"] for r in res} == {2}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_map_error_raises_on_every_rank_when_counts_differ(launcher):
    res = run(launcher, 3, n=23, batch_size=4, uneven="error")
    for r in res:  # 8, 8, 7 samples: refused at iter(), before any batch, on every rank
        assert r["error"] is not None and r["error"].startswith("UnevenDataError"), r["error"]
        assert "per rank: [8, 8, 7]" in r["error"] and r["batches"] == []
    res = run(launcher, 3, n=24, batch_size=5, uneven="error")
    assert [r["error"] for r in res] == [None] * 3
    assert sorted(i for r in res for i in flat(r["batches"])) == list(range(24))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_map_stop_pads_like_torch_and_covers(launcher):
    res = run(launcher, 3, n=23, global_batch_size=6, uneven="stop")
    assert [len(r["batches"]) for r in res] == [4, 4, 4]  # ceil(23/3)=8 per rank, batch 2
    seen = Counter(i for r in res for i in flat(r["batches"]))
    assert set(seen) == set(range(23)) and sum(seen.values()) == 24


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("prefetch, workers", [(0, 0), (3, 0), (2, 2)])
def test_mid_epoch_resume_equals_uninterrupted(launcher, prefetch, workers, tmp_path):
    common = dict(n=50, batch_size=3, seed=5, epoch=2, prefetch=prefetch, workers=workers)
    full = run(launcher, 2, **common)
    state = str(tmp_path / "state")
    run(launcher, 2, **common, stop_after=4, state_out=state)
    assert json.loads(Path(state + ".0").read_text()) == json.loads(Path(state + ".1").read_text())
    resumed = run(launcher, 2, **common, state_in=state + ".0")
    for f, r in zip(full, resumed):
        assert r["batches"] == f["batches"][4:]
        assert r["len"] == len(f["batches"])  # len(): a full pass, as torch's


@pytest.mark.distributed
def test_resume_across_backends_and_world_sizes(tmp_path):
    """Saved under horovodrun on 2 ranks mid-epoch, loaded under torchrun on 3: exactly once."""
    state = str(tmp_path / "state")
    common = dict(n=61, seed=9, uneven="pad", epoch=1)
    before = run("horovod", 2, **common, global_batch_size=4, stop_after=5, state_out=state)
    consumed = [i for r in before for i in flat(r["batches"])]
    assert len(consumed) == 20
    after = run("torch", 3, **common, global_batch_size=6, state_in=state + ".0")
    rest = [i for r in after for i in flat(r["batches"])]
    assert sorted(consumed + rest) == list(range(61))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_mismatched_configuration_refused_on_every_rank(launcher):
    res = run(launcher, 2, n=40, batch_size=4, batch_size_by_rank={"1": 5})
    for r in res:
        assert r["error"] is not None and r["error"].startswith("ConfigMismatchError")
        assert "batch_size: rank 0=4, rank 1=5" in r["error"]
        assert r["batches"] == []


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_stalled_rank_makes_the_others_raise_within_timeout(launcher):
    res = run(launcher, 3, n=6000, batch_size=2, timeout=2, stall=[1, 3, 8])
    for r in (res[0], res[2]):
        assert r["error"] is not None and r["timeout_error"], r["error"]
        # rank 1 stalls before asking for step 3 (of 1000); the others go on until the
        # heartbeat they wait for (at most two in flight, 64 to 1024 steps apart) or the
        # end-of-pass confirmation, and raise there, naming the step
        assert 3 <= len(r["batches"]) <= 1000
        assert f"this rank is at step {len(r['batches'])}" in r["error"], r["error"]
    # the first survivor to time out says so; the other may instead see it leave (Horovod
    # shuts down): also a DataTimeoutError, naming the same step
    assert any("waited more than 2.0 s" in r["error"] for r in (res[0], res[2]))


# ---- in-process -----------------------------------------------------------------------
def tds(n=10):
    return TensorDataset(torch.arange(n).float(), torch.arange(n))


def test_local_iteration_len_and_epochs():
    loader = hi.DistributedLoader(tds(10), batch_size=4, shuffle=False)
    assert len(loader) == 3
    assert [b[1].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # a finished epoch iterated again (no set_epoch) repeats, as torch's DataLoader does
    assert [b[1].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    loader = hi.DistributedLoader(tds(10), batch_size=4, drop_last=True, seed=1)
    loader.set_epoch(0)
    e0 = [b[1].tolist() for b in loader]
    loader.set_epoch(1)
    e1 = [b[1].tolist() for b in loader]
    assert len(e0) == len(e1) == 2 and e0 != e1


def test_state_saved_at_epoch_end_resumes_to_nothing():
    loader = hi.DistributedLoader(tds(10), batch_size=4)
    list(loader)
    state = loader.state_dict()
    again = hi.DistributedLoader(tds(10), batch_size=4)
    again.load_state_dict(json.loads(json.dumps(state)))
    # the first iter() after a load resumes: the rest of a finished epoch is empty; len()
    # stays the full pass, and the next iter() starts the epoch over (torchdata's rule)
    assert len(again) == 3 and list(again) == []
    assert len(list(again)) == 3
    again.load_state_dict(state)
    again.set_epoch(1)  # another epoch discards the pending load
    assert len(list(again)) == 3


def test_close_break_and_context_manager_release_threads():
    import threading

    before = threading.active_count()
    loader = hi.DistributedLoader(tds(1000), batch_size=4, prefetch=3)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    with iter(loader) as it:
        next(it)
    it2 = iter(loader)
    next(it2)
    del it2
    import gc

    gc.collect()
    assert threading.active_count() == before


def test_get_next_and_optional_at_end():
    it = iter(hi.DistributedLoader(tds(3), batch_size=2, shuffle=False))
    assert it.get_next()[1].tolist() == [0, 1]
    assert it.get_next_as_optional()[1].tolist() == [2]
    assert it.get_next_as_optional() is None
    with pytest.raises(hi.OutOfRangeError):
        it.get_next()


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(7))


def test_iterable_dataset_resume_replays():
    loader = hi.DistributedLoader(Stream(), batch_size=2)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    it.close()
    again = hi.DistributedLoader(Stream(), batch_size=2)
    again.load_state_dict(state)
    with pytest.warns(UserWarning, match="replaying 2 batches"):
        assert [b.tolist() for b in again] == [[4, 5], [6]]
    with pytest.raises(TypeError, match="IterableDataset without __len__ is unknown"):
        len(again)


def test_shard_by_rank_and_worker():
    assert list(hi.split_stream(range(10), rank=1, num_replicas=3)) == [1, 4, 7]
    with pytest.raises(ValueError, match="rank=3"):
        list(hi.split_stream(range(3), rank=3, num_replicas=2))


def test_nested_structures_pass_through():
    from collections import namedtuple
    from dataclasses import dataclass

    P = namedtuple("P", "a b")

    @dataclass
    class D:
        t: torch.Tensor
        name: str

    items = [{"p": P(torch.tensor([i]), [torch.tensor(i)]), "d": D(torch.tensor(i), "x"),
              "s": f"s{i}"} for i in range(4)]

    def collate(samples):
        return {"p": P(torch.cat([s["p"].a for s in samples]), [torch.stack(
            [s["p"].b[0] for s in samples])]),
                "d": D(torch.stack([s["d"].t for s in samples]), "x"),
                "s": [s["s"] for s in samples]}

    batch = next(iter(hi.DistributedLoader(items, batch_size=4, shuffle=False,
                                           collate_fn=collate)))
    assert isinstance(batch["p"], P) and batch["p"].a.tolist() == [0, 1, 2, 3]
    assert isinstance(batch["d"], D) and batch["d"].name == "x" and batch["s"][3] == "s3"


def test_dataset_error_names_index_and_rank():
    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            if i == 5:
                raise KeyError("corrupt record")
            return torch.tensor(i)

    with pytest.raises(RuntimeError, match=r"rank 0: dataset\[5\] raised KeyError"):
        list(hi.DistributedLoader(Bad(), batch_size=2, shuffle=False))


# ---- elastic determinism -------------------------------------------------------------
def global_steps(res):
    """The set of sample ids every step holds over all ranks."""
    steps = max(len(r["batches"]) for r in res)
    return [sorted(i for r in res for i in (r["batches"][k] if k < len(r["batches"]) else []))
            for k in range(steps)]


@pytest.mark.parametrize("uneven", ["pad", "stop"])
def test_global_batch_k_holds_the_same_samples_on_any_world(uneven):
    """At a fixed global batch size, the global batch of step k is the same set of samples
    on 1, 2, 3, 4 and 6 ranks (rank r takes positions r, r + W, ... of the epoch's order, so
    step k spans positions [kG, (k+1)G) whatever W): a run is reproducible on another
    cluster size. Under "stop" the last step may differ (torch's padding repeats samples that
    depend on W)."""
    n, g = 100, 12
    runs = {}
    for w in (1, 2, 3, 4, 6):
        plans = [EpochPlan(n, w, r, seed=5, epoch=2, pad=uneven == "stop")
                 for r in range(w)]
        b = g // w
        steps = -(-max(p.count() for p in plans) // b)
        runs[w] = [sorted(int(i) for p in plans for i in p.indices(k * b, (k + 1) * b))
                   for k in range(steps)]
    full = n // g
    for w, steps in runs.items():
        assert steps[:full] == runs[1][:full], w
        if uneven == "pad":
            assert steps == runs[1], w
            assert sorted(i for s in steps for i in s) == list(range(n))


@pytest.mark.distributed
@pytest.mark.slow
def test_global_batches_are_the_same_on_2_and_3_ranks_of_a_real_launch():
    """The same through the loader under torchrun: global_batch_size=6 over 2 and 3 ranks
    (and 2 workers on one of them) gives the same sample set at every step."""
    common = dict(n=41, seed=4, epoch=1, uneven="pad", global_batch_size=6)
    two = global_steps(run("torch", 2, **common))
    three = global_steps(run("torch", 3, **common, workers=2))
    assert two == three and sorted(i for s in two for i in s) == list(range(41))


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"batch_size": 2, "global_batch_size": 4}, ValueError, "one of batch_size .* not both"),
    ({"batch_size": None}, ValueError, "batch_size=None"),
    ({"batch_size": 0}, ValueError, "batch_size must be a positive int, got 0"),
    ({"batch_size": 2, "uneven": "drop"}, ValueError, "uneven must be one of"),
    ({"batch_size": 2, "prefetch": -1}, ValueError, "prefetch must be an int >= 0"),
    ({"batch_size": 2, "num_workers": -2}, ValueError, "num_workers must be an int >= 0"),
    ({"batch_size": 2, "timeout": -5}, ValueError, "timeout must be a positive number"),
    ({"batch_size": 2, "uneven": "pad", "drop_last": True}, ValueError, "choose one"),
    ({"batch_size": 2, "device": "cuda:0"}, ValueError, "CUDA is not available"),
    ({"batch_size": 2, "even_batches": True}, ValueError, "fills the padding of uneven='pad'"),
    ({"batch_size": 2, "uneven": "pad", "even_batches": True}, ValueError,
     "pass mark_padding=hi.mask_labels()"),
    ({"batch_size": 2, "mark_padding": hi.mask_labels()}, ValueError,
     "pass even_batches=True with it"),
    ({"batch_size": 2, "uneven": "pad", "even_batches": 1}, TypeError,
     "even_batches must be a bool"),
    ({"batch_sampler": [[0, 1]], "uneven": "pad", "even_batches": True,
      "mark_padding": hi.flag_padding()}, ValueError, "no fixed size"),
])
def test_bad_loader_arguments(kwargs, exc, match):
    if "device" in kwargs and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(exc, match=match):
        loader = hi.DistributedLoader(tds(), **kwargs)
        iter(loader)


def test_padding_markers():
    """mask_labels sets the copies' labels to -100 (dict and tuple batches, per-token labels
    too); flag_padding adds a bool key; both name the fix for a batch they cannot mark."""
    mask = torch.tensor([False, True, True])
    out = hi.mask_labels()({"labels": torch.tensor([1, 2, 3]), "x": torch.zeros(3)}, mask)
    assert out["labels"].tolist() == [1, -100, -100]
    tokens = hi.mask_labels(key=1, value=-1)((torch.zeros(3), torch.ones(3, 2).long()), mask)
    assert tokens[1].tolist() == [[1, 1], [-1, -1], [-1, -1]]
    flagged = hi.flag_padding()({"x": torch.zeros(3)}, mask)
    assert flagged["padding"].tolist() == [False, True, True]
    with pytest.raises(KeyError, match="no entry 'labels'"):
        hi.mask_labels()({"y": torch.zeros(3)}, mask)
    with pytest.raises(TypeError, match="adds a key to a dict batch"):
        hi.flag_padding()((torch.zeros(3),), mask)


def test_bad_loader_states():
    loader = hi.DistributedLoader(tds(), batch_size=2)
    with pytest.raises(TypeError):
        loader.load_state_dict("x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a horovod_iter loader state"):
        loader.load_state_dict({"type": "other"})
    good = loader.state_dict()
    with pytest.raises(ValueError, match="version 7"):
        loader.load_state_dict({**good, "version": 7})
    with pytest.raises(ValueError, match="'steps' must be an int"):
        loader.load_state_dict({**good, "steps": -1})
    with pytest.raises(ValueError, match="length 11"):
        loader.load_state_dict({**good, "sampler": {**good["sampler"], "n": 11}})


def test_an_iterator_dropped_without_close_is_freed_at_once():
    """No reference cycle inside a pass: a `break` and a dropped iterator free its batches
    (and DataLoader shared memory) by reference counting, not at some later gc."""
    import gc
    import weakref

    loader = hi.DistributedLoader(tds(100), batch_size=4)
    gc.disable()
    try:
        it = iter(loader)
        next(it)
        refs = [weakref.ref(it), weakref.ref(it._sync), weakref.ref(it._it)]
        del it
        assert [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()


def test_stats_count_rows_whatever_the_batch_structure():
    from dataclasses import dataclass

    @dataclass
    class Batch:
        names: list
        x: torch.Tensor

    items = [(f"s{i}", torch.tensor([i, i])) for i in range(10)]
    loader = hi.DistributedLoader(items, batch_size=4, shuffle=False, collate_fn=lambda ss: Batch(
        [n for n, _ in ss], torch.stack([x for _, x in ss])))
    assert [len(b.names) for b in loader] == [4, 4, 2]
    assert loader.stats()["samples"] == 10  # the first tensor is found past the strings
