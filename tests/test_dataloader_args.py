"""DistributedLoader as a drop-in for torch's DataLoader: its whole signature, the attributes
frameworks read, batch samplers (LengthGroupedBatchSampler), and no double sharding."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler as TorchDistributedSampler

import horovod_iter as hi


def tds(n=20):
    return TensorDataset(torch.arange(n))


def ids(loader):
    return [int(i) for (b,) in loader for i in b]


def test_every_dataloader_argument_is_accepted_by_name_and_position():
    torch_params = list(inspect.signature(DataLoader.__init__).parameters)[1:]
    ours = inspect.signature(hi.DistributedLoader.__init__).parameters
    for name in torch_params:
        assert name in ours, name
    positional = [p for p in torch_params
                  if inspect.signature(DataLoader.__init__).parameters[p].kind
                  is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert list(ours)[1:1 + len(positional)] == positional  # DataLoader(ds, 4, False, ...)


def test_torch_defaults_and_full_signature():
    loader = hi.DistributedLoader(tds(5))
    assert loader.batch_size == 1 and len(loader) == 5  # torch's default batch_size=1
    g = torch.Generator().manual_seed(3)
    loader = hi.DistributedLoader(tds(40), 4, False, None, None, 2, None, False, False, 0,
                                  None, "spawn", g, prefetch_factor=3,
                                  persistent_workers=False, pin_memory_device="",
                                  in_order=True)
    assert ids(loader) == list(range(40))
    assert (loader.num_workers, loader.prefetch_factor, loader.multiprocessing_context,
            loader.generator, loader.in_order, loader.sync_timeout, loader.timeout) == (
        2, 3, "spawn", g, True, None, 0.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prefetch_factor=2), "prefetch_factor option could only be specified"),
    (dict(multiprocessing_context="spawn"), "multiprocessing_context can only be used"),
    (dict(batch_size=None), "batch_size=None"),
    (dict(in_order=1), "in_order must be a bool"),
])
def test_torch_rules_for_bad_combinations(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        hi.DistributedLoader(tds(), **kwargs)


def test_batch_sampler_is_exclusive_with_batching_arguments():
    bs = BatchSampler(range(20), 4, False)
    for kwargs in (dict(batch_size=4), dict(shuffle=True), dict(drop_last=True),
                   dict(sampler=range(20))):
        with pytest.raises(ValueError, match="mutually exclusive"):
            hi.DistributedLoader(tds(), batch_sampler=bs, **kwargs)


def test_a_plain_batch_sampler_works_alone_like_torch():
    bs = BatchSampler(range(20), 6, False)
    loader = hi.DistributedLoader(tds(), batch_sampler=bs)
    assert loader.batch_size is None and loader.batch_sampler is bs and len(loader) == 4
    assert [len(b) for (b,) in loader] == [6, 6, 6, 2]
    assert ids(loader) == [int(i) for (b,) in DataLoader(tds(), batch_sampler=bs) for i in b]


def test_length_grouped_batches_cover_the_epoch_and_group_lengths():
    lengths = [int(x) for x in torch.randint(1, 500, (1000,), generator=torch.Generator()
                                              .manual_seed(0))]
    bs = hi.LengthGroupedBatchSampler(lengths, 16, group=8, seed=1)
    loader = hi.DistributedLoader(tds(1000), batch_sampler=bs)
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = [b.tolist() for (b,) in loader]
        assert sorted(i for b in batches for i in b) == list(range(1000))
        spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
        unsorted = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b)
                       for b in torch.arange(1000).split(16))
        assert spread < unsorted / 3  # batches hold similar lengths (padding saved)
    loader.set_epoch(0)
    first = [b.tolist() for (b,) in loader]
    loader.set_epoch(1)
    assert [b.tolist() for (b,) in loader] != first  # a new order each epoch


def test_length_grouped_resume_is_exact_on_any_world():
    lengths = list(range(1, 101))
    one = hi.DistributedLoader(tds(100), batch_sampler=hi.LengthGroupedBatchSampler(
        lengths, 8, seed=2))
    one.set_epoch(1)
    full = [b.tolist() for (b,) in one]
    it = iter(one)
    seen = [next(it)[0].tolist() for _ in range(5)]
    state = one.state_dict()
    it.close()
    # the same world: exactly the rest
    again = hi.DistributedLoader(tds(100), batch_sampler=hi.LengthGroupedBatchSampler(
        lengths, 8, seed=2))
    again.load_state_dict(state)
    assert seen + [b.tolist() for (b,) in again] == full
    # three ranks (simulated: each rank's sampler alone), the rest dealt anew, exactly once
    rest = []
    for r in range(3):
        bs = hi.LengthGroupedBatchSampler(lengths, 8, seed=2, num_replicas=3, rank=r)
        bs.load_state_dict(state["batch_sampler"])
        rest += [i for b in bs for i in b]
    assert sorted(rest + [i for b in seen for i in b]) == list(range(100))


def test_frameworks_attributes_and_the_samplers_epoch():
    loader = hi.DistributedLoader(tds(20), batch_size=4, shuffle=True, seed=5)
    assert isinstance(loader.sampler, TorchDistributedSampler)  # Lightning leaves it alone
    for attr in ("dataset", "batch_size", "sampler", "batch_sampler", "num_workers",
                 "drop_last", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
                 "multiprocessing_context", "generator", "prefetch_factor",
                 "persistent_workers", "pin_memory_device", "in_order"):
        assert hasattr(loader, attr), attr
    loader.sampler.set_epoch(3)  # what Lightning does each epoch
    got = [b.tolist() for (b,) in loader]
    assert loader.epoch == 3
    ref = hi.DistributedLoader(tds(20), batch_size=4, shuffle=True, seed=5)
    ref.set_epoch(3)
    assert got == [b.tolist() for (b,) in ref]
    assert [list(b) for b in loader.batch_sampler] == got  # what re-batching reads


