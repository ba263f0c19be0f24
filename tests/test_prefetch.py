from __future__ import annotations

import gc
import multiprocessing
from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import horovod_iter as hi
from horovod_iter.prefetch import batch_nbytes, tree_map

P = namedtuple("P", "a b")


@dataclass
class D:
    t: torch.Tensor
    tag: str


def nested(i: int):
    return {"p": P(torch.full((2, 3), i), [torch.tensor([i]), "label"]),
            "d": D(torch.tensor(i), "x"), "n": i}


def test_tree_map_keeps_structure_and_leaves():
    b = nested(3)
    out = tree_map(lambda t: t + 1, b)
    assert isinstance(out["p"], P) and isinstance(out["d"], D)
    assert out["p"].a.eq(4).all() and out["p"].b[1] == "label" and out["n"] == 3
    assert out["d"].tag == "x" and int(out["d"].t) == 4
    assert batch_nbytes(b) == 6 * 8 + 8 + 8


def test_cpu_prefetcher_passes_batches_in_order():
    src = [nested(i) for i in range(7)]
    for depth in (0, 1, 3, 10):
        got = list(hi.CudaPrefetcher(src, device="cpu", depth=depth))
        assert [int(b["d"].t) for b in got] == list(range(7))
        assert got[2]["p"].b[1] == "label"


def test_prefetcher_wraps_a_users_dataloader_and_reiterates():
    dl = DataLoader(TensorDataset(torch.arange(10)), batch_size=4)
    pf = hi.CudaPrefetcher(dl, device="cpu")
    assert [b[0].tolist() for b in pf] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(list(pf)) == 3  # each iter() is a new pass


def test_prefetcher_error_arrives_after_earlier_batches():
    def gen():
        yield 1
        yield 2
        raise KeyError("boom")

    pf = iter(hi.CudaPrefetcher(gen(), device="cpu", depth=3))
    assert next(pf) == 1 and next(pf) == 2
    with pytest.raises(KeyError, match="boom"):
        next(pf)


def test_prefetcher_close_closes_the_source():
    closed = []

    def gen():
        try:
            yield from range(100)
        finally:
            closed.append(True)

    with hi.CudaPrefetcher(gen(), device="cpu") as pf:
        next(iter(pf))
    assert closed == [True]
    with pytest.raises(ValueError, match="depth must be an int >= 0"):
        hi.CudaPrefetcher([], device="cpu", depth=-1)


def test_loader_workers_are_shut_down_on_break_and_gc():
    loader = hi.DistributedLoader(TensorDataset(torch.arange(400)), batch_size=4, num_workers=2)
    for i, _ in enumerate(loader):
        if i == 3:
            break
    gc.collect()
    assert multiprocessing.active_children() == []
    it = iter(loader)
    next(it)
    it.close()
    assert multiprocessing.active_children() == []


# ---- CUDA (skipped without a GPU) -------------------------------------------------------
cuda = pytest.mark.cuda


@cuda
def test_cuda_values_equal_cpu_path_and_nested_structures_arrive():
    items = [nested(i) for i in range(9)]
    got = list(hi.CudaPrefetcher(items, device="cuda", depth=2))
    for i, b in enumerate(got):
        assert b["p"].a.is_cuda and b["d"].t.is_cuda and b["p"].b[0].is_cuda
        assert b["p"].b[1] == "label" and b["n"] == i and isinstance(b["d"], D)
        assert torch.equal(b["p"].a.cpu(), items[i]["p"].a)


@cuda
@pytest.mark.parametrize("workers", [0, 2])
def test_cuda_loader_equals_cpu_loader(workers):
    ds = TensorDataset(torch.randn(1000, 17), torch.arange(1000))
    cpu = [(x.clone(), i.clone()) for x, i in hi.DistributedLoader(
        ds, batch_size=32, seed=3, device="cpu", num_workers=workers)]
    gpu = [(x.cpu(), i.cpu()) for x, i in hi.DistributedLoader(
        ds, batch_size=32, seed=3, device="cuda", num_workers=workers, prefetch=3)]
    assert len(cpu) == len(gpu)
    for (a, b), (c, d) in zip(cpu, gpu):
        assert torch.equal(a, c) and torch.equal(b, d)


@cuda
def test_cuda_no_batch_reordered_or_corrupted_when_memory_is_reused():
    """Slow consumer kernels + poisoned allocations: if a buffer were reused too early (a
    missing record_stream or event wait), poisoned values would show up in a batch."""
    n, rows = 64, 1 << 16
    ds = TensorDataset(torch.arange(n).repeat_interleave(rows).view(n, rows))
    loader = hi.DistributedLoader(ds, batch_size=2, shuffle=True, seed=1, device="cuda",
                                  prefetch=4)
    expected = [x.clone() for (x,) in hi.DistributedLoader(ds, batch_size=2, shuffle=True,
                                                          seed=1, device="cpu")]
    for step, (x,) in enumerate(loader):
        torch.cuda._sleep(2_000_000)  # keep the consumer stream busy
        checksum = x.sum(dim=1)
        poison = [torch.full_like(x, -1) for _ in range(4)]  # try to grab freed blocks
        del x
        assert torch.equal(checksum.cpu(), expected[step].sum(dim=1)), step
        del poison
    torch.cuda.synchronize()


def test_device_transform_on_cpu_runs_in_line_in_order():
    seen = []

    def to_float(batch):
        seen.append(int(batch[0, 0]))
        return batch.float() / 255

    src = [torch.full((2, 3), i, dtype=torch.uint8) for i in range(5)]
    got = list(hi.CudaPrefetcher(src, device="cpu", device_transform=to_float))
    assert seen == list(range(5))
    assert all(g.dtype == torch.float32 and torch.allclose(g, s.float() / 255)
               for g, s in zip(got, src))
    with pytest.raises(TypeError, match="device_transform must be callable"):
        hi.CudaPrefetcher(src, device="cpu", device_transform=3)


def test_loader_device_transform_values():
    ds = TensorDataset(torch.randint(0, 255, (20, 3, 4, 4), dtype=torch.uint8))
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)

    def normalise(batch):
        (x,) = batch
        return ((x.float() / 255) - mean,)

    plain = [x.clone() for (x,) in hi.DistributedLoader(ds, batch_size=6, seed=2, device="cpu")]
    done = [x for (x,) in hi.DistributedLoader(ds, batch_size=6, seed=2, device="cpu",
                                               device_transform=normalise)]
    assert all(torch.allclose(d, p.float() / 255 - mean) for d, p in zip(done, plain))


@cuda
def test_cuda_device_transform_is_ordered_after_the_copy_and_before_use():
    """uint8 images cross PCIe, become normalised floats on the side stream; the consumer's
    slow kernels and poisoned allocations must not see a half-done or reused batch."""
    n = 32
    ds = TensorDataset(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 256,
                                                                                   256).clone())

    def to_float(batch):
        (x,) = batch
        torch.cuda._sleep(1_000_000)  # a slow transform on the side stream
        return (x.float() * 2,)

    loader = hi.DistributedLoader(ds, batch_size=2, shuffle=False, device="cuda", prefetch=3,
                                  device_transform=to_float)
    for step, (x,) in enumerate(loader):
        torch.cuda._sleep(500_000)
        poison = [torch.full_like(x, -1) for _ in range(3)]
        want = torch.tensor([2 * (2 * step), 2 * (2 * step + 1)], dtype=torch.float32)
        assert x.dtype == torch.float32 and torch.equal(x[:, 0, 0, 0].cpu(), want), step
        del poison
    torch.cuda.synchronize()
