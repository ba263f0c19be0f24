"""The torch.distributed backend; imported only when that backend is chosen.

The library's collectives run on a gloo process group of its own, so they never interleave
with the trainer's NCCL/gloo collectives.

**Nothing is collective until our first collective.** Creating the backend reads the rank and
size from torch.distributed (when it is up) or the launcher's environment, and the local rank
from the launcher's environment (`LOCAL_ENV`), so one rank may make it alone - a rank-0 hook
calling ``hi.get_backend()``, ``len()`` of a DataLoader holding our sampler - while the others
are in the trainer's own collectives. Our group is made at the first collective of ours, which
every rank issues at the same point, in a thread; that collective waits up to its own
``timeout`` for the connection and then its ``timeout`` for its result (ops issued meanwhile
are queued in order). It is a ``ProcessGroupGloo`` built on a store, not ``dist.new_group``:
``new_group`` must be called by every rank in the same order as the trainer's groups and waits
for all of them, and it cannot be told where to bind. The store is torchrun's agent store under
torchrun (a key prefix of ours per restart; the default group is left alone, so a loader built
before the trainer's ``init_process_group`` leaves that call to the trainer), else the default
group's store; when nobody initialised torch.distributed (``MASTER_ADDR``/``RANK`` set by hand)
we initialise it then, at our first collective.

**Where our group binds**: the interfaces in ``GLOO_SOCKET_IFNAME`` (gloo's own variable), else
``HOROVOD_ITER_NIC``, else this host's name when it resolves to an address of this host (gloo's
rule), else the address this host reaches ``MASTER_ADDR`` from (a Debian/Ubuntu ``/etc/hosts``
maps the hostname to 127.0.1.1, which the other hosts cannot reach), else the default route's.
A name that is no interface here is a `BackendError` naming the variable, at ``hi.init()``.

**Local rank**: from the launcher (``LOCAL_RANK``/``LOCAL_WORLD_SIZE``, Horovod's, Open MPI's,
MPICH's), else by comparing hosts when our group is made: hostname, the address our group binds
(two hosts of one job cannot share it, even where containers share a hostname) and the boot id.
"""
from __future__ import annotations

import ctypes
import datetime
import fcntl
import ipaddress
import itertools
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .backend import DEFAULT_TIMEOUT, AsyncHandle, Backend, ChainHandle, poll_until
from .errors import BackendError, DataTimeoutError, HorovodIterError

__all__ = ["IFNAME_ENV", "LOCAL_ENV", "NIC_ENV", "TorchBackend", "bind_address",
           "host_identity", "local_facts", "local_from_env"]

_GROUP_TIMEOUT_S = float(os.environ.get("HOROVOD_ITER_GROUP_TIMEOUT", "1800"))
_PREFIX = "horovod_iter"
#: gloo's own variable: the interfaces (comma-separated) our group binds to
IFNAME_ENV = "GLOO_SOCKET_IFNAME"
#: the library's variable for the same (also Horovod's ``--network-interface``)
NIC_ENV = "HOROVOD_ITER_NIC"
#: (local rank, local size) variables set by launchers: torchrun, horovodrun, Open MPI,
#: MPICH/Intel MPI. Only a complete pair is trusted.
LOCAL_ENV = (("LOCAL_RANK", "LOCAL_WORLD_SIZE"), ("HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
             ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
             ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"))
_PROBE = "203.0.113.1"  # TEST-NET-3: only routed, never sent to (finds the default route)
_setups = itertools.count()  # every rank makes its groups in the same order


def local_from_env() -> tuple[int, int] | None:
    """(local rank, local size) from the launcher's environment, or None."""
    for rank_var, size_var in LOCAL_ENV:
        r, n = os.environ.get(rank_var, "").strip(), os.environ.get(size_var, "").strip()
        if r and n:
            try:
                local = int(r), int(n)
            except ValueError:
                local = (-1, 0)
            if not 0 <= local[0] < local[1]:
                raise BackendError(
                    f"{rank_var}={r!r} and {size_var}={n!r} are not a local rank and size "
                    f"(0 <= rank < size); fix the launcher's environment or unset both")
            return local
    return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def host_identity(address: str) -> str:
    """What tells this host from the others: its name, the address our group binds (two hosts
    of one job cannot share it, even where containers share a hostname), the kernel's boot id."""
    return f"{socket.gethostname()}|{address}|{_boot_id()}"


def local_facts(hosts: list[str], rank: int) -> tuple[int, int]:
    """(local rank, local size) of ``rank`` from every rank's `host_identity`."""
    me = hosts[rank]
    return hosts[:rank].count(me), hosts.count(me)


def _ipv4(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET)
    except OSError:
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def _bindable(address: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
    except OSError:
        return False
    return True


def _route_source(target: str) -> str | None:
    """The address this host sends from to reach ``target`` (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            source = str(s.getsockname()[0])
    except OSError:
        return None
    return None if _loopback(source) else source


def bind_address(master: str | None) -> str | None:
    """Where our group binds when no interface is named (None: gloo's own default): the
    hostname's address if it is one of this host's (as gloo does), loopback when the master is
    ``localhost``/127.x (one host), else the address this host reaches the master from, else
    the default route's."""
    for a in _ipv4(socket.gethostname()):
        if not _loopback(a) and _bindable(a):
            return a
    if master:
        if master == "localhost" or (_is_ip(master) and _loopback(master)):
            return "127.0.0.1"  # every rank reaches the master on its own host: one host
        for a in _ipv4(master):  # a name of this host may resolve to 127.0.1.1: go on
            source = None if _loopback(a) else _route_source(a)
            if source is not None:
                return source
    return _route_source(_PROBE)


def _interface_address(name: str) -> str:
    """The IPv4 address of interface ``name`` (OSError if none)."""
    socket.if_nametoindex(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = fcntl.ioctl(s.fileno(), 0x8915,  # SIOCGIFADDR
                             struct.pack("256s", name.encode()[:15]))
    return socket.inet_ntoa(packed[20:24])


def _devices(master: str | None) -> tuple[list[Any], str]:
    """The gloo devices of our group and the address they bind (see the module doc)."""
    gloo = dist.ProcessGroupGloo
    for var in (IFNAME_ENV, NIC_ENV):
        value = os.environ.get(var, "").strip()
        if not value:
            continue
        devices, addresses = [], []
        for name in (n.strip() for n in value.split(",") if n.strip()):
            try:
                addresses.append(_interface_address(name))
                devices.append(gloo.create_device(interface=name))
            except (OSError, RuntimeError) as e:
                here = ", ".join(n for _, n in socket.if_nameindex())
                raise BackendError(
                    f"{var}={value!r}: {name!r} is no network interface with an IPv4 address on "
                    f"host {socket.gethostname()} (its interfaces: {here}). Set {var} to the "
                    "interface the hosts reach each other on (e.g. eth0), or unset it.") from e
        return devices, ",".join(addresses)
    address = bind_address(master)
    if address is None:
        return [gloo.create_default_device()], socket.gethostname()
    return [gloo.create_device(hostname=address)], address


def _store_host() -> str | None:
    """The host of the default group's TCP store (the rendezvous host), if there is one."""
    try:
        store: Any = dist.distributed_c10d._get_default_store()
        while isinstance(store, dist.PrefixStore):
            store = store.underlying_store
        return str(store.host) if isinstance(store, dist.TCPStore) else None
    except Exception:  # private API, or no default group
        return None


class _Setup:
    """Our gloo group, made once in a thread: started by the first collective of ours (every
    rank issues it at the same point) or by ``local_rank`` without a launcher's environment;
    whoever needs it waits with its own bound."""

    def __init__(self, build: Callable[[], tuple[Any, tuple[int, int]]]) -> None:
        self.group: Any = None
        self.local: tuple[int, int] | None = None
        self.error: Exception | None = None
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(build,), name="horovod_iter-group",
                         daemon=True).start()

    def _run(self, build: Callable[[], tuple[Any, tuple[int, int]]]) -> None:
        try:
            self.group, self.local = build()
        except Exception as e:
            self.error = e
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()


class _TorchHandle(AsyncHandle):
    """A gloo work, issued once our group is made; ``then`` maps the result to the value."""

    def __init__(self, backend: TorchBackend, result: Any,
                 then: Callable[[Any], Any] | None = None) -> None:
        super().__init__(backend)
        self._torch = backend
        self._work: Any = None
        self._result = result
        self._then = then

    def _ready(self) -> bool:
        if self._work is None:
            self._torch._flush()
            if self._work is None:
                return False
        return bool(self._work.is_completed())

    def _collect(self) -> Any:
        self._work.wait()
        return self._then(self._result) if self._then is not None else self._result


class TorchBackend(Backend):
    """``torch.distributed`` with a gloo group of the library's own (see the module doc)."""

    name = "torch"

    def __init__(self) -> None:
        super().__init__()
        if not dist.is_available():  # pragma: no cover - depends on the torch build
            raise BackendError("backend 'torch' needs a torch build with torch.distributed")
        self._we_initialised = False
        self._agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        if dist.is_initialized():
            self._rank, self._size = dist.get_rank(), dist.get_world_size()
        else:
            missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                       if v not in os.environ]
            if missing:
                raise BackendError(
                    "backend 'torch' needs torch.distributed initialised or torchrun's "
                    f"environment; {', '.join(missing)} not set. Launch with "
                    "`torchrun --nproc_per_node N train.py`, or call "
                    "torch.distributed.init_process_group() before horovod_iter.init()."
                )
            self._rank, self._size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self._local = local_from_env()
        self._devices, self._address = _devices(os.environ.get("MASTER_ADDR") or _store_host())
        self._lock = threading.Lock()
        self._queue: list[tuple[_TorchHandle, Callable[[Any], Any]]] = []
        self._setup: _Setup | None = None

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    def _local_facts(self) -> tuple[int, int]:
        if self._local is None:
            setup = self._ensure_setup()
            if not poll_until(setup.done, DEFAULT_TIMEOUT):
                err = DataTimeoutError(
                    f"rank {self._rank} of {self._size} (torch backend): local_rank waited "
                    f"more than {DEFAULT_TIMEOUT} s for the other ranks to compare hosts (no "
                    "launcher set LOCAL_RANK and LOCAL_WORLD_SIZE). Ask local_rank on every "
                    "rank, or set LOCAL_RANK and LOCAL_WORLD_SIZE.")
                self.fail(str(err))
                raise err
            if setup.error is not None:
                failure = self.failed_with("local_rank", setup.error)
                raise failure from (None if failure is setup.error else setup.error)
            self._local = setup.local
        assert self._local is not None
        return self._local

    @property
    def local_rank(self) -> int:
        return self._local_facts()[0]

    @property
    def local_size(self) -> int:
        return self._local_facts()[1]

    # -- our group ---------------------------------------------------------------------------
    def _ensure_setup(self) -> _Setup:
        with self._lock:
            if self._setup is None:
                seq = next(_setups)
                self._setup = _Setup(lambda: self._build(seq))
            return self._setup

    def _store(self) -> Any:
        """The store our group meets on (see the module doc)."""
        timeout = datetime.timedelta(seconds=_GROUP_TIMEOUT_S)
        if self._agent_store:
            return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                 is_master=False, timeout=timeout)
        if not dist.is_initialized():
            use_nccl = torch.cuda.is_available() and dist.is_nccl_available()
            dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_nccl else "gloo",
                                    rank=self._rank, world_size=self._size)
            self._we_initialised = True
        elif (dist.get_rank(), dist.get_world_size()) != (self._rank, self._size):
            raise BackendError(
                f"torch.distributed says rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but this backend was made as rank {self._rank} of {self._size} (from RANK "
                "and WORLD_SIZE): call init_process_group with the launcher's rank and size")
        return dist.distributed_c10d._get_default_store()

    def _build(self, seq: int) -> tuple[Any, tuple[int, int]]:
        """Make our group (in the setup thread) and compare hosts if no launcher said."""
        try:
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            ours = dist.PrefixStore(f"{_PREFIX}/{restart}/{seq}/", self._store())
            ours.set(f"host/{self._rank}", host_identity(self._address))
            opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            opts._devices = self._devices
            opts._threads = 2 * len(self._devices)
            opts._timeout = datetime.timedelta(seconds=_GROUP_TIMEOUT_S)
            group = dist.ProcessGroupGloo(dist.PrefixStore("group/", ours), self._rank,
                                          self._size, opts)
            local = self._local or local_facts(
                [ours.get(f"host/{r}").decode() for r in range(self._size)], self._rank)
        except HorovodIterError:
            raise
        except Exception as e:
            raise BackendError(
                f"rank {self._rank} of {self._size} (torch backend): horovod_iter's gloo group "
                f"(bound to {self._address}) could not connect: {type(e).__name__}: {e}. If a "
                f"rank died, see its log; if the hosts reach each other on another interface, "
                f"name it with {IFNAME_ENV} or {NIC_ENV} (e.g. eth0).") from e
        return group, local

    def await_connection(self, timeout: float | None, what: str) -> None:
        """Our group is made at our first collective: that collective waits up to its
        ``timeout`` for the group to connect, then its ``timeout`` again for its result.
        A full-mesh connect through a store one host holds takes several round trips (about
        5 s for 4 ranks on 2 hosts at 200 ms RTT on a loaded host), which charged to the
        first message alone timed it out on hosts that were merely far apart."""
        setup = self._setup
        if setup is None or setup.done():
            return
        if not poll_until(setup.done, timeout):
            err = DataTimeoutError(
                f"rank {self._rank} of {self._size} (torch backend): horovod_iter's gloo group "
                f"did not connect within {timeout} s (for {what}, the first collective of this "
                "process): another rank is stalled, has died, or has not reached its first "
                "loader pass; on hosts far apart or many ranks, connecting takes longer: raise "
                "`timeout`. If the hosts reach each other on another interface, name it with "
                f"{IFNAME_ENV} or {NIC_ENV}.")
            self.fail(str(err))
            raise err

    def _flush(self) -> None:
        """Issue the queued ops, in their order, once our group is made (raises its error)."""
        setup = self._ensure_setup()
        if not setup.done():
            return
        if setup.error is not None:
            raise setup.error
        with self._lock:
            while self._queue:
                handle, start = self._queue.pop(0)
                try:
                    handle._work = start(setup.group)
                except Exception as e:
                    handle._error = e
                    raise

    def _issue(self, start: Callable[[Any], Any], result: Any,
               then: Callable[[Any], Any] | None = None) -> _TorchHandle:
        handle = _TorchHandle(self, result, then)
        with self._lock:
            self._queue.append((handle, start))
        self._flush()
        return handle

    # -- the raw collectives -----------------------------------------------------------------
    def _allreduce(self, tensor: torch.Tensor, op: str) -> AsyncHandle:
        opts = dist.AllreduceOptions()
        ops: dict[str, Any] = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                               "max": dist.ReduceOp.MAX}
        opts.reduceOp = ops[op]
        out = tensor.clone()
        return self._issue(lambda group: group.allreduce([out], opts), out)

    def _broadcast(self, t: torch.Tensor, root: int,
                   then: Callable[[Any], Any] | None = None) -> _TorchHandle:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        return self._issue(lambda group: group.broadcast([t], opts), t, then)

    def _allgather(self, t: torch.Tensor,
                   then: Callable[[Any], Any] | None = None) -> _TorchHandle:
        out = [torch.empty_like(t) for _ in range(self._size)]
        return self._issue(lambda group: group.allgather([out], [t]), out, then)

    def _broadcast_bytes(self, payload: bytes, root: int) -> AsyncHandle:
        def data(size: torch.Tensor) -> _TorchHandle:
            buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self._rank == root
                   else torch.empty(int(size[0]), dtype=torch.uint8))
            return self._broadcast(buf, root, lambda t: t.numpy().tobytes())

        return ChainHandle(self, self._broadcast(
            torch.tensor([len(payload)], dtype=torch.int64), root), data)

    def _allgather_bytes(self, payload: bytes) -> AsyncHandle:
        def data(sizes: list[torch.Tensor]) -> _TorchHandle:
            n = [int(s[0]) for s in sizes]
            buf = torch.zeros(max(n), dtype=torch.uint8)
            if payload:
                buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            return self._allgather(
                buf, lambda parts: [t[:k].numpy().tobytes() for t, k in zip(parts, n)])

        return ChainHandle(self, self._allgather(
            torch.tensor([len(payload)], dtype=torch.int64)), data)

    # -- exit --------------------------------------------------------------------------------
    def close(self) -> None:
        super().close()
        setup, self._setup = self._setup, None
        if setup is not None and setup.done():
            setup.group = None  # idle after a clean run: its threads join at once
        if self._we_initialised and dist.is_initialized():
            dist.destroy_process_group()
            self._we_initialised = False

    def abandon_at_exit(self) -> None:
        """Keep our gloo group alive for good: its destructor would join worker threads that
        wait on a dead rank for the group timeout (gloo's ``abort()`` does not interrupt
        them). The process ends with the threads blocked, which is harmless. A group still
        being made is left to its daemon thread."""
        super().abandon_at_exit()
        setup, self._setup = self._setup, None
        if setup is not None and setup.group is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(setup.group))
