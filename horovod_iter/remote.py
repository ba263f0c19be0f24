"""Shards from object stores: fetched through fsspec into a bounded local cache, ahead of the
reader, so that a ``read(path)`` written for local files reads ``s3://``, ``gs://``, ``az://``,
``http(s)://`` (anything fsspec opens) unchanged.

* A shard is downloaded whole into ``cache_dir`` (to a temporary name, then renamed: a reader
  never sees half a file), under a name derived from its URL, so ranks and DataLoader workers
  on one host share the cache: a shard another consumer already fetched is not fetched again.
* The cache holds at most ``limit`` bytes: before a download, the least recently used files
  (by modification time; a use touches it) are evicted, never one that a process of the host
  has open: a reader holds a shared ``flock`` on its shards, an eviction takes an exclusive one
  first. A consumer opens another shard only while the shards open on the host leave room.
* Transient errors are retried ``retries`` times with exponential backoff; a shard that does
  not exist is reported at once (`ShardingError` naming the URL), as is one larger than the
  whole cache.
* `ShardCache.want` downloads the next shards on a background thread while the current
  ones are read, never past the cache limit.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import ShardingError

__all__ = ["ShardCache", "is_remote", "local_path"]

_STALE_S = 3600.0  # a download file untouched this long is a crashed process's: removed
_PERMANENT = (ValueError, TypeError, ShardingError)  # not worth a retry


def is_remote(shard: Any) -> bool:
    """A URL with a scheme other than ``file://`` (``s3://``, ``https://``, ``memory://`` ...)."""
    return isinstance(shard, str) and "://" in shard and not shard.startswith("file://")


def local_path(shard: Any) -> Any:
    """``file://`` URLs as paths; anything else unchanged."""
    if isinstance(shard, str) and shard.startswith("file://"):
        return shard[len("file://"):]
    return shard


class ShardCache:
    """A bounded local cache of remote shards (see the module docstring).

    Args:
        cache_dir: where shards are kept (shared by the processes of a host).
        limit: bytes the cache may hold on disk.
        storage_options: passed to ``fsspec.url_to_fs`` (credentials, ``endpoint_url`` ...).
        retries: attempts after the first for a transient error.
        backoff: seconds before the first retry (doubled each time).
    """

    def __init__(self, cache_dir: str | os.PathLike[str], limit: int,
                 storage_options: dict[str, Any] | None = None, retries: int = 5,
                 backoff: float = 0.5) -> None:
        self.check_limit(limit)
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self.storage_options = dict(storage_options or {})
        self.retries, self.backoff = retries, backoff
        self._pinned: dict[str, tuple[int, int]] = {}  # name -> (locked fd, opens) here
        self._sizes: dict[str, int] = {}       # url -> remote size
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wanted: list[str] = []
        self._wanted_cv = threading.Condition()
        self._fetched: set[str] = set()        # prefetched (or failed: the reader retries)
        self._closed = False
        self._fs: dict[str, Any] = {}
        #: bytes downloaded, and files evicted, by this process
        self.downloaded_bytes = 0
        self.evicted = 0

    @staticmethod
    def check_limit(limit: Any) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"cache_limit must be a positive number of bytes, got {limit!r}")

    # -- paths ----------------------------------------------------------------------------
    def name(self, url: str) -> str:
        digest = hashlib.blake2b(url.encode(), digest_size=10).hexdigest()
        return f"{digest}-{os.path.basename(url.rstrip('/'))[-80:] or 'shard'}"

    def _filesystem(self, url: str) -> tuple[Any, str]:
        """(fsspec filesystem, path in it) of ``url`` (fsspec caches the filesystems)."""
        if url not in self._fs:
            try:
                import fsspec  # an optional dependency: only remote shards need it

                self._fs[url] = fsspec.url_to_fs(url, **self.storage_options)
            except ImportError as e:
                scheme = url.split("://", 1)[0]
                raise ShardingError(
                    f"shard {url}: reading {scheme}:// URLs needs fsspec and its driver for "
                    f"{scheme} ({e}); pip install 'horovod_iter[remote]' (s3fs), gcsfs, adlfs "
                    "or the package fsspec names") from e
        fs, path = self._fs[url]
        return fs, path

    def size(self, url: str) -> int:
        """The shard's size in bytes (asked once)."""
        if url not in self._sizes:
            fs, path = self._filesystem(url)
            info = self._retry(url, "look up", lambda: fs.info(path))
            self._sizes[url] = int(info.get("size") or 0)
        return self._sizes[url]

    # -- use ------------------------------------------------------------------------------
    def open(self, url: str) -> str:
        """The shard's local path, downloaded if needed, pinned until `release`: a shared
        ``flock`` on it, which every process's eviction respects."""
        name = self.name(url)
        with self._lock:
            if name in self._pinned:
                fd, n = self._pinned[name]
                self._pinned[name] = (fd, n + 1)
                return str(self.dir / name)
        for _ in range(5):  # evicted between the download and the lock: fetch it again
            target = self._ensure(url, name)
            try:
                fd = os.open(target, os.O_RDONLY)
            except FileNotFoundError:
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                if os.fstat(fd).st_ino == os.stat(target).st_ino:
                    with self._lock:
                        self._pinned[name] = (fd, 1)
                    return str(target)
            except FileNotFoundError:
                pass
            os.close(fd)
        raise ShardingError(f"shard {url}: evicted from the cache {self.dir} before it could "
                            "be opened, 5 times; raise cache_limit (the open shards of this "
                            "host's consumers do not fit)")

    def release(self, url: str) -> None:
        """The reader is done with the shard: it may be evicted."""
        name = self.name(url)
        with self._lock:
            fd, n = self._pinned.get(name, (-1, 0))
            if n > 1:
                self._pinned[name] = (fd, n - 1)
                return
            self._pinned.pop(name, None)
        if fd >= 0:
            os.close(fd)  # drops the lock

    def has_room(self, url: str) -> bool:
        """Whether ``url`` fits beside the shards open in any process of this host."""
        if (self.dir / self.name(url)).exists():
            return True
        held = sum(size for name, size, _ in self._files(reserved=True)
                   if name.startswith(".") or self._in_use(name))  # open, or downloading
        return held + self.size(url) <= self.limit

    def _in_use(self, name: str) -> bool:
        """Whether some process (this one included) holds the shard open."""
        if name in self._pinned:
            return True
        with self._exclusively(name) as free:
            return free is False

    @contextlib.contextmanager
    def _exclusively(self, name: str) -> Iterator[bool | None]:
        """An exclusive, non-blocking ``flock`` on a cached shard, held in the block: True if
        taken (nobody has it open), False if some process has it open, None if it is gone."""
        try:
            fd = os.open(self.dir / name, os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
            else:
                yield True
        finally:
            os.close(fd)

    def want(self, urls: Iterable[str]) -> None:
        """Download these shards in the background, in order, while there is room (the next
        shards the reader will open); replaces the previous list."""
        with self._wanted_cv:
            self._wanted = list(urls)
            self._wanted_cv.notify()
        if self._thread is None and self._wanted:
            self._thread = threading.Thread(target=self._prefetch_loop, daemon=True,
                                            name="horovod_iter-shard-prefetch")
            self._thread.start()

    def _prefetch_loop(self) -> None:
        while not self._closed:
            with self._wanted_cv:
                url = next((u for u in self._wanted if u not in self._fetched), None)
                if url is None:
                    self._wanted_cv.wait(timeout=1.0)
                    continue
            try:
                if self.has_room(url):
                    self._ensure(url, self.name(url), evict_for_prefetch=True)
                    self._fetched.add(url)
                    continue
            except _NoRoom:
                pass
            except Exception:  # the reader meets it again, and reports it
                self._fetched.add(url)
                continue
            with self._wanted_cv:  # no room now: wait for the reader to move on
                self._wanted_cv.wait(timeout=0.2)

    def close(self) -> None:
        """Stop the background downloads (a download in progress finishes)."""
        self._closed = True
        with self._wanted_cv:
            self._wanted = []
            self._wanted_cv.notify()
        t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join(timeout=60)

    def usage(self) -> int:
        """Bytes of shards in the cache (all processes' files)."""
        return sum(size for _, size, _ in self._files())

    # -- internals ------------------------------------------------------------------------
    def _file_size(self, name: str) -> int:
        try:
            return (self.dir / name).stat().st_size
        except OSError:
            return 0

    def _files(self, reserved: bool = False) -> list[tuple[str, int, float]]:
        """(name, bytes, mtime) of the cached shards; with ``reserved``, also the downloads
        in progress (their space is reserved up front), which are never evicted."""
        out = []
        with os.scandir(self.dir) as it:
            for e in it:
                tmp = e.name.startswith(".") and e.name.endswith(".tmp")
                if (e.name.startswith(".") and not (reserved and tmp)) or not e.is_file():
                    continue
                try:
                    st = e.stat()
                except OSError:
                    continue
                if tmp and time.time() - st.st_mtime > _STALE_S:  # a crashed download
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)
                    continue
                out.append((e.name, st.st_size, st.st_mtime))
        return out

    def _ensure(self, url: str, name: str, evict_for_prefetch: bool = False) -> Path:
        target = self.dir / name
        if target.exists():
            try:
                os.utime(target)  # a use: the least recently used go first
                return target
            except FileNotFoundError:  # evicted by another process just now
                pass
        size = self.size(url)
        if size > self.limit:
            raise ShardingError(f"shard {url} is {size} bytes, more than the whole cache "
                                f"(cache_limit={self.limit}); raise cache_limit")
        fs, path = self._filesystem(url)
        tmp = self.dir / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        self._reserve(tmp, size, keep=name, prefetching=evict_for_prefetch)

        def download() -> None:
            fs.get_file(path, str(tmp))
            os.replace(tmp, target)

        try:
            self._retry(url, "download", download)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self.downloaded_bytes += size
        return target

    def _reserve(self, tmp: Path, incoming: int, keep: str, prefetching: bool) -> None:
        """Evict until ``incoming`` bytes fit, and reserve them (a file of that size at
        ``tmp``), as one step under the host's cache lock, so that consumers downloading at
        once do not all count the same free space. A prefetch that does not fit raises
        `_NoRoom`; a reader goes ahead (it needs the shard to make progress)."""
        lock = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            total = sum(size for _, size, _ in self._files(reserved=True))
            for name, size, _ in sorted(self._files(), key=lambda f: f[2]):  # oldest first
                if total + incoming <= self.limit:
                    break
                if name == keep or name in self._pinned:
                    continue
                total -= self._evict(name, size)
            if total + incoming > self.limit and prefetching:
                raise _NoRoom()
            with open(tmp, "wb") as f:
                f.truncate(incoming)
        finally:
            os.close(lock)

    def _evict(self, name: str, size: int) -> int:
        """Remove a shard nobody has open (an exclusive lock first); bytes freed."""
        with self._exclusively(name) as free:
            if free is None:
                return size  # gone already
            if not free:
                return 0  # open in another process
            with contextlib.suppress(FileNotFoundError):
                (self.dir / name).unlink()
                self.evicted += 1
            return size

    def _retry(self, url: str, what: str, fn: Any) -> Any:
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise ShardingError(f"shard {url} does not exist (or is not readable with "
                                    "these storage_options); check the URL and the "
                                    "shard list") from None
            except PermissionError as e:
                raise ShardingError(f"shard {url}: permission denied ({e}); check the "
                                    "credentials in storage_options / the environment") from e
            except _PERMANENT:
                raise
            except Exception as e:  # network, throttling, a server error: try again
                if attempt == self.retries:
                    raise ShardingError(f"shard {url}: {what} failed {attempt + 1} times, "
                                        f"last with {type(e).__name__}: {e}") from e
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover


class _NoRoom(Exception):
    """A prefetch would have to evict a shard in use: it stops."""
