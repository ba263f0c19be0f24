"""CUDA tests of the side-stream prefetcher, one or more per row of issue 24 (skipped without a
GPU; `scripts/gpu_check.py` runs them with the throughput and memory figures).

Races are provoked, not hoped for: ``torch.cuda._sleep`` keeps one stream busy so that a
missing ``wait_stream``/``record_stream``/event would let another stream read unwritten or
reused memory, and every value is checked after the loop (no sync per step, which would hide
the race). Memory is read from the caching allocator's ``active_bytes`` (blocks in use or
waiting for their streams), never from a clock.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import IterableDataset, TensorDataset

import horovod_iter as hi
from horovod_iter import prefetch
from horovod_iter.prefetch import resolve_device

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MS = 1_400_000  # torch.cuda._sleep cycles of about a millisecond (clocks of 1.1-2 GHz)


def _active_bytes() -> int:
    return int(torch.cuda.memory_stats().get("active_bytes.all.current", 0))


def _peak_active_bytes() -> int:
    return int(torch.cuda.memory_stats().get("active_bytes.all.peak", 0))


# -- row 1: a batch already on the GPU -------------------------------------------------------

def test_row1_gpu_batch_is_read_by_the_transform_only_after_its_producer_wrote_it():
    """The producer's stream writes each batch late (busy first); the slow transform on the
    side stream must see the written values, and the producer's next batch must not get the
    block of one the side stream still reads (record_stream on the side stream)."""
    n = 1 << 22  # 16 MB of float32

    def produce():
        for i in range(12):
            x = torch.empty(n, device="cuda")
            torch.cuda._sleep(5 * MS)  # the producer stream is busy: the write comes late
            x.fill_(i)
            yield x
            del x  # the block may go to the next batch once nobody uses it

    def transform(x: torch.Tensor) -> torch.Tensor:
        torch.cuda._sleep(3 * MS)  # reads late, on the side stream
        return x * 2

    got = list(hi.CudaPrefetcher(produce(), device="cuda", depth=3, device_transform=transform))
    torch.cuda.synchronize()
    for i, b in enumerate(got):
        assert bool((b == 2 * i).all()), i


def test_row1_gpu_batch_without_transform_is_handed_out_in_order():
    xs = [torch.full((1000,), i, device="cuda") for i in range(5)]
    got = list(hi.CudaPrefetcher(iter(xs), device="cuda", depth=2))
    assert [int(b[0]) for b in got] == list(range(5))


# -- row 2: GPU-resident datasets with every default -----------------------------------------

def test_row2_gpu_resident_tensordataset_with_every_default():
    x = torch.arange(2000, dtype=torch.float32).view(-1, 2)
    y = torch.arange(1000)
    cpu = [(a.clone(), b.clone()) for a, b in hi.DistributedLoader(
        TensorDataset(x, y), batch_size=32, seed=3, device="cpu")]
    gpu = [(a, b) for a, b in hi.DistributedLoader(
        TensorDataset(x.cuda(), y.cuda()), batch_size=32, seed=3)]  # device, pin: defaults
    assert len(cpu) == len(gpu)
    for (a, b), (c, d) in zip(cpu, gpu):
        assert c.is_cuda and d.is_cuda
        assert torch.equal(a, c.cpu()) and torch.equal(b, d.cpu())


class _GpuStream(IterableDataset):
    def __iter__(self):
        for i in range(40):
            yield torch.full((3,), i, device="cuda")


def test_row2_gpu_resident_iterable_with_every_default():
    """Needs fetch.py to keep CUDA tensors away from torch's pin_memory() (see the report)."""
    got = [b for b in hi.DistributedLoader(_GpuStream(), batch_size=4)]
    assert [int(b[0, 0]) for b in got] == list(range(0, 40, 4))
    assert all(b.is_cuda for b in got)


def test_row2_pad_template_goes_to_other_ranks_on_the_cpu(monkeypatch):
    from horovod_iter.sync import EndOfDataSync

    backend = hi.init("local")
    sent = []

    def allgather_object(obj, **kwargs):
        sent.append(obj)
        return [obj]

    monkeypatch.setattr(backend, "allgather_object", allgather_object)
    batch = {"x": torch.ones(4, 3, device="cuda"), "tag": "a"}
    sync = EndOfDataSync(iter([batch]), backend, uneven="pad")
    next(sync)
    sync._share_template()
    assert sent and sent[0]["x"].device.type == "cpu" and sent[0]["x"].shape == (0, 3)
    sync.close()


def test_row2_gpu_resident_data_on_a_fetch_thread_is_finished_before_the_trainer_reads_it():
    """fetch_thread=True: the dataset's CUDA work runs on the fetch thread's stream, which the
    trainer's (a stream of its own here) and our side stream do not order against; the thread
    finishes it before handing the batch over."""
    base = torch.zeros(1 << 20, device="cuda")

    class Late(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            x = base.clone()
            torch.cuda._sleep(20 * MS)  # the write below lands late on this thread's stream
            return x.add_(i)

    loader = hi.DistributedLoader(Late(), batch_size=2, shuffle=False, fetch_thread=True,
                                  device="cuda")
    mine = torch.cuda.Stream()
    got = []
    with torch.cuda.stream(mine):
        for b in loader:
            got.append(b[:, 0].clone())  # read on the trainer's stream, no sync per step
    torch.cuda.synchronize()
    assert [v.tolist() for v in got] == [[float(2 * k), float(2 * k + 1)] for k in range(6)]


# -- row 3: device memory bounded whatever the host's lead -----------------------------------

@pytest.mark.parametrize("depth", [1, 3])
def test_row3_device_memory_is_bounded_when_the_host_runs_ahead(depth):
    """Slow steps and no sync in the loop: the host could issue every copy at once; the
    device memory held (allocated or waiting for a stream) stays within depth + 2 batches."""
    nbytes = 16 << 20
    host = [torch.full((nbytes // 4,), i, dtype=torch.float32).pin_memory() for i in range(4)]
    acc = torch.zeros((), device="cuda")
    torch.cuda.synchronize()
    base = _active_bytes()
    torch.cuda.reset_peak_memory_stats()
    pf = hi.CudaPrefetcher((host[i % 4] for i in range(32)), device="cuda", depth=depth)
    for b in pf:
        torch.cuda._sleep(10 * MS)  # the GPU is far behind the host
        acc += b[0]
    torch.cuda.synchronize()
    held = _peak_active_bytes() - base
    # depth + 2, and one more for the instant between the GPU passing a hand-out's mark and
    # the allocator seeing the event of the batch freed right after it (without the bound:
    # about 32 batches)
    assert held <= (depth + 3) * nbytes, (held / nbytes, depth)
    assert float(acc) == sum(i % 4 for i in range(32))
    assert pf.throttle_s > 0  # the host did wait for the GPU


# -- row 5: the library's own pinned buffers are never refilled while copied ------------------

def test_row5_pinned_gathers_are_not_reused_before_their_copy_is_done():
    """Every copy is held up behind a slow transform on the side stream while the host gathers
    the next batches into pinned memory: a pinned block reused before its copy ran would put
    another batch's rows into this one."""
    n, rows = 64, 1 << 14
    ds = TensorDataset(torch.arange(n).repeat_interleave(rows).view(n, rows))

    def slow(batch):
        torch.cuda._sleep(20 * MS)
        return batch

    loader = hi.DistributedLoader(ds, batch_size=2, shuffle=True, seed=4, device="cuda",
                                  prefetch=4, device_transform=slow)
    expected = [x.clone() for (x,) in hi.DistributedLoader(ds, batch_size=2, shuffle=True,
                                                          seed=4, device="cpu")]
    sums = [x.sum(dim=1) for (x,) in loader]
    torch.cuda.synchronize()
    assert len(sums) == len(expected)
    for step, (s, e) in enumerate(zip(sums, expected)):
        assert torch.equal(s.cpu(), e.sum(dim=1)), step


# -- row 6: errors at their own step ---------------------------------------------------------

def test_row6_transform_error_arrives_at_its_step_through_the_loader():
    calls = []

    def transform(batch):
        calls.append(1)
        if len(calls) == 4:
            raise ValueError("transform failed on batch 3")
        return batch

    loader = hi.DistributedLoader(TensorDataset(torch.arange(100)), batch_size=10,
                                  device="cuda", prefetch=3, device_transform=transform)
    got = []
    with pytest.raises(ValueError, match="batch 3"):
        for (x,) in loader:
            got.append(x.cpu())
    assert [int(x[0]) for x in got] == [0, 10, 20]
    assert loader.stats()["steps"] == 3


# -- row 7: one stream per device, made for us -----------------------------------------------

def test_row7_one_side_stream_across_passes_and_loaders_never_the_current_one():
    ds = TensorDataset(torch.arange(64))
    streams = set()
    for loader in (hi.DistributedLoader(ds, batch_size=8, device="cuda"),
                   hi.DistributedLoader(ds, batch_size=8, device="cuda")):
        for _ in range(3):
            it = iter(loader)
            next(it)
            streams.add(it._prefetcher._stream)
            it.close()
    assert len(streams) == 1
    (side,) = streams
    assert side == prefetch._side_stream(torch.device("cuda", torch.cuda.current_device()))
    assert side != torch.cuda.current_stream() and side != torch.cuda.default_stream()
    assert side.priority < 0  # torch's high-priority pool, not ProcessGroupNCCL's


def test_row7_a_stream_of_another_device_is_refused():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    with pytest.raises(ValueError, match="stream="):
        hi.CudaPrefetcher([], device="cuda:0", stream=torch.cuda.Stream("cuda:1"))


# -- row 8: the figures count the GPU waiting for a copy or transform ------------------------

def test_row8_data_wait_counts_the_gpu_stalled_by_a_slow_transform():
    def slow(x):
        torch.cuda._sleep(30 * MS)
        return x + 1

    pf = hi.CudaPrefetcher([torch.ones(1000) for _ in range(8)], device="cuda", depth=2,
                           device_transform=slow)
    for x in pf:
        x.sum()  # a consumer with nothing to do: it waits for every batch
    torch.cuda.synchronize()
    assert pf.device_wait_s > 0
    assert pf.wait_s == pytest.approx(pf.host_wait_s + pf.device_wait_s)


def test_row8_loader_stats_include_the_device_wait():
    def slow(batch):
        torch.cuda._sleep(30 * MS)
        return batch

    loader = hi.DistributedLoader(TensorDataset(torch.arange(64)), batch_size=8,
                                  device="cuda", device_transform=slow)
    for _ in loader:
        pass
    torch.cuda.synchronize()
    s = loader.stats()
    # the GPU part itself: the throttle waits for the mark after each ready event, so the
    # stalls before it are complete and counted at the next hand-out
    assert s["device_wait_s"] > 0
    assert s["data_wait_s"] >= s["device_wait_s"] and s["input_bound_fraction"] > 0


# -- row 9: device=None is this rank's GPU ---------------------------------------------------

def test_row9_device_none_is_the_local_rank_gpu():
    count = torch.cuda.device_count()
    for local_rank in range(4):
        assert resolve_device(None, local_rank) == torch.device("cuda", local_rank % count)
    assert resolve_device(None) == torch.device("cuda", torch.cuda.current_device())


# -- row 10: pinned figure, NVTX, static buffers ---------------------------------------------

def test_row10_pinned_bytes_and_nvtx_ranges():
    pf = hi.CudaPrefetcher([torch.ones(1 << 20) for _ in range(4)], device="cuda", nvtx=True)
    got = [x.sum() for x in pf]
    torch.cuda.synchronize()
    assert [float(s) for s in got] == [float(1 << 20)] * 4
    assert pf.pinned_bytes > 0  # the pinned copies of the pageable batches


def test_row10_static_buffers_feed_a_cuda_graph():
    src = [torch.full((256,), float(i)) for i in range(6)]
    pf = hi.CudaPrefetcher(src, device="cuda", depth=2, static_buffers=True)
    it = iter(pf)
    x = next(it)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up before capture, as torch's docs do
        y = x * 2
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x * 2
    results = []
    graph.replay()
    results.append(y.clone())
    for _ in range(1, 6):
        nxt = next(it)
        assert nxt.data_ptr() == x.data_ptr()
        graph.replay()
        results.append(y.clone())
    for nxt in pf:  # the next pass (epoch): the graph replays the same addresses
        assert nxt.data_ptr() == x.data_ptr()
        graph.replay()
        results.append(y.clone())
    torch.cuda.synchronize()
    assert [float(r[0]) for r in results] == [2.0 * i for i in range(6)] * 2


def test_row10_static_buffers_refuse_a_batch_of_another_shape_at_its_step():
    src = [torch.ones(4), torch.ones(4), torch.ones(3)]
    it = iter(hi.CudaPrefetcher(src, device="cuda", depth=2, static_buffers=True))
    next(it), next(it)
    with pytest.raises(ValueError, match="static_buffers=True"):
        next(it)
