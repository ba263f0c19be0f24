"""horovod_iter.integrations.accelerate in one process, against the real accelerate and
transformers: the second sharding refused where accelerate's own dataloaders wrap ours
(BatchSamplerShard, the dispatcher, IterableDatasetShard), the HF Trainer's settings our
loader cannot honour refused where it builds one, and gathered rows put back in dataset order.
(The launched recipes are in tests/test_frameworks.py.)"""
from __future__ import annotations

import gc
import json
import warnings
from typing import Any

import pytest
import torch
from thread_world import ThreadWorld, run_all
from torch.utils.data import DataLoader
from toy_data import Ids, Mapped

import horovod_iter as hi
from horovod_iter.integrations import accelerate as acc_integration

accelerate = pytest.importorskip("accelerate")
from accelerate.data_loader import prepare_data_loader  # noqa: E402
from accelerate.state import AcceleratorState, GradientState, PartialState  # noqa: E402


@pytest.fixture
def fresh_accelerate(monkeypatch):
    """A clean accelerate state for the test, and again after it (the singletons are
    process-wide; a launcher's variables would make PartialState() set up a group)."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    gc.collect()  # the dataloaders an error left registered (accelerate's end() never ran)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def two_processes(monkeypatch):
    """accelerate believing it runs 2 processes (what its wrappers split over)."""
    PartialState()
    monkeypatch.setattr(PartialState, "num_processes", property(lambda self: 2), raising=False)


def test_batch_sampler_shard_around_our_sampler_is_refused(fresh_accelerate):
    sampler = hi.DistributedSampler(Ids(20), num_replicas=2, rank=0)
    dl = prepare_data_loader(DataLoader(Ids(20), sampler=sampler, batch_size=2),
                             num_processes=2, process_index=0)
    with pytest.raises(hi.ShardingError, match="BatchSamplerShard") as e:
        next(iter(dl))
    assert "horovod_iter.DistributedLoader" in str(e.value)
    # the same sampler in a plain DataLoader is fine, accelerate loaded or not (once the
    # refused dataloader is gone: accelerate unregisters one only at its end, or when freed)
    del dl, e
    gc.collect()
    assert len(list(DataLoader(Ids(20), sampler=sampler, batch_size=2))) == 5


def test_dispatched_dataloader_with_our_sampler_is_refused_at_set_epoch(fresh_accelerate,
                                                                        monkeypatch):
    """dispatch_batches=True: process 0 alone iterates; every rank gets set_epoch first."""
    two_processes(monkeypatch)
    sampler = hi.DistributedSampler(Ids(20), num_replicas=2, rank=1)
    dl = prepare_data_loader(DataLoader(Ids(20), sampler=sampler, batch_size=2),
                             put_on_device=True, dispatch_batches=True)
    assert type(dl).__name__ == "DataLoaderDispatcher"
    with pytest.raises(hi.ShardingError, match="dispatch_batches=True") as e:
        next(iter(dl))
    assert "rank 1" in str(e.value) and "DistributedLoader" in str(e.value)


class HookedSharded(hi.ShardedDataset):
    """The hook the lead adds to ShardedDataset (set_epoch and __iter__ in the main
    process): what accelerate does to it is refused."""

    def set_epoch(self, epoch: int) -> None:
        acc_integration.check_not_resharded(self, rank=self.rank, world=self.num_replicas,
                                            what="horovod_iter.ShardedDataset")
        super().set_epoch(epoch)


def shards(tmp_path) -> list[str]:
    paths = []
    for k, size in enumerate([7, 5, 9]):
        p = tmp_path / f"s{k}.jsonl"
        p.write_text("".join(json.dumps({"id": k * 100 + i}) + "\n" for i in range(size)))
        paths.append(str(p))
    return paths


def read(path: str) -> Any:
    with open(path) as f:
        return [json.loads(line)["id"] for line in f]


@pytest.mark.parametrize("dispatch", [True, False])
def test_accelerate_around_a_sharded_dataset_is_refused(fresh_accelerate, monkeypatch,
                                                        tmp_path, dispatch):
    """An IterableDataset is dispatched by default (26 + 28 of 58 samples before); with
    dispatch_batches=False it is wrapped in IterableDatasetShard: refused either way."""
    two_processes(monkeypatch)
    ds = HookedSharded(shards(tmp_path), read, rank=0, num_replicas=2)
    dl = prepare_data_loader(DataLoader(ds, batch_size=2), put_on_device=True,
                             dispatch_batches=dispatch, num_processes=2, process_index=0)
    with pytest.raises(hi.ShardingError, match="Dispatcher" if dispatch else
                       "IterableDatasetShard"):
        next(iter(dl))


def test_our_loader_is_never_refused_while_an_accelerate_dataloader_runs(fresh_accelerate):
    """Only our object inside the active dataloader's wrappers is refused: our loader
    iterated inside an accelerate loop over other data is fine."""
    other = prepare_data_loader(DataLoader(Ids(8), batch_size=2), num_processes=2,
                                process_index=0)
    loader = hi.DistributedLoader(Ids(12), batch_size=3, backend="local")
    for _ in other:
        assert sorted(int(i) for b in loader for i in b) == list(range(12))
        break


def test_an_accelerator_seeing_another_world_warns():
    """Our backend of 2 ranks, an Accelerator of 1 process (accelerate launch under
    horovodrun): the loader's construction warns, naming the fix."""
    def fn(b):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hi.DistributedLoader(Ids(8), batch_size=2, backend=b)
        return [str(w.message) for w in caught]

    AcceleratorState._reset_state(True)
    try:
        accelerate.Accelerator(cpu=True)
        for got in run_all(2, fn):
            assert any("will not synchronise gradients" in w for w in got), got
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


# -- the HF Trainer ------------------------------------------------------------------------
def tiny_trainer(tmp_path, checks: list[dict[str, Any]], **args: Any) -> Any:
    transformers = pytest.importorskip("transformers")

    def check(**kw: Any) -> hi.DistributedLoader:
        acc_integration.check_trainer(world=2, **kw)  # what the loader's construction calls
        return None

    class Trainer(transformers.Trainer):
        def get_train_dataloader(self):
            return check(**checks[0])

        def get_eval_dataloader(self, eval_dataset=None):
            return check(**checks[-1])

        def get_test_dataloader(self, test_dataset):
            return check(**checks[-1])

    config = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16,
                                     max_position_embeddings=8, num_labels=2)
    data = Mapped(8, lambda i: {"input_ids": torch.tensor([1, 2, 3]),
                                "labels": torch.tensor(i % 2)})
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                          report_to=[], disable_tqdm=True, **args)
    return Trainer(model=transformers.BertForSequenceClassification(config), args=args,
                   train_dataset=data, eval_dataset=data)


def test_hf_trainer_evaluate_or_predict_with_pad_and_no_even_batches_is_refused(
        fresh_accelerate, tmp_path):
    pad = {"uneven": "pad", "even_batches": False, "global_batch_size": None}
    trainer = tiny_trainer(tmp_path, [pad])
    with pytest.raises(ValueError, match=r"evaluate\(\).*even_batches=True"):
        trainer.evaluate()
    with pytest.raises(ValueError, match=r"predict\(\).*even_batches=True"):
        trainer.predict(trainer.eval_dataset)
    # training over uneven="pad" gathers nothing: not refused (get_train_dataloader's None
    # then fails inside HF, which is not ours)
    with pytest.raises(Exception) as e:
        trainer.train()
    assert "even_batches" not in str(e.value)


def test_hf_trainer_with_split_batches_is_refused_without_global_batch_size(
        fresh_accelerate, tmp_path):
    stop = {"uneven": "stop", "even_batches": False, "global_batch_size": None}
    trainer = tiny_trainer(tmp_path, [stop], accelerator_config={"split_batches": True})
    with pytest.raises(ValueError, match=r"split_batches=True.*global_batch_size="):
        trainer.train()
    given = {"uneven": "stop", "even_batches": False, "global_batch_size": 8}
    trainer = tiny_trainer(tmp_path, [given], accelerator_config={"split_batches": True})
    with pytest.raises(Exception) as e:  # passes our check; HF then fails on the None
        trainer.train()
    assert "split_batches" not in str(e.value)


def test_a_loader_built_inside_trainer_evaluate_is_checked(fresh_accelerate, tmp_path):
    """The wiring: DistributedLoader's construction calls check_trainer."""
    transformers = pytest.importorskip("transformers")
    backend = ThreadWorld(2).backends[0]  # a world of 2; the construction needs no peer

    class Trainer(transformers.Trainer):
        def get_eval_dataloader(self, eval_dataset=None):
            return hi.DistributedLoader(self.eval_dataset, batch_size=4, uneven="pad",
                                        backend=backend, timeout=1)  # unwired: no peer

    trainer = tiny_trainer(tmp_path, [{}])
    trainer.__class__ = Trainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # accelerate's 1 process beside our 2 ranks
        with pytest.raises(ValueError, match=r"evaluate\(\).*even_batches=True"):
            trainer.evaluate()


def test_outside_a_trainer_nothing_is_checked():
    acc_integration.check_trainer(world=2, uneven="pad", even_batches=False,
                                  global_batch_size=None)


# -- gathered rows in dataset order --------------------------------------------------------
@pytest.mark.parametrize("n, world, batch", [(101, 2, 8), (17, 3, 4), (5, 4, 2)])
def test_a_gather_per_step_of_even_batches_comes_back_in_dataset_order(n, world, batch):
    """Each step's batches gathered in rank order (gather_for_metrics, HF predict): the
    plan names every row (copies -1); in_dataset_order gives n rows, row i = sample i."""
    def fn(b):
        loader = hi.DistributedLoader(Ids(n), batch_size=batch, shuffle=False, uneven="pad",
                                      even_batches=True, mark_padding=hi.flag_padding(),
                                      backend=b, collate_fn=collate)
        steps = [torch.where(x["padding"], -1, x["id"]) for x in loader]
        return steps, acc_integration.gathered_order(loader).tolist(), loader

    def collate(items):
        return {"id": torch.stack(items)}

    res = run_all(world, fn)
    gathered = [i for s in range(len(res[0][0])) for r in res for i in r[0][s].tolist()]
    assert gathered == res[0][1] == res[-1][1]
    rows = torch.tensor([10 * i if i >= 0 else -7 for i in gathered])
    ordered = acc_integration.in_dataset_order((rows, {"p": rows.numpy()}), res[0][2])
    assert ordered[0].tolist() == [10 * i for i in range(n)]
    assert ordered[1]["p"].tolist() == [10 * i for i in range(n)]


def test_a_gather_per_rank_of_plain_pad_comes_back_in_dataset_order():
    """hi.gather_rows of each rank's concatenated rows (plain uneven="pad")."""
    def fn(b):
        loader = hi.DistributedLoader(Ids(23), batch_size=4, uneven="pad", backend=b, seed=3)
        loader.set_epoch(2)
        mine = torch.cat([x for x in loader])
        rows = hi.gather_rows(mine, backend=b)
        return rows.tolist(), acc_integration.gathered_order(loader, "per_rank").tolist(), \
            acc_integration.in_dataset_order(rows, loader, "per_rank").tolist()

    for rows, order, ordered in run_all(3, fn):
        assert rows == order and ordered == list(range(23))


def test_in_dataset_order_refuses_what_it_cannot_lay_out():
    loader = hi.DistributedLoader(Ids(10), batch_size=2, uneven="pad", backend="local")
    with pytest.raises(ValueError, match="even_batches=True"):
        acc_integration.gathered_order(loader)
    with pytest.raises(ValueError, match="has 10"):
        acc_integration.in_dataset_order(torch.zeros(9), loader, "per_rank")
    with pytest.raises(TypeError, match="uneven='pad'"):
        acc_integration.gathered_order(hi.DistributedLoader(Ids(10), batch_size=2,
                                                            backend="local"))
