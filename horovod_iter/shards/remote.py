"""Shards from object stores: fetched through fsspec into a bounded local cache, ahead of the
reader, so that a ``read(path)`` written for local files reads ``s3://``, ``gs://``, ``az://``,
``http(s)://`` (anything fsspec opens) unchanged.

* **Content identity.** A cached copy is named after the shard's URL *and* its content
  identity from the filesystem's ``info`` (the ETag where there is one - S3, GCS, Azure,
  most HTTP servers - else size and modification time), looked up again each time a consumer
  opens the shard (one ``info`` per open, shared with the download ahead of it). A shard
  re-uploaded with new content gets a new copy, a deleted one is an error naming its URL,
  although an old copy is cached: the cache may outlive runs (its default folder is per user,
  `default_cache_dir`) and never serves stale data.
* A shard is downloaded whole into ``cache_dir`` (to a temporary name, then renamed: a reader
  never sees half a file), **once per host**: the ranks and DataLoader workers of a host share
  the cache, and a consumer that needs a shard another one (or its own download-ahead thread)
  is downloading waits for that download (a per-shard ``flock``) instead of starting another.
* The cache aims at ``limit`` bytes: before a download, the least recently used files
  (by modification time; a use touches it) are evicted, never one that a process of the host
  has open or downloaded ahead and not read yet: a reader holds a shared ``flock`` on its
  shards, as does the download-ahead thread on the shards it fetched until their reader takes
  them; an eviction takes an exclusive one first. A consumer opens another shard only while
  the shards held on the host leave room, and downloads ahead only within the limit; but a
  consumer with no shard open reads its next one even when the shards the others hold fill
  the cache (else it could never progress). **The bound on disk** is therefore ``limit`` plus
  one shard per other consumer of the host: ``limit + (C - 1) x the largest shard``, ``C``
  the host's ranks x DataLoader workers (measured: 2 ranks x 2 workers, a limit of 1 shard
  held up to 4; of 3 shards, up to 6). Size ``limit`` as the disk budget minus that.
* **Bounded waits.** Every ``info``, download and wait for another consumer's download ends
  within ``timeout`` seconds without progress (bytes arriving) with `DataTimeoutError`
  naming the URL: a stalled or dead endpoint does not block the reader. The call that
  stalled is abandoned on a daemon thread (fsspec's own timeouts end it later).
* Transient errors are retried ``retries`` times with exponential backoff, within the
  timeout; a shard that does not exist is reported at once (`ShardingError` naming the
  URL), as is one larger than the whole cache.
* `ShardCache.want` downloads the next shards on a background thread while the current
  ones are read, never past the cache limit.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..backend import DEFAULT_TIMEOUT
from ..errors import DataTimeoutError, ShardingError

__all__ = ["ShardCache", "content_identity", "default_cache_dir", "is_remote", "local_path"]

_STALE_S = 3600.0  # a download file untouched this long is a crashed process's: removed
_POLL_S = 0.25     # how often a wait looks at a download's progress
_PERMANENT = (ValueError, TypeError, ShardingError)  # not worth a retry
#: ``info`` fields that change with the content (checked in this order), then the times
_TAGS = ("ETag", "etag", "generation", "md5Hash", "Content-MD5", "content_md5")
_TIMES = ("mtime", "LastModified", "last_modified", "updated", "Last-Modified", "modified",
          "created")
_downloads = itertools.count()  # names this process's download files apart


def is_remote(shard: Any) -> bool:
    """A URL with a scheme other than ``file://`` (``s3://``, ``https://``, ``memory://`` ...)."""
    return isinstance(shard, str) and "://" in shard and not shard.startswith("file://")


def local_path(shard: Any) -> Any:
    """``file://`` URLs as paths; anything else unchanged."""
    if isinstance(shard, str) and shard.startswith("file://"):
        return shard[len("file://"):]
    return shard


def default_cache_dir() -> str:
    """Where shards are cached without ``cache_dir=``: ``$HOROVOD_ITER_CACHE``, else
    ``$XDG_CACHE_HOME/horovod_iter/shards``, else ``~/.cache/horovod_iter/shards``; a folder
    of this user's in the temporary directory when there is no home. Per user, so that one
    user's cache is never read (or blocked) by another's jobs."""
    env = os.environ.get("HOROVOD_ITER_CACHE")
    if env:
        return env
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "horovod_iter", "shards")
    home = os.path.expanduser("~")
    if home != "~" and os.path.isabs(home) and home != "/":
        return os.path.join(home, ".cache", "horovod_iter", "shards")
    return os.path.join(tempfile.gettempdir(), f"horovod_iter-{os.getuid()}", "shards")


def content_identity(info: Mapping[str, Any]) -> str | None:
    """What tells this version of a file from another, from fsspec's ``info``: its size and
    ETag (or generation, MD5), else its size and modification time; None when ``info`` has
    neither (then only the size can tell)."""
    size = info.get("size")
    for key in _TAGS + _TIMES:
        value = info.get(key)
        if value:
            return f"size={size} {key}={value}"
    return None


class _Deadline:
    """``timeout`` seconds without progress (None: no bound); progress pushes it back."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.at: float | None = None
        self.progress()

    def progress(self) -> None:
        if self.timeout is not None:
            self.at = time.monotonic() + self.timeout

    def left(self) -> float | None:
        return None if self.at is None else self.at - time.monotonic()


class _Stalled(Exception):
    """A call made no progress within its deadline (it is left running, abandoned)."""


class _NoRoom(Exception):
    """A prefetch would have to evict a shard in use: it waits."""


class _Passed(_NoRoom):
    """The reader came to the shard before its download ahead (or moved past it)."""


class ShardCache:
    """A bounded local cache of remote shards (see the module docstring).

    Args:
        cache_dir: where shards are kept (shared by the processes of a host).
        limit: bytes the cache aims at on disk; it holds at most ``limit`` plus one shard
            per other consumer (rank x worker) of the host (see the module docstring).
        storage_options: passed to ``fsspec.url_to_fs`` (credentials, ``endpoint_url`` ...).
        retries: attempts after the first for a transient error.
        backoff: seconds before the first retry (doubled each time).
        timeout: seconds a look-up, a download, or a wait for another consumer's download
            may go without progress before `DataTimeoutError` (None: no bound).
    """

    def __init__(self, cache_dir: str | os.PathLike[str], limit: int,
                 storage_options: dict[str, Any] | None = None, retries: int = 5,
                 backoff: float = 0.5, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.check_limit(limit)
        self.dir = Path(cache_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise ShardingError(f"cannot make the shard cache folder {self.dir} ({e}); pass "
                                "cache_dir= (or set HOROVOD_ITER_CACHE) to a writable folder "
                                "on a local disk") from e
        self.limit = limit
        self.storage_options = dict(storage_options or {})
        self.retries, self.backoff = retries, backoff
        if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
        self.timeout = None if timeout is None else float(timeout)
        self._fork()
        #: bytes downloaded, and files evicted, by this process
        self.downloaded_bytes = 0
        self.evicted = 0

    def _fork(self) -> None:
        """This process's own state: pins, download-ahead thread, locks (a forked copy of
        the cache, in a DataLoader worker, starts afresh; the parent keeps its pins)."""
        for fd in [fd for fd, _ in getattr(self, "_pinned", {}).values()] + [
                fd for _, fd in getattr(self, "_ahead", {}).values()]:
            with contextlib.suppress(OSError):
                os.close(fd)  # our copy only: the parent's lock stays
        self._pid = os.getpid()
        self._fs: dict[str, tuple[Any, str]] = {}  # url -> (filesystem, path): not fork-safe
        self._lock = threading.Lock()
        self._wanted_cv = threading.Condition(self._lock)
        self._pinned: dict[str, tuple[int, int]] = {}  # name -> (locked fd, opens) here
        self._open: dict[str, str] = {}        # url -> name of its open copy
        self._reading: set[str] = set()        # urls opened (or being opened) here
        self._ahead: dict[str, tuple[str, int]] = {}  # url -> (name, locked fd): downloaded
        self._infos: dict[str, tuple[int, str]] = {}  # url -> (size, name) last looked up
        self._checked: set[str] = set()        # looked up since their last open
        self._looking: dict[str, threading.Event] = {}  # look-ups under way (set when done)
        self._stats: dict[str, int] = {}       # url -> look-ups answered
        self._thread: threading.Thread | None = None
        self._wanted: list[str] = []
        self._fetched: set[str] = set()        # prefetched (or failed: the reader retries)
        self._closed = False
        self._warned = False

    def _here(self) -> None:
        if self._pid != os.getpid():
            self._fork()

    @staticmethod
    def check_limit(limit: Any) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"cache_limit must be a positive number of bytes, got {limit!r}")

    # -- identity -------------------------------------------------------------------------
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

    def _stat(self, url: str) -> tuple[int, str]:
        """(size, cache name) of the shard as the store has it now: one ``info`` call, past
        any listing fsspec cached."""
        fs, path = self._filesystem(url)

        def look() -> Any:
            with contextlib.suppress(Exception):
                fs.invalidate_cache(path)
            return fs.info(path)

        info = self._retry(url, "look-up", look, _Deadline(self.timeout))
        if info.get("type") not in (None, "file"):
            raise ShardingError(f"shard {url} does not exist (it is a {info.get('type')}, "
                                "not a file); check the URL and the shard list")
        size = int(info.get("size") or 0)
        identity = content_identity(info)
        if identity is None:
            identity = f"size={size}"
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"shard {url}: the filesystem's info gives no ETag nor modification time "
                    f"({sorted(info)}), so the shard cache {self.dir} can tell a changed "
                    "shard only by its size; empty the cache after re-uploading shards",
                    stacklevel=3)
        digest = hashlib.blake2b(f"{url}\n{identity}".encode(), digest_size=10).hexdigest()
        return size, f"{digest}-{os.path.basename(url.rstrip('/'))[-80:] or 'shard'}"

    def _lookup(self, url: str, fresh: bool, opening: bool = False,
                ahead: bool = False) -> tuple[int, str]:
        """(size, name) of ``url``: ``fresh``, the store's answer since the last open (a
        download or an open must not go by an old identity; the download ahead's look-up
        serves the open that follows it), else the last one known (room estimates). A
        look-up under way in another thread answers this one too; one for the download
        ``ahead`` is dropped (`_NoRoom`) once the reader has come to the shard."""
        while True:
            with self._lock:
                if ahead and (url in self._reading or url not in self._wanted):
                    raise _Passed()
                known = self._infos.get(url)
                if known is not None and (url in self._checked or not fresh):
                    if opening:
                        self._checked.discard(url)
                    return known
                pending = self._looking.get(url)
                if pending is None:  # ours to look up
                    pending = self._looking[url] = threading.Event()
                    break
                answered = self._stats.get(url, 0)
            pending.wait()  # the other thread's look-up (bounded by the timeout) answers
            with self._lock:
                known = self._infos.get(url)
                if known is not None and self._stats.get(url, 0) > answered:
                    if opening:
                        self._checked.discard(url)
                    return known
        try:
            known = self._stat(url)
            with self._lock:
                self._stats[url] = self._stats.get(url, 0) + 1
                self._infos[url] = known
                if opening:
                    self._checked.discard(url)
                else:
                    self._checked.add(url)
        finally:
            with self._lock:
                del self._looking[url]
            pending.set()
        return known

    def size(self, url: str) -> int:
        """The shard's size in bytes (as last looked up)."""
        self._here()
        return self._lookup(url, fresh=False)[0]

    # -- use ------------------------------------------------------------------------------
    def open(self, url: str) -> str:
        """The shard's local path - the copy of the content the store has now, downloaded if
        needed - pinned until `release`: a shared ``flock`` on it, which every process's
        eviction respects."""
        self._here()
        with self._lock:
            name = self._open.get(url)
            if name is not None:  # open already here: the same copy
                held, n = self._pinned[name]
                self._pinned[name] = (held, n + 1)
                return str(self.dir / name)
            self._reading.add(url)  # the download ahead leaves it alone from now on
        try:
            size, name = self._lookup(url, fresh=True, opening=True)
            with self._lock:
                ahead = self._ahead.pop(url, None)
            fd: int | None = None
            if ahead is not None:
                if ahead[0] == name:
                    fd = ahead[1]  # downloaded ahead (and pinned since): the reader takes it
                else:
                    os.close(ahead[1])
            if fd is None:
                fd = self._fetch(url, size, name, prefetching=False)
        except BaseException:
            with self._lock:
                self._reading.discard(url)
            raise
        with self._lock:
            self._pinned[name] = (fd, 1)
            self._open[url] = name
            self._fetched.discard(url)  # a later pass may download it ahead again
        return str(self.dir / name)

    def release(self, url: str) -> None:
        """The reader is done with the shard: it may be evicted."""
        self._here()
        with self._lock:
            name = self._open.get(url)
            if name is None:
                return
            fd, n = self._pinned[name]
            if n > 1:
                self._pinned[name] = (fd, n - 1)
                return
            del self._pinned[name], self._open[url]
            self._reading.discard(url)
        os.close(fd)  # drops the lock

    def has_room(self, url: str) -> bool:
        """Whether ``url`` fits beside the shards held (open, downloading, or downloaded
        ahead and not read yet) in any process of this host."""
        self._here()
        size, name = self._lookup(url, fresh=False)
        if (self.dir / name).exists():
            return True
        held = sum(n for f, n, _ in self._files(reserved=True)
                   if f.startswith(".") or self._in_use(f))  # open, or downloading
        return held + size <= self.limit

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
        shards the reader will open); replaces the previous list. Shards downloaded ahead
        stay pinned until they are opened or leave the list."""
        self._here()
        urls = list(urls)
        keep = set(urls)
        with self._wanted_cv:
            self._wanted = urls
            self._fetched &= keep
            dropped = [self._ahead.pop(u)[1] for u in list(self._ahead) if u not in keep]
            self._wanted_cv.notify()
        for fd in dropped:
            os.close(fd)
        if self._thread is None and urls:
            self._thread = threading.Thread(target=self._prefetch_loop, daemon=True,
                                            name="horovod_iter-shard-prefetch")
            self._thread.start()

    def _prefetch_loop(self) -> None:
        while not self._closed:
            with self._wanted_cv:
                url = next((u for u in self._wanted if u not in self._fetched
                            and u not in self._reading), None)
                if url is None:
                    self._wanted_cv.wait(timeout=1.0)
                    continue
            try:
                size, name = self._lookup(url, fresh=True, ahead=True)
                if self.has_room(url):
                    fd = self._fetch(url, size, name, prefetching=True)
                    with self._lock:
                        self._fetched.add(url)
                        keep = (url in self._wanted and url not in self._reading
                                and url not in self._ahead and not self._closed)
                        if keep:
                            self._ahead[url] = (name, fd)
                    if not keep:
                        os.close(fd)
                    continue
            except _Passed:
                continue
            except _NoRoom:
                pass
            except Exception:  # the reader meets it again, and reports it
                with self._lock:
                    self._fetched.add(url)
                continue
            with self._wanted_cv:  # no room now: wait for the reader to move on
                self._wanted_cv.wait(timeout=0.2)

    def close(self) -> None:
        """Stop the background downloads (a download in progress finishes, within the
        timeout) and unpin the shards downloaded ahead."""
        self._closed = True
        with self._wanted_cv:
            self._wanted = []
            ahead, self._ahead = self._ahead, {}
            self._wanted_cv.notify()
        for _, fd in ahead.values():
            os.close(fd)
        t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join(timeout=60 if self.timeout is None else self.timeout + 5)

    def usage(self) -> int:
        """Bytes of shards in the cache (all processes' files)."""
        return sum(size for _, size, _ in self._files())

    # -- internals ------------------------------------------------------------------------
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

    def _pin(self, path: Path) -> int | None:
        """A shared ``flock`` on the file at ``path`` (its fd), or None if it is not there
        (or was evicted while we locked it)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
        return None

    def _fetch(self, url: str, size: int, name: str, prefetching: bool) -> int:
        """The cached copy ``name`` of ``url``, pinned (its locked fd): found, awaited from
        the consumer of this host downloading it, or downloaded."""
        target = self.dir / name
        clock = _Deadline(self.timeout)
        for _ in range(5):  # evicted between the download and the lock: fetch it again
            fd = self._pin(target)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.utime(target)  # a use: the least recently used go first
                return fd
            lock = self._download_lock(url, name, clock)
            if lock is None:
                continue  # another consumer's download just finished
            try:
                fd = self._pin(target)
                if fd is not None:
                    return fd
                if prefetching:
                    with self._lock:  # the reader may have read it (and moved on) meanwhile
                        if url not in self._wanted or url in self._reading:
                            raise _Passed()
                return self._download(url, size, name, prefetching, clock)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(self.dir / f".{name}.dl")
                os.close(lock)
        raise ShardingError(f"shard {url}: evicted from the cache {self.dir} before it could "
                            "be opened, 5 times; raise cache_limit (the open shards of this "
                            "host's consumers do not fit)")

    def _download_lock(self, url: str, name: str, clock: _Deadline) -> int | None:
        """The right to download ``name`` on this host: an exclusive ``flock`` on its lock
        file (the fd), or None once the copy another consumer was downloading is there.
        The holder touches the lock file as bytes arrive; a wait without that for
        ``timeout`` seconds is a `DataTimeoutError`."""
        path = self.dir / f".{name}.dl"
        beat = None
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                now = os.fstat(fd).st_mtime_ns
                os.close(fd)
                if now != beat:
                    beat = now
                    clock.progress()
                if (self.dir / name).exists():
                    return None
                left = clock.left()
                if left is not None and left <= 0:
                    raise self._timeout_error(url, "wait for the download by another "
                                              "consumer of this host", None) from None
                time.sleep(_POLL_S / 5)
                continue
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder removed it as we opened it: look again

    def _download(self, url: str, size: int, name: str, prefetching: bool,
                  clock: _Deadline) -> int:
        if size > self.limit:
            raise ShardingError(f"shard {url} is {size} bytes, more than the whole cache "
                                f"(cache_limit={self.limit}); raise cache_limit")
        fs, path = self._filesystem(url)
        tmp = self.dir / f".{name}.{os.getpid()}.{next(_downloads)}.tmp"
        self._reserve(tmp, size, keep=name, prefetching=prefetching)
        abandoned = threading.Event()

        def download() -> None:
            try:
                fs.get_file(path, str(tmp))
                got = os.path.getsize(tmp)
                if size and got != size:  # cut short, or replaced meanwhile: again
                    raise OSError(f"{got} bytes arrived of the {size} its info gave")
            finally:
                if abandoned.is_set():  # we gave up on it: leave no file behind
                    with contextlib.suppress(OSError):
                        tmp.unlink()

        try:
            self._retry(url, "download", download, clock, watch=tmp,
                        beat=self.dir / f".{name}.dl", abandoned=abandoned)
            fd = self._pin(tmp)  # pinned before it is visible: no eviction in between
            if fd is None:
                raise ShardingError(f"shard {url}: its download {tmp} vanished; is another "
                                    f"program cleaning {self.dir}?")
            os.replace(tmp, self.dir / name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self.downloaded_bytes += size
        return fd

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

    def _call(self, fn: Callable[[], Any], clock: _Deadline, watch: Path | None = None,
              beat: Path | None = None, abandoned: threading.Event | None = None) -> Any:
        """``fn()``, given up (`_Stalled`) once ``clock`` runs out; it runs on a helper
        thread so that a call stuck in a socket cannot block the reader. Growth of the file
        at ``watch`` is progress: it pushes the deadline back and touches ``beat`` (what
        consumers waiting for this download watch)."""
        if clock.at is None:
            return fn()
        box: list[tuple[bool, Any]] = []
        done = threading.Event()

        def run() -> None:
            try:
                box.append((True, fn()))
            except BaseException as e:  # handed to the caller
                box.append((False, e))
            finally:
                done.set()

        threading.Thread(target=run, daemon=True, name="horovod_iter-shard-io").start()
        seen: tuple[int, int] | None = None
        while not done.wait(min(_POLL_S, max(0.0, clock.left() or 0.0))):
            if watch is not None:
                try:
                    st = os.stat(watch)
                    now: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
                except OSError:
                    now = None
                if now != seen and seen is not None:
                    clock.progress()
                    if beat is not None:
                        with contextlib.suppress(OSError):
                            os.utime(beat)
                seen = now
            left = clock.left()
            if left is not None and left <= 0 and not done.is_set():
                if abandoned is not None:
                    abandoned.set()
                raise _Stalled()
        ok, value = box[0]
        if ok:
            return value
        raise value

    def _timeout_error(self, url: str, what: str, last: Exception | None) -> DataTimeoutError:
        tail = "" if last is None else (f"; the attempt before failed with "
                                        f"{type(last).__name__}: {last}")
        return DataTimeoutError(
            f"shard {url}: the {what} made no progress in {self.timeout:g} s (the timeout)"
            f"{tail}. The object store is stalled or unreachable from this host: check its "
            "endpoint and the network, or raise timeout= if shards are just slow to arrive")

    def _retry(self, url: str, what: str, fn: Callable[[], Any], clock: _Deadline,
               watch: Path | None = None, beat: Path | None = None,
               abandoned: threading.Event | None = None) -> Any:
        delay = self.backoff
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                return self._call(fn, clock, watch, beat, abandoned)
            except _Stalled:
                raise self._timeout_error(url, what, last) from last
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
                last = e
                if attempt == self.retries:
                    raise ShardingError(f"shard {url}: {what} failed {attempt + 1} times, "
                                        f"last with {type(e).__name__}: {e}") from e
                left = clock.left()
                if left is not None and left <= delay:
                    raise self._timeout_error(url, what, e) from e
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover
