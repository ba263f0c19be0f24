"""Shards on an object store: a real S3-compatible server (moto's server mode, from PyPI)
started on localhost by the test, read through s3fs: by 2 torchrun ranks into one bounded cache
they share (exactly once, resumed, the cache limit held, a deleted shard reported everywhere),
and in one process: a re-uploaded or deleted shard is never served from an old cached copy,
a stalled or refused endpoint ends with our error naming the URL, and every shard is
downloaded once (GETs counted by the server)."""
from __future__ import annotations

import collections
import json
import logging
import os
import socket
import threading
import time
from typing import Any, NamedTuple

import pytest
from harness import launch

pytestmark = [pytest.mark.timeout(600)]
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")

SIZES = [40, 25, 60, 10, 35, 50, 20, 45, 30, 55, 15, 5]   # 390 records in 12 shards
LINE = 200                                                # bytes a record takes in its file


def body(first: int, n: int, pad: str = "x") -> bytes:
    """A JSON-lines shard of records ``first .. first + n - 1``, ``LINE`` bytes each."""
    return "".join(json.dumps({"id": first + j, "pad": pad * (LINE - 30)}).ljust(LINE - 1)
                   + "\n" for j in range(n)).encode()


class Requests:
    """WSGI middleware around moto's app: counts the GETs of each object (the downloads)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.gets: collections.Counter[str] = collections.Counter()
        self.heads: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        method = environ["REQUEST_METHOD"]
        if method in ("GET", "HEAD") and path.strip("/").count("/") >= 1:
            with self.lock:
                (self.gets if method == "GET" else self.heads)[path.lstrip("/")] += 1
        return self.app(environ, start_response)

    def total(self, prefix: str, method: str = "GET") -> int:
        with self.lock:
            counts = self.gets if method == "GET" else self.heads
            return sum(n for key, n in counts.items() if key.startswith(prefix))


class Store(NamedTuple):
    endpoint: str
    client: Any
    requests: Requests


@pytest.fixture(scope="module")
def s3():
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)  # the ranks inherit them
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    requests = Requests(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, requests, True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="data")
    k = 0
    for i, n in enumerate(SIZES):
        client.put_object(Bucket="data", Key=f"train/s{i:03d}.jsonl", Body=body(k, n))
        k += n
    yield Store(endpoint, client, requests)
    server.shutdown()
    thread.join()


def urls():
    return [f"s3://data/train/s{i:03d}.jsonl" for i in range(len(SIZES))]


def run(n, tmp, endpoint, cache="cache", limit=None, timeout=240, **cfg):
    return launch("torch", n, "sharded_run.py", json.dumps(dict(
        urls=urls(), endpoint=endpoint, cache_dir=str(tmp / cache),
        cache_limit=limit or 1 << 30, batch_size=4, **cfg)), timeout=timeout)


def all_ids(res, epoch=0):
    return sorted(i for r in res for b in r["epochs"][str(epoch)] for i in b)


@pytest.mark.distributed
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_s3_shards_exactly_once_within_a_bounded_shared_cache(s3, tmp_path, workers):
    """A cache of 4 of the largest shards for 2 ranks x workers on one host: every record
    once in both epochs, and the cache never held more than its limit plus the shards being
    downloaded at that moment by the other consumers (one each at most)."""
    endpoint = s3.endpoint
    limit = 4 * max(SIZES) * LINE
    gets = s3.requests.total("data/")
    res = run(2, tmp_path, endpoint, limit=limit, workers=workers, epochs=[0, 1])
    gets = s3.requests.total("data/") - gets
    assert [r["error"] for r in res] == [None, None]
    for e in (0, 1):
        assert all_ids(res, e) == list(range(sum(SIZES)))
    consumers = 2 * max(1, workers)
    held = max(r["cache_max"] for r in res)
    assert held <= limit + (consumers - 1) * max(SIZES) * LINE, (held, limit)
    print(f"cache limit {limit} B, most held {held} B; {gets} GETs for 2 x 12 shard reads")


@pytest.mark.distributed
@pytest.mark.slow
def test_s3_mid_epoch_resume_on_another_world(s3, tmp_path):
    endpoint = s3.endpoint
    state = tmp_path / "state.json"
    first = run(2, tmp_path, endpoint, stop_after=20, state_out=str(state))
    second = run(3, tmp_path, endpoint, cache="cache2", state_in=str(state))
    assert [r["error"] for r in first + second] == [None] * 5
    assert sorted(all_ids(first) + all_ids(second)) == list(range(sum(SIZES)))


@pytest.mark.distributed
@pytest.mark.slow
def test_a_deleted_shard_is_reported_on_every_rank_naming_its_url(s3, tmp_path):
    endpoint, client = s3.endpoint, s3.client
    client.delete_object(Bucket="data", Key="train/s004.jsonl")
    try:
        res = run(2, tmp_path, endpoint, timeout=180)
    finally:
        client.put_object(Bucket="data", Key="train/s004.jsonl", Body=body(135, SIZES[4]))
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


@pytest.mark.distributed
@pytest.mark.slow
def test_s3_shards_under_the_canonical_layout_resume_from_rank_0s_count(s3, tmp_path):
    """Elastic determinism over S3: 2 ranks x 2 workers read the canonical layout (shards
    split between streams, read with the cache), rank 0 alone saves the position (a count),
    and 3 ranks without workers read the rest: every record once."""
    endpoint = s3.endpoint
    state = tmp_path / "state.json"
    canon = {"canonical": [6, 2], "sizes": SIZES, "global_batch_size": 12}
    first = run(2, tmp_path, endpoint, workers=2, stop_after=8, state_out=str(state),
                rank0_saves=True, **canon)
    second = run(3, tmp_path, endpoint, cache="cache2", state_in=str(state), **canon)
    assert [r["error"] for r in first + second] == [None] * 5, first + second
    assert sorted(all_ids(first) + all_ids(second)) == list(range(sum(SIZES)))
    assert len(all_ids(first)) == 8 * 12


# -- in one process ------------------------------------------------------------------------
def read_ids(path):
    with open(path) as f:
        return [json.loads(line)["id"] for line in f]


def options(endpoint: str) -> dict[str, Any]:
    return {"client_kwargs": {"endpoint_url": endpoint}}


def loader_ids(ds, workers: int, **kw: Any) -> list[int]:
    import horovod_iter as hi

    loader = hi.DistributedLoader(ds, batch_size=4, num_workers=workers, uneven="pad",
                                  collate_fn=list, **kw)
    return sorted(i for b in loader for i in b)


def test_a_reuploaded_shard_is_read_anew_and_a_deleted_one_is_an_error(s3, tmp_path):
    """The cache is keyed by the shard's content identity (its ETag here), checked at every
    open: new content of the same size under the same URL is downloaded again, not served
    from the copy a previous run left in the same cache; a deleted shard is an error naming
    its URL although a copy is cached."""
    import horovod_iter as hi

    client = s3.client
    client.create_bucket(Bucket="reup")
    url = "s3://reup/a.jsonl"
    client.put_object(Bucket="reup", Key="a.jsonl", Body=body(0, 5))

    def make():
        return hi.ShardedDataset([url], read_ids, cache_dir=str(tmp_path / "c"),
                                 storage_options=options(s3.endpoint))

    assert sorted(make()) == list(range(5))
    client.put_object(Bucket="reup", Key="a.jsonl", Body=body(100, 5))  # same size
    assert sorted(make()) == list(range(100, 105))
    client.delete_object(Bucket="reup", Key="a.jsonl")
    with pytest.raises(hi.ShardingError, match=r"s3://reup/a.jsonl does not exist"):
        list(make())


def test_without_an_etag_size_and_mtime_tell_a_changed_shard(tmp_path):
    """A filesystem whose ``info`` has no ETag (a local folder behind a URL scheme): its size
    and modification time key the cache."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    import horovod_iter as hi

    class Folder(LocalFileSystem):
        protocol = "folder"
        root_marker = "/"

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(str(path).removeprefix("folder://"))

    fsspec.register_implementation("folder", Folder, clobber=True)
    shard = tmp_path / "s.jsonl"
    shard.write_bytes(body(0, 3))
    url = f"folder://{shard}"

    def make():
        return hi.ShardedDataset([url], read_ids, cache_dir=str(tmp_path / "c"))

    assert sorted(make()) == [0, 1, 2]
    shard.write_bytes(body(7, 3))
    os.utime(shard, (time.time() + 5, time.time() + 5))  # a clock tick the test can see
    assert sorted(make()) == [7, 8, 9]
    shard.unlink()
    with pytest.raises(hi.ShardingError, match=r"folder://.*s.jsonl does not exist"):
        list(make())


def test_the_default_cache_folder_is_per_user(tmp_path, monkeypatch):
    import horovod_iter as hi

    monkeypatch.delenv("HOROVOD_ITER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ds = hi.ShardedDataset(["s3://b/k"], read_ids)
    assert ds.cache_dir == str(tmp_path / "xdg" / "horovod_iter" / "shards")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ds = hi.ShardedDataset(["s3://b/k"], read_ids)
    assert ds.cache_dir == str(tmp_path / "home" / ".cache" / "horovod_iter" / "shards")
    monkeypatch.setenv("HOROVOD_ITER_CACHE", str(tmp_path / "mine"))
    assert hi.ShardedDataset(["s3://b/k"], read_ids).cache_dir == str(tmp_path / "mine")


class Stalled:
    """A TCP server that accepts connections and never answers (a hung object store)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)  # held open, never read or written

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def refused_port() -> int:
    """A local port nothing listens on: a connection is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("endpoint", ["stalled", "refused"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_stalled_or_dead_store_ends_with_our_error_naming_the_url(tmp_path, monkeypatch,
                                                                     endpoint, workers):
    """A store that accepts and never answers, or refuses: the read ends with our error naming
    the shard's URL after the dataset's ``timeout`` (2 s here; the loader's is 120 s, so the
    error is the download's), with and without DataLoader workers, instead of blocking in
    the cache (before: not in 1500 s, 55 s when refused)."""
    import horovod_iter as hi

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")  # so that the client goes as far as the network
    server = Stalled() if endpoint == "stalled" else None
    port = server.port if server else refused_port()
    url = "s3://data/train/s000.jsonl"
    ds = hi.ShardedDataset([url], read_ids, cache_dir=str(tmp_path / "c"), timeout=2,
                           storage_options=options(f"http://127.0.0.1:{port}"))
    start = time.monotonic()
    try:
        with pytest.raises((hi.DataTimeoutError, hi.SampleError, hi.ShardingError)) as e:
            loader_ids(ds, workers, timeout=120)
    finally:
        if server:
            server.close()
    assert url in str(e.value), e.value
    assert "timeout" in str(e.value) or "failed" in str(e.value), e.value
    assert time.monotonic() - start < 100  # a generous margin over the 2 s bound


def counted_shards(s3, bucket: str, n: int, records: int) -> list[str]:
    s3.client.create_bucket(Bucket=bucket)
    for i in range(n):
        s3.client.put_object(Bucket=bucket, Key=f"s{i:03d}.jsonl",
                             Body=body(i * records, records))
    return [f"s3://{bucket}/s{i:03d}.jsonl" for i in range(n)]


@pytest.mark.parametrize("room", ["roomy", "small"])
@pytest.mark.parametrize("workers", [0, 2])
def test_download_ahead_downloads_each_shard_once(s3, tmp_path, workers, room):
    """60 shards read one after another (``interleave=1``) with ``download_ahead=2``: one GET
    per shard (counted by the server) with a cache that holds them all (and a second pass
    from it) and with one of 6 shards; one HEAD per open. A consumer waits for its own
    prefetch of a shard instead of downloading it again, a prefetch does not download a
    shard its reader has passed, and a prefetched shard is kept until it is read (before:
    96-117 GETs for one pass)."""
    import horovod_iter as hi

    bucket = f"ahead-{workers}-{room}"
    shards = counted_shards(s3, bucket, 60, 10)
    limit = 1 << 30 if room == "roomy" else 6 * 10 * LINE
    ds = hi.ShardedDataset(shards, read_ids, cache_dir=str(tmp_path / "c"), cache_limit=limit,
                           storage_options=options(s3.endpoint), download_ahead=2, seed=1,
                           interleave=1)
    passes = 2 if room == "roomy" else 1  # the second from the cache
    for _ in range(passes):
        assert loader_ids(ds, workers) == list(range(600))
    gets, heads = s3.requests.total(bucket + "/"), s3.requests.total(bucket + "/", "HEAD")
    print(f"workers={workers} cache={room}: {gets} GETs, {heads} HEADs for {passes} x 60 "
          "shards")
    assert heads <= passes * 60  # the identity is looked up once per open
    assert gets == 60, collections.Counter(
        {k: n for k, n in s3.requests.gets.items() if k.startswith(bucket) and n > 1})


def test_shards_split_between_consumers_are_downloaded_once_per_host(s3, tmp_path):
    """The canonical layout cuts shards between streams that 2 DataLoader workers read at
    once: each shard is still downloaded once (a consumer waits for the download another
    consumer of the host has under way)."""
    import horovod_iter as hi

    sizes = [17] * 24
    shards = counted_shards(s3, "split", 24, 17)
    ds = hi.ShardedDataset(shards, read_ids, cache_dir=str(tmp_path / "c"), sizes=sizes,
                           canonical_ranks=1, canonical_workers=2, interleave=3,
                           storage_options=options(s3.endpoint), download_ahead=2)
    loader = hi.DistributedLoader(ds, global_batch_size=8, num_workers=2, collate_fn=list)
    assert sorted(i for b in loader for i in b) == list(range(24 * 17))
    gets = s3.requests.total("split/")
    print(f"canonical 1x2 on 2 workers: {gets} GETs for 24 shards")
    assert gets == 24, collections.Counter(
        {k: n for k, n in s3.requests.gets.items() if k.startswith("split") and n > 1})


class Trickle:
    """An HTTP server whose HEAD answers at once and whose GET sends ``chunks`` pieces of 16 kB
    ``gap`` seconds apart, then (``stall``) holds the connection without the rest."""

    def __init__(self, chunks: int, gap: float, stall: bool) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        piece, total = 16 << 10, (chunks + stall) * (16 << 10)
        done = self.done = threading.Event()
        gets = self.gets = collections.Counter[str]()

        class Handler(BaseHTTPRequestHandler):
            def head(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(total))
                self.send_header("ETag", '"v1"')
                self.end_headers()

            def do_HEAD(self) -> None:
                self.head()

            def do_GET(self) -> None:
                gets[self.path] += 1
                self.head()
                for _ in range(chunks):
                    self.wfile.write(b"x" * piece)
                    self.wfile.flush()
                    done.wait(gap)
                if stall:
                    done.wait()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/shard.bin"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.done.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.timeout(300)
def test_a_download_that_stalls_midway_is_our_error_and_a_slow_one_is_not(tmp_path):
    """The bound is on progress, not on the whole download: 8 pieces 0.5 s apart (4 s in
    all) arrive with a 2 s timeout; a download that stops after 2 pieces is
    `DataTimeoutError` naming the URL."""
    pytest.importorskip("aiohttp")
    import horovod_iter as hi

    def sizes(path):
        return [os.path.getsize(path)]

    slow = Trickle(8, 0.5, stall=False)
    try:
        ds = hi.ShardedDataset([slow.url], sizes, cache_dir=str(tmp_path / "c"), timeout=2)
        assert list(ds) == [8 * (16 << 10)]
    finally:
        slow.close()
    stuck = Trickle(2, 0.0, stall=True)
    try:
        ds = hi.ShardedDataset([stuck.url], sizes, cache_dir=str(tmp_path / "c"), timeout=2)
        with pytest.raises(hi.DataTimeoutError, match="the download made no progress in 2 s") \
                as e:
            list(ds)
    finally:
        stuck.close()
    assert stuck.url in str(e.value)
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.timeout(300)
def test_a_consumer_waits_for_the_download_another_has_under_way(tmp_path):
    """Two caches of one folder (two consumers of a host) open one shard that arrives in 8
    pieces 0.5 s apart, with a 2 s timeout: one GET; the second waits for the first's
    download as long as bytes arrive. When that download stalls, the waiting one too ends
    with our error naming the URL."""
    pytest.importorskip("aiohttp")
    from horovod_iter.errors import DataTimeoutError
    from horovod_iter.remote import ShardCache

    for stall in (False, True):
        server = Trickle(8 if not stall else 2, 0.5, stall=stall)
        caches = [ShardCache(tmp_path / f"c{stall}", 1 << 20, timeout=2) for _ in range(2)]
        out: list[Any] = [None, None]

        def open_(k: int) -> None:
            try:
                out[k] = os.path.getsize(caches[k].open(server.url))  # noqa: B023
            except Exception as e:  # the test looks at it
                out[k] = e  # noqa: B023

        first = threading.Thread(target=open_, args=(0,))
        first.start()
        while not any(p.name.endswith(".tmp") for p in (tmp_path / f"c{stall}").iterdir()):
            time.sleep(0.01)  # the first download has started
        open_(1)
        first.join()
        server.close()
        if not stall:
            assert out == [8 << 14, 8 << 14] and server.gets["/shard.bin"] == 1, out
        else:
            assert all(isinstance(e, DataTimeoutError) and server.url in str(e) for e in out), out
