"""Inside the trainers users run: the real framework, 2 CPU ranks, its own launcher; every
sample exactly once per epoch, and across the framework's own mid-epoch checkpoint + resume.
(docs/frameworks.md has the recipes these tests hold.)"""
from __future__ import annotations

import math

import pytest
from harness import launch, slow

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]
N, VAL = 96, 22


def lightning(*args):
    pytest.importorskip("lightning")
    return launch("local", 2, "lightning_run.py", *args, timeout=300)


def exactly_once_per_epoch(res, n=N, epochs=("0", "1")):
    assert [r["world"] for r in res] == [2, 2]
    for e in epochs:
        ids = sorted(res[0]["seen"][e] + res[1]["seen"][e])
        assert ids == list(range(n)), f"epoch {e}: {len(ids)} ids, {len(set(ids))} distinct"


@pytest.mark.parametrize("case", [slow("sampler"), "loader", slow("prebuilt")])
def test_lightning_ddp_trains_every_sample_once_per_epoch(case):
    """Our sampler in a DataLoader (Lightning leaves it alone: it is a torch
    DistributedSampler), our loader from train_dataloader(), and our loader built before
    trainer.fit() (before Lightning's launcher set up the ranks)."""
    res = lightning(case)
    exactly_once_per_epoch(res)
    for r in res:
        assert r["backend"] == "torch"
        assert r["seen"]["0"] != r["seen"]["1"]  # a new order each epoch (set_epoch followed)
    if case == "loader":  # validation with uneven="pad": every sample once per validation run
        val = sorted(res[0]["val"] + res[1]["val"])
        assert val == sorted(list(range(VAL)) * 2)  # two epochs, one validation each


@pytest.mark.slow
def test_lightning_mid_epoch_checkpoint_resumes_exactly(tmp_path):
    """ModelCheckpoint every 7 steps, the run stops after the checkpoint; fit(ckpt_path=)
    resumes the epoch through Lightning's stateful dataloader checkpointing."""
    first = lightning("save", str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["stepstep=7.ckpt"]
    second = lightning("resume", str(tmp_path))
    per_rank = N // 2
    ids = []
    for a, b in zip(first, second):
        mine = a["seen"]["0"][:7 * 4] + b["seen"]["0"]  # trained before the checkpoint + after
        assert len(mine) == len(set(mine)) == per_rank
        ids += mine
    assert sorted(ids) == list(range(N))
    exactly_once_per_epoch(second, epochs=("1",))


@pytest.mark.slow
def test_lightning_mid_epoch_checkpoint_of_data_without_len_is_exact(tmp_path):
    """A ShardedDataset without sizes has no len(): Lightning fetches one batch ahead of the
    training step, and the loader's state leaves out the batch Lightning holds."""
    import json

    (tmp_path / "shards").mkdir()
    start = 0
    for k, size in enumerate([17, 9, 26, 13, 21]):
        with open(tmp_path / "shards" / f"s{k}.jsonl", "w") as f:
            f.writelines(json.dumps({"id": i}) + "\n" for i in range(start, start + size))
        start += size
    first = lightning("sharded_save", str(tmp_path))
    second = lightning("sharded_resume", str(tmp_path))
    ids = []
    for a, b in zip(first, second):
        ids += a["seen"]["0"][:7 * 4] + b["seen"]["0"]  # before the checkpoint, then after
    assert sorted(ids) == list(range(start))
    exactly_once_per_epoch(second, n=start, epochs=("1",))


def hf(*args):
    pytest.importorskip("transformers")
    return launch("torch", 2, "hf_trainer_run.py", *args, timeout=300)


def test_hf_trainer_trains_every_sample_once_and_evaluates(tmp_path):
    res = hf("train", str(tmp_path))
    exactly_once_per_epoch(res, n=64)
    assert all(r["eval_loss"] is not None for r in res)


@pytest.mark.slow
def test_hf_trainer_evaluate_with_an_even_batches_pad_loader_is_exact(tmp_path):
    """Trainer.evaluate() over uneven="pad" + even_batches=True + mask_labels(): 17 samples
    on 2 ranks (one rank's last batch all copies): no gather error, compute_metrics sees 17
    labels that are not -100, every sample evaluated once, eval_loss finite (HF drops the
    NaN loss of an all-padding batch)."""
    res = hf("eval_pad", str(tmp_path))
    assert sorted(res[0]["eval"] + res[1]["eval"]) == list(range(17))
    for r in res:
        assert r["eval_count"] == 17 and math.isfinite(r["eval_loss"]), r


@pytest.mark.slow
def test_hf_trainer_predict_with_the_evaluation_recipe_is_in_dataset_order(tmp_path):
    """Trainer.predict() over the recipe's loader (uneven="pad", even_batches=True,
    mask_labels()), 101 samples, batch 8, 2 ranks: HF returns 112 rows, in the order
    [0, 2, 4, ..., 1, 3, ...] with copies; in_dataset_order gives 101 rows, row i the model's
    prediction for sample i, its label i's."""
    res = hf("predict", str(tmp_path))
    for r in res:
        assert r["raw_rows"] == 112, r
        assert r["rows"] == 101 and r["labels_in_order"] and r["preds_match"], r


@pytest.mark.slow
def test_hf_trainer_resume_from_checkpoint_is_exactly_once(tmp_path):
    """save_steps=5, stopped at step 11 (epoch 1, step 3); resume_from_checkpoint=True
    continues from step 10: HF re-batches the rest of epoch 1 from loader.batch_sampler
    (accelerate's skip_first_batches) and sets its epoch there."""
    first = hf("save", str(tmp_path))
    second = hf("resume", str(tmp_path))
    ids = []
    for a, b in zip(first, second):
        mine = a["seen"]["1"][:2 * 4] + b["seen"]["1"]  # epoch 1 before step 10, then after
        assert len(mine) == len(set(mine)) == 32
        ids += mine
    assert sorted(ids) == list(range(64))


def accel(*args):
    pytest.importorskip("accelerate")
    return launch("torch", 2, "accelerate_run.py", *args, timeout=300)


def test_accelerate_save_state_load_state_resumes_exactly(tmp_path):
    first = accel("save", str(tmp_path / "state"))
    second = accel("resume", str(tmp_path / "state"))
    assert all(r["passed_through"] and r["error"] is None for r in first + second)
    ids = []
    for a, b in zip(first, second):
        mine = a["seen"]["0"] + b["seen"]["0"]
        assert len(a["seen"]["0"]) == 24 and len(mine) == len(set(mine)) == 32
        ids += mine
    assert sorted(ids) == list(range(64))
    exactly_once_per_epoch(second, n=64, epochs=("1",))


@pytest.mark.slow
def test_pad_evaluation_gathers_every_sample_once_with_gather_rows(tmp_path):
    """uneven="pad" over 17 samples on 2 ranks: one rank's last batch is empty (which
    accelerate's gather_for_metrics cannot take); hi.gather_rows gathers every output once."""
    res = accel("eval", str(tmp_path))
    assert sorted(res[0]["rows"] + res[1]["rows"]) == [0, 1, 4, 4, 4, 4]
    for r in res:
        assert r["error"] is None, r
        assert sorted(r["gathered"]) == list(range(17)) and r["preds_match"]


@pytest.mark.slow
def test_even_batches_evaluation_works_with_gather_for_metrics(tmp_path):
    """even_batches=True: every batch 4 rows on both ranks (the empty and short ones filled
    with flagged copies), so accelerate's gather_for_metrics takes them; dropping the flagged
    rows leaves every sample once."""
    res = accel("eval_even", str(tmp_path))
    for r in res:
        assert r["error"] is None, r
        assert r["rows"] == [4, 4, 4]
        assert sorted(r["gathered"]) == list(range(17)) and r["preds_match"]


@pytest.mark.slow
def test_accelerate_sharding_our_data_again_is_refused_on_every_rank(tmp_path):
    """accelerator.prepare() of a DataLoader over our sampler (BatchSamplerShard; with
    dispatch_batches=True, process 0 alone reads: 50 of 100 before) or over a ShardedDataset
    (dispatched by default: 26 + 28 of 58 before; IterableDatasetShard otherwise): a
    ShardingError on every rank at the first batch, naming hi.DistributedLoader."""
    res = accel("refusals", str(tmp_path / "shards"))
    for r in res:
        assert r["error"] is None, r
        cases = r["cases"]
        assert "BatchSamplerShard" in cases["sampler"]["error"], cases
        assert "DataLoaderDispatcher" in cases["sampler_dispatched"]["error"], cases
        for case in ("sampler", "sampler_dispatched"):
            assert cases[case]["error"].startswith("ShardingError"), cases
            assert "horovod_iter.DistributedLoader" in cases[case]["error"], cases
    sharded = [r["cases"][c] for r in res for c in ("sharded", "sharded_not_dispatched")]
    for c in sharded:
        assert c["error"].startswith("ShardingError") and "ShardedDataset" in c["error"], c


def test_accelerate_seeing_another_world_than_horovod_warns(tmp_path):
    """An Accelerator under horovodrun sees one process: building a loader warns."""
    pytest.importorskip("accelerate")
    res = launch("horovod", 2, "accelerate_run.py", "horovod_world", str(tmp_path),
                 timeout=120)
    for r in res:
        assert r["error"] is None, r
        assert any("will not synchronise gradients" in w for w in r["warnings"]), r


def write_tars(folder, sizes):
    """WebDataset tar shards written with the webdataset package: sample ``id`` = its
    global index."""
    wds = pytest.importorskip("webdataset")
    start = 0
    for k, size in enumerate(sizes):
        with wds.TarWriter(str(folder / f"train-{k:03d}.tar")) as sink:
            for i in range(start, start + size):
                sink.write({"__key__": f"s{i:06d}", "id.txt": str(i), "x.pyd": [i, i]})
        start += size
    return start


def formats(launcher, nproc, **cfg):
    import json

    return launch(launcher, nproc, "formats_run.py", json.dumps(cfg), timeout=200)


@pytest.mark.slow
@pytest.mark.parametrize("launcher, workers", [("torch", 0), ("torch", 2), ("horovod", 2)])
def test_webdataset_tar_shards_exactly_once_and_resumed_on_another_world(tmp_path, launcher,
                                                                          workers):
    total = write_tars(tmp_path, [23, 7, 31, 12, 18, 9])
    res = formats(launcher, 2, kind="wds", dir=str(tmp_path), batch_size=4, workers=workers,
                  epochs=[0, 1])
    assert [r["error"] for r in res] == [None, None]
    for e in ("0", "1"):
        assert sorted(i for r in res for i in r["epochs"][e]) == list(range(total))
    # a mid-epoch checkpoint on 2 ranks, resumed on 3: the rest exactly once
    state = tmp_path / "state.json"
    first = formats(launcher, 2, kind="wds", dir=str(tmp_path), batch_size=4,
                    workers=workers, stop_after=3, state_out=str(state))
    rest = formats("torch", 3, kind="wds", dir=str(tmp_path), batch_size=4, workers=0,
                   state_in=str(state))
    done = [i for r in first for i in r["epochs"]["0"]]
    more = [i for r in rest for i in r["epochs"]["0"]]
    assert 0 < len(done) <= 2 * 3 * 4 and sorted(done + more) == list(range(total))


@pytest.mark.slow
def test_shard_over_a_splitting_webdataset_pipeline_is_refused(tmp_path):
    write_tars(tmp_path, [5, 5])
    res = formats("torch", 2, kind="wds_shard", dir=str(tmp_path), batch_size=2)
    for r in res:
        assert r["type"] == "ShardingError" and "WebDataset" in r["error"], r


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_hf_datasets_with_format_torch_exactly_once_and_resumed(tmp_path, workers):
    pytest.importorskip("datasets")
    res = formats("torch", 2, kind="hf", n=101, batch_size=4, workers=workers, epochs=[0, 1])
    assert [r["error"] for r in res] == [None, None]
    for e in ("0", "1"):
        assert sorted(i for r in res for i in r["epochs"][e]) == list(range(101))
    state = tmp_path / "state.json"
    first = formats("torch", 2, kind="hf", n=101, batch_size=4, workers=workers,
                    stop_after=5, state_out=str(state))
    rest = formats("horovod", 3, kind="hf", n=101, batch_size=4, workers=0,
                   state_in=str(state))
    done = [i for r in first for i in r["epochs"]["0"]]
    more = [i for r in rest for i in r["epochs"]["0"]]
    assert sorted(done + more) == list(range(101))
