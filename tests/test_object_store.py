"""Shards on an object store: a real S3-compatible server (moto's server mode, from PyPI)
started on localhost by the test, read through s3fs by 2 torchrun ranks into one bounded cache
they share; exactly once, resumed, the cache limit held, a deleted shard reported everywhere."""
from __future__ import annotations

import json
import os
import socket

import pytest
from harness import launch

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")

SIZES = [40, 25, 60, 10, 35, 50, 20, 45, 30, 55, 15, 5]   # 390 records in 12 shards
LINE = 200                                                # bytes a record takes in its file


@pytest.fixture(scope="module")
def s3():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)  # the ranks inherit them
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="data")
    k = 0
    for i, n in enumerate(SIZES):
        body = "".join(json.dumps({"id": k + j, "pad": "x" * (LINE - 30)}).ljust(LINE - 1)
                       + "\n" for j in range(n))
        client.put_object(Bucket="data", Key=f"train/s{i:03d}.jsonl", Body=body.encode())
        k += n
    yield endpoint, client
    server.stop()


def urls():
    return [f"s3://data/train/s{i:03d}.jsonl" for i in range(len(SIZES))]


def run(n, tmp, endpoint, cache="cache", limit=None, timeout=240, **cfg):
    return launch("torch", n, "sharded_run.py", json.dumps(dict(
        urls=urls(), endpoint=endpoint, cache_dir=str(tmp / cache),
        cache_limit=limit or 1 << 30, batch_size=4, **cfg)), timeout=timeout)


def all_ids(res, epoch=0):
    return sorted(i for r in res for b in r["epochs"][str(epoch)] for i in b)


@pytest.mark.parametrize("workers", [0, 2])
def test_s3_shards_exactly_once_within_a_bounded_shared_cache(s3, tmp_path, workers):
    """A cache of 4 of the largest shards for 2 ranks x workers on one host: every record
    once in both epochs, and the cache never held more than its limit plus the shards being
    downloaded at that moment by the other consumers (one each at most)."""
    endpoint, _ = s3
    limit = 4 * max(SIZES) * LINE
    res = run(2, tmp_path, endpoint, limit=limit, workers=workers, epochs=[0, 1])
    assert [r["error"] for r in res] == [None, None]
    for e in (0, 1):
        assert all_ids(res, e) == list(range(sum(SIZES)))
    consumers = 2 * max(1, workers)
    held = max(r["cache_max"] for r in res)
    assert held <= limit + (consumers - 1) * max(SIZES) * LINE, (held, limit)
    print(f"cache limit {limit} B, most held {held} B")


def test_s3_mid_epoch_resume_on_another_world(s3, tmp_path):
    endpoint, _ = s3
    state = tmp_path / "state.json"
    first = run(2, tmp_path, endpoint, stop_after=20, state_out=str(state))
    second = run(3, tmp_path, endpoint, cache="cache2", state_in=str(state))
    assert [r["error"] for r in first + second] == [None] * 5
    assert sorted(all_ids(first) + all_ids(second)) == list(range(sum(SIZES)))


def test_a_deleted_shard_is_reported_on_every_rank_naming_its_url(s3, tmp_path):
    endpoint, client = s3
    client.delete_object(Bucket="data", Key="train/s004.jsonl")
    try:
        res = run(2, tmp_path, endpoint, timeout=180)
    finally:
        body = "".join(json.dumps({"id": 135 + j, "pad": "x" * (LINE - 30)}).ljust(LINE - 1)
                       + "\n" for j in range(SIZES[4]))
        client.put_object(Bucket="data", Key="train/s004.jsonl", Body=body.encode())
    assert all(r["error"] for r in res), res
    assert any("s3://data/train/s004.jsonl" in r["error"] and "does not exist" in r["error"]
               for r in res), [r["error"] for r in res]


def test_transient_errors_are_retried_with_backoff_and_then_reported(tmp_path):
    """An fsspec filesystem whose downloads fail twice (a dropped connection): the shard is
    read after two retries; one that always fails is reported naming the URL and the count."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    import horovod_iter as hi

    class Flaky(MemoryFileSystem):
        protocol = "flaky"
        fails: dict[str, int] = {}  # noqa: RUF012 - shared on purpose: fsspec caches instances

        @classmethod
        def _strip_protocol(cls, path):
            return "/" + path.removeprefix("flaky://").lstrip("/")

        def get_file(self, rpath, lpath, **kw):
            n = Flaky.fails.get(rpath, 0)
            if n:
                Flaky.fails[rpath] = n - 1
                raise ConnectionError("connection reset by peer")
            return super().get_file(rpath, lpath, **kw)

    fsspec.register_implementation("flaky", Flaky, clobber=True)
    fs = Flaky()
    for i in range(3):
        fs.pipe(f"/d/s{i}.txt", "".join(f"{10 * i + j}\n" for j in range(10)).encode())
    Flaky.fails = {"/d/s1.txt": 2}

    def read(path):
        with open(path) as f:
            return [int(line) for line in f]

    ds = hi.ShardedDataset([f"flaky://d/s{i}.txt" for i in range(3)], read,
                           cache_dir=str(tmp_path / "c"), cache_limit=1 << 20)
    ds.cache().backoff = 0.01
    assert sorted(ds) == list(range(30)) and Flaky.fails["/d/s1.txt"] == 0
    Flaky.fails = {"/d/s2.txt": 99}
    again = hi.ShardedDataset([f"flaky://d/s{i}.txt" for i in range(3)], read,
                              cache_dir=str(tmp_path / "c2"), cache_limit=1 << 20)
    again.cache().backoff = 0.001
    with pytest.raises(hi.ShardingError, match=r"flaky://d/s2.txt: download failed 6 times"):
        list(again)
    with pytest.raises(ValueError, match="cache_limit must be a positive number of bytes"):
        hi.ShardedDataset(["flaky://d/s0.txt"], read, cache_limit=0)


def test_s3_shards_under_the_canonical_layout_resume_from_rank_0s_count(s3, tmp_path):
    """Elastic determinism over S3: 2 ranks x 2 workers read the canonical layout (shards
    split between streams, read with the cache), rank 0 alone saves the position (a count),
    and 3 ranks without workers read the rest: every record once."""
    endpoint, _ = s3
    state = tmp_path / "state.json"
    canon = dict(canonical=[6, 2], sizes=SIZES, global_batch_size=12)
    first = run(2, tmp_path, endpoint, workers=2, stop_after=8, state_out=str(state),
                rank0_saves=True, **canon)
    second = run(3, tmp_path, endpoint, cache="cache2", state_in=str(state), **canon)
    assert [r["error"] for r in first + second] == [None] * 5, first + second
    assert sorted(all_ids(first) + all_ids(second)) == list(range(sum(SIZES)))
    assert len(all_ids(first)) == 8 * 12
