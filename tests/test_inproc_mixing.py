"""In-process twins of tests/test_mixing.py's launched tests: a map-style MixedDataset and a
streaming mix of canonical ShardedDatasets through the loader on a thread world of 1-4 ranks,
saved mid-epoch and resumed on another world."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inproc_run import mixed_run
from thread_world import ThreadBackend, run_all, worker_context
from toy_data import Named

import horovod_iter as hi


def reference_epoch(epoch: int) -> Counter[str]:
    ds = hi.MixedDataset({"web": Named("web", 50), "code": Named("code", 13),
                          "books": Named("books", 200)}, weights=[0.5, 0.3, 0.2],
                         samples_per_epoch=90, seed=11)
    ds.set_epoch(epoch)
    return Counter(ds[i] for i in range(len(ds)))


def run(world: int, **cfg: Any) -> list[dict[str, Any]]:
    res = run_all(world, lambda b: mixed_run(b, cfg))
    assert [r["error"] for r in res] == [None] * world, res
    return res


@settings(deadline=None, max_examples=10)
@given(before=st.sampled_from([1, 2, 3, 4]), after=st.sampled_from([1, 2, 3, 4]),
       stop=st.integers(1, 6))
def test_mixed_epochs_exactly_once_across_a_resume_on_another_world(before: int, after: int,
                                                                    stop: int) -> None:
    """Save after ``stop`` steps of epoch 0 (global batch 12), resume on another world and
    finish epochs 0 and 1: every position of each mixed epoch once, sources in proportion."""
    first = run(before, epochs=[0], global_batch_size=12, stop_after=stop)
    second = run(after, epochs=[0, 1], global_batch_size=12, state_in=first[0]["state"])
    e0 = [s for r in first + second for s in r["epochs"]["0"]]
    assert Counter(e0) == reference_epoch(0)
    e1 = [s for r in second for s in r["epochs"]["1"]]
    assert Counter(e1) == reference_epoch(1)
    totals = sum((Counter(r["stats"]["1"]) for r in second), Counter())
    assert totals == {"web": 45, "code": 27, "books": 18}


def test_mixed_dataset_with_workers_on_three_ranks() -> None:
    res = run(3, epochs=[1], global_batch_size=12, workers=2)
    for e in (1,):
        assert Counter(s for r in res for s in r["epochs"][str(e)]) == reference_epoch(e)


# -- streaming sources: canonical ShardedDatasets as a MixedStream --------------------------
def jsonl_source(d: Path, prefix: str, sizes: list[int]) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    paths, k = [], 0
    for i, n in enumerate(sizes):
        p = d / f"s{i:03d}.jsonl"
        p.write_text("".join(json.dumps({"id": f"{prefix}:{k + j}"}) + "\n" for j in range(n)))
        paths.append(str(p))
        k += n
    return paths


class Read:
    def __call__(self, path: str, start: int = 0) -> Any:
        with open(path) as f:
            for i, line in enumerate(f):
                if i >= start:
                    yield json.loads(line)["id"]


BIG, SMALL = [37, 50, 12, 80, 5, 61, 44, 20], [9, 14, 7]


def stream_run(b: ThreadBackend, d: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """tests/workers/mixed_run.py's streaming mix (canonical 4 x 4, weights .75/.25)."""
    srcs = {name: hi.ShardedDataset(sorted(str(p) for p in (d / name).glob("*.jsonl")), Read(),
                                    sizes=sizes, seed=seed, interleave=3, canonical_ranks=4,
                                    canonical_workers=4, rank=b.rank, num_replicas=b.size)
            for seed, (name, sizes) in enumerate((("big", BIG), ("small", SMALL)))}
    mix = hi.MixedStream(srcs, weights=[0.75, 0.25], samples_per_epoch=240, rank=b.rank,
                         num_replicas=b.size)
    workers = cfg.get("workers", 0)
    loader = hi.DistributedLoader(mix, global_batch_size=24, uneven="pad", collate_fn=list,
                                  timeout=60, num_workers=workers, backend=b,
                                  multiprocessing_context=worker_context() if workers else None)
    out: dict[str, Any] = {"batches": {}, "stats": {}}
    if cfg.get("state_in"):
        loader.load_state_dict(cfg["state_in"])
    for epoch in cfg["epochs"]:
        loader.set_epoch(epoch)
        batches = out["batches"].setdefault(str(epoch), [])
        for step, batch in enumerate(loader):
            batches.append(batch)
            if cfg.get("stop_after") is not None and step + 1 == cfg["stop_after"]:
                if b.rank == 0:  # a stream's state is a count: rank 0 alone saves
                    out["state"] = json.loads(json.dumps(loader.state_dict()))
                break
        out["stats"][str(epoch)] = loader.stats().get("source_counts")
    return out


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mix")
    jsonl_source(d / "big", "big", BIG)
    jsonl_source(d / "small", "small", SMALL)
    return d


def steps(res: list[dict[str, Any]], epoch: int) -> list[list[str]]:
    n = max(len(r["batches"][str(epoch)]) for r in res)
    return [sorted(x for r in res for x in r["batches"][str(epoch)][k]) for k in range(n)]


@pytest.mark.parametrize("first_world, first_workers, rest_world, rest_workers",
                         [(2, 2, 4, 0), (1, 0, 2, 2), (4, 1, 1, 0)])
def test_a_streaming_mix_resumes_from_rank_0s_count_on_another_world(
        stream_dir: Path, first_world: int, first_workers: int, rest_world: int,
        rest_workers: int) -> None:
    ref = run_all(1, lambda b: stream_run(b, stream_dir, dict(epochs=[0, 1])))
    ref_steps = steps(ref, 0) + steps(ref, 1)
    assert len(ref_steps) == 20
    for batch in ref_steps:
        assert Counter(x.split(":")[0] for x in batch) == {"big": 18, "small": 6}
    first = run_all(first_world, lambda b: stream_run(b, stream_dir, dict(
        epochs=[0], workers=first_workers, stop_after=4)))
    rest = run_all(rest_world, lambda b: stream_run(b, stream_dir, dict(
        epochs=[0, 1], workers=rest_workers, state_in=first[0]["state"])))
    assert steps(first, 0) == ref_steps[:4]
    assert steps(rest, 0) == ref_steps[4:10] and steps(rest, 1) == ref_steps[10:20]
    for r in rest:  # what each rank really got, by source
        got = Counter(x.split(":")[0] for bt in r["batches"]["1"] for x in bt)
        assert Counter(r["stats"]["1"]) == got
    assert sum((Counter(r["stats"]["1"]) for r in rest), Counter()) == {"big": 180,
                                                                         "small": 60}
