"""Several hosts on this one machine: network namespaces with an address, a hostname, a `/tmp`,
an `/etc/hosts` and an sshd each, on a switch of their own; and the faults a cluster has.

A `Cluster` of hosts ``h1``, ``h2`` ... (root only):

* network: a namespace ``<name>-sw`` holds a bridge (the switch); each host's namespace
  ``<name>-<host>`` has ``lo`` and ``eth0`` (a veth whose other end is a switch port), address
  ``<subnet>.<10 + i>/24``, no route anywhere else. Nothing is added to, or changed in, the
  machine's own namespace: traffic stays between the namespaces made here;
* each host has its own UTS namespace (``hostname`` is its name) and mount namespace, both kept
  by bind mounts under ``/run/hi-hosts/<name>`` (no process holds them), in which ``/tmp`` is
  a per-host folder (``/var/tmp/hi-hosts/<name>/<host>/tmp``), ``/etc/hosts`` names every host
  (``debian_hosts=True``: the host's own name first as 127.0.1.1, as Debian and Ubuntu write it)
  and ``/etc/ssh/ssh_config`` uses a key pair made for the cluster, no known-hosts file;
* an sshd per host listening on the host's address only (port 22), root by that key only, so
  that ``horovodrun -H h1:2,h2:2`` started on h1 reaches h2 as on a real cluster.

Faults: `freeze` (SIGSTOP every process of the host), `thaw`, `kill` (power off: the link goes
down, then every process of the host is SIGKILLed, so its peers get no FIN; `revive` restarts
its sshd), `partition` (the host's switch port down), `heal`, `delay` (added on each host's
inbound traffic by a small NFQUEUE process of ours: the kernel here has no netem) and `loss`
(iptables' random drop on inbound packets).

`down` removes everything of a cluster and is idempotent; `up` calls it first, so a run that
died leaves nothing that the next run does not clear. As a script::

    python scripts/hosts.py up --hosts 3          # h1 h2 h3 on 10.77.0.0/24
    python scripts/hosts.py run h2 -- hostname -I
    python scripts/hosts.py delay h1 25 && python scripts/hosts.py delay h2 25   # 50 ms RTT
    python scripts/hosts.py down
"""
from __future__ import annotations

import argparse
import contextlib
import heapq
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

RUN = Path("/run/hi-hosts")          # namespace files (a private mount), keys, configs
STATE = Path("/var/tmp/hi-hosts")    # per-host /tmp folders, logs
SUBNET = "10.77.0"
TOOLS = {"ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux",
         "sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
         "iptables-legacy": "iptables"}
_SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


class HostsError(RuntimeError):
    """The hosts cannot be made here (not root, no network namespaces, a tool missing)."""


def _which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    for d in _SBIN:
        if os.access(os.path.join(d, tool), os.X_OK):
            return os.path.join(d, tool)
    return None


def _sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check,
                          timeout=timeout)


def unavailable(install: bool = False) -> str | None:
    """Why hosts cannot be made here (None: they can). ``install``: apt-get the missing
    packages first (openssh-server, iptables)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, mounts, sshd)"
    missing = sorted({pkg for tool, pkg in TOOLS.items() if _which(tool) is None})
    if missing and install and _which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update", "-q"],
                     ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]):
            subprocess.run(argv, check=False, capture_output=True, env=env, timeout=600)
        missing = sorted({pkg for tool, pkg in TOOLS.items() if _which(tool) is None})
    if missing:
        return f"missing packages {missing} (apt-get install {' '.join(missing)})"
    probe = f"hi-probe-{os.getpid()}"
    try:
        res = _sh("ip", "netns", "add", probe, check=False)
        if res.returncode != 0:
            return f"`ip netns add` fails: {res.stderr.strip()}"
        res = _sh("ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1",
                  check=False)
        if res.returncode != 0:
            return f"no veth pairs in a network namespace: {res.stderr.strip()}"
    finally:
        _sh("ip", "netns", "del", probe, check=False)
    return None


def _mounted(path: Path) -> bool:
    """``path`` is a mount point (a bind mount on the same file system too)."""
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def ns_inode(path: str | Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _pids_in(ns_file: Path, kind: str = "net") -> list[int]:
    """Processes whose ``kind`` namespace is the one bound at ``ns_file``."""
    ino = ns_inode(ns_file)
    if ino is None:
        return []
    me, pids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        if ns_inode(f"/proc/{entry}/ns/{kind}") == ino:
            pids.append(int(entry))
    return pids


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


class Cluster:
    """Hosts ``h1`` .. ``h<n>`` on one switch (see the module docstring).

    Args:
        n: how many hosts.
        name: prefix of every namespace, folder and rule of this cluster (two clusters with
            different names and subnets can live side by side).
        subnet: the first three octets of the hosts' /24.
        debian_hosts: each host's /etc/hosts maps its own name to 127.0.1.1 (Debian's default,
            which no other host can reach) before the real addresses.
    """

    def __init__(self, n: int = 2, name: str = "hi", subnet: str = SUBNET,
                 debian_hosts: bool = False) -> None:
        if not 1 <= n <= 200:
            raise ValueError(f"n must be 1..200 hosts, got {n}")
        self.n, self.name, self.subnet, self.debian_hosts = n, name, subnet, debian_hosts
        self.hosts = [f"h{i}" for i in range(1, n + 1)]
        self.run_dir = RUN / name
        self.state_dir = STATE / name

    # -- names --------------------------------------------------------------------------
    def addr(self, host: str) -> str:
        return f"{self.subnet}.{10 + self.hosts.index(host) + 1}"

    def netns(self, host: str) -> str:
        return f"{self.name}-{host}"

    @property
    def switch(self) -> str:
        return f"{self.name}-sw"

    def _ns(self, host: str, kind: str) -> Path:
        return self.run_dir / f"{host}.{kind}"

    def _net(self, host: str) -> Path:
        return Path("/run/netns") / self.netns(host)

    def tmp(self, host: str) -> Path:
        """The host's /tmp, as seen from the machine."""
        return self.state_dir / host / "tmp"

    # -- running things on a host ---------------------------------------------------------
    def command(self, host: str, argv: Sequence[str], cwd: str | None = None) -> list[str]:
        """``argv`` run on ``host`` (its network, hostname and mounts)."""
        head = ["nsenter", f"--net={self._net(host)}", f"--uts={self._ns(host, 'uts')}",
                f"--mount={self._ns(host, 'mnt')}", "--"]
        return [*head, "env", "-C", cwd or os.getcwd(), *argv]

    def popen(self, host: str, argv: Sequence[str], cwd: str | None = None,
              **kwargs: object) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(host, argv, cwd), text=True, **kwargs)  # type: ignore[call-overload, no-any-return]

    def run(self, host: str, argv: Sequence[str], check: bool = True, timeout: float = 60,
            cwd: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(host, argv, cwd), capture_output=True, text=True,
                              check=check, timeout=timeout)

    def pids(self, host: str) -> list[int]:
        """Every process on ``host`` (in its network or mount namespace)."""
        return sorted(set(_pids_in(self._net(host), "net"))
                      | set(_pids_in(self._ns(host, "mnt"), "mnt")))

    # -- up / down ------------------------------------------------------------------------
    def up(self) -> Cluster:
        """Make the hosts (after clearing whatever an earlier cluster of this name left)."""
        why = unavailable(install=True)
        if why:
            raise HostsError(why)
        self.down()
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _up(self) -> None:
        RUN.mkdir(parents=True, exist_ok=True)
        if not _mounted(RUN):  # namespace files must sit on a private mount
            _sh("mount", "--bind", str(RUN), str(RUN))
            _sh("mount", "--make-private", str(RUN))
        self.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        key = self.run_dir / "id_ed25519"
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.name}-hosts", "-f",
            str(key))
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.run_dir / "host_key"))
        (self.run_dir / "ssh_config").write_text(
            f"Host *\n    IdentityFile {key}\n    IdentitiesOnly yes\n"
            "    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n"
            "    GlobalKnownHostsFile /dev/null\n    LogLevel ERROR\n    BatchMode yes\n"
            "    ConnectTimeout 10\n")
        sw = self.switch
        _sh("ip", "netns", "add", sw)
        _sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", sw, "link", "set", "br0", "up")
        for host in self.hosts:
            self._make_host(host)
        for host in self.hosts:
            self.start_sshd(host)
        self.wait_ssh()

    def _hosts_text(self, host: str) -> str:
        lines = ["127.0.0.1\tlocalhost"]
        if self.debian_hosts:
            lines.append(f"127.0.1.1\t{host}")
        lines += [f"{self.addr(h)}\t{h}" for h in self.hosts]
        return "\n".join(lines) + "\n"

    def set_debian_hosts(self, on: bool) -> None:
        """Rewrite every host's /etc/hosts in place (the bind mount keeps the file)."""
        self.debian_hosts = on
        for host in self.hosts:
            with open(self.run_dir / host / "hosts", "r+") as f:
                f.truncate(0)
                f.write(self._hosts_text(host))

    def _make_host(self, host: str) -> None:
        ns, sw, d = self.netns(host), self.switch, self.run_dir / host
        d.mkdir(parents=True, exist_ok=True)
        self.tmp(host).mkdir(parents=True, exist_ok=True)
        self.tmp(host).chmod(0o1777)
        (d / "hosts").write_text(self._hosts_text(host))
        (d / "sshd_config").write_text(
            f"ListenAddress {self.addr(host)}\nPort 22\nHostKey {self.run_dir / 'host_key'}\n"
            f"AuthorizedKeysFile {self.run_dir / 'id_ed25519.pub'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nUseDNS no\nPrintMotd no\n"
            f"PidFile {d / 'sshd.pid'}\nMaxStartups 200\nMaxSessions 200\nLogLevel ERROR\n"
            "ClientAliveInterval 0\nSubsystem sftp internal-sftp\n")
        _sh("ip", "netns", "add", ns)
        _sh("ip", "-n", sw, "link", "add", host, "type", "veth", "peer", "name", "eth0",
            "netns", ns)
        _sh("ip", "-n", sw, "link", "set", host, "master", "br0", "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", ns, "addr", "add", f"{self.addr(host)}/24", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        for kind in ("uts", "mnt"):
            self._ns(host, kind).touch()
        # a checkout under /tmp (a CI clone) stays visible under the host's own /tmp: bound
        # into the host's folder first, then the folder with it (--rbind) on /tmp
        keep = [p for p in {os.getcwd(), str(Path(sys.executable).parent)}
                if p == "/tmp" or p.startswith("/tmp/")]
        script = "; ".join([
            "set -e", f"hostname {host}",
            "mount -t sysfs sysfs /sys",  # /sys/class/net shows this host's interfaces
            *(f"mkdir -p {self.tmp(host)}{p[4:]} && mount --bind {p} {self.tmp(host)}{p[4:]}"
              for p in sorted(keep) if p != "/tmp"),
            f"mount --rbind {self.tmp(host)} /tmp",
            f"mount --bind {d / 'hosts'} /etc/hosts",
            f"mount --bind {self.run_dir / 'ssh_config'} /etc/ssh/ssh_config",
        ])
        _sh("unshare", f"--mount={self._ns(host, 'mnt')}", f"--uts={self._ns(host, 'uts')}",
            "--propagation", "private", "--", "nsenter", f"--net={self._net(host)}", "--",
            "sh", "-c", script)

    def start_sshd(self, host: str) -> None:
        d = self.run_dir / host
        self.run(host, [_which("sshd") or "/usr/sbin/sshd", "-f", str(d / "sshd_config"),
                        "-E", str(d / "sshd.log")])

    def wait_ssh(self, timeout: float = 30) -> None:
        """Every host reaches every other over ssh (the daemons are up)."""
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            for peer in self.hosts:
                while True:
                    res = self.run(host, ["ssh", peer, "hostname"], check=False, timeout=30)
                    if res.returncode == 0 and res.stdout.strip() == peer:
                        break
                    if time.monotonic() > deadline:
                        raise HostsError(f"ssh from {host} to {peer} fails: "
                                         f"{res.stderr.strip()[-300:]}")
                    time.sleep(0.2)

    def down(self) -> None:
        """Remove every namespace, process, mount and folder of this cluster (idempotent)."""
        hosts = set(self.hosts)
        if self.run_dir.exists():  # hosts of an earlier, larger cluster of this name
            hosts |= {p.name.split(".")[0] for p in self.run_dir.glob("*.mnt")}
        for host in sorted(hosts):
            pids = self.pids(host)
            _signal_all(pids, signal.SIGKILL)
            _signal_all(pids, signal.SIGCONT)
        for host in sorted(hosts):
            for kind in ("mnt", "uts"):
                f = self._ns(host, kind)
                if _mounted(f):
                    _sh("umount", str(f), check=False)
            _sh("ip", "netns", "del", self.netns(host), check=False)
        _sh("ip", "netns", "del", self.switch, check=False)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            STATE.rmdir()
        if RUN.exists() and not any(RUN.iterdir()):
            if _mounted(RUN):
                _sh("umount", str(RUN), check=False)
            with contextlib.suppress(OSError):
                RUN.rmdir()

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- faults ---------------------------------------------------------------------------
    def freeze(self, host: str) -> list[int]:
        """SIGSTOP every process of ``host`` (as a hung machine: its kernel still answers TCP,
        its programs do not). Returns the pids."""
        pids = self.pids(host)
        _signal_all(pids, signal.SIGSTOP)
        return pids

    def thaw(self, host: str) -> None:
        _signal_all(self.pids(host), signal.SIGCONT)

    def partition(self, host: str) -> None:
        """Unplug ``host`` from the switch (its port down): nothing reaches it, nothing from it
        arrives; its processes go on."""
        _sh("ip", "-n", self.switch, "link", "set", host, "down")

    def heal(self, host: str) -> None:
        _sh("ip", "-n", self.switch, "link", "set", host, "up")

    def kill(self, host: str) -> None:
        """Power ``host`` off: unplug it (its peers get no FIN or RST), then SIGKILL all its
        processes. `revive` brings it back."""
        self.partition(host)
        pids = self.pids(host)
        _signal_all(pids, signal.SIGKILL)
        _signal_all(pids, signal.SIGCONT)

    def revive(self, host: str) -> None:
        """After `kill`: the link up and sshd running again."""
        self.heal(host)
        if not any(_cmdline(p).startswith(("sshd", "/usr/sbin/sshd")) for p in self.pids(host)):
            self.start_sshd(host)

    def delay(self, host: str, ms: float) -> None:
        """Hold every packet arriving at ``host`` for ``ms`` (on both hosts of a pair: the
        round trip grows by twice ``ms``). 0 removes it."""
        self._clear_rule(host, "NFQUEUE")
        for pid in self.pids(host):
            if "hosts.py _delay" in _cmdline(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        if ms <= 0:
            return
        log = open(self.state_dir / host / "delay.log", "a")  # the child's
        self.popen(host, [sys.executable, str(Path(__file__).resolve()), "_delay", str(ms),
                          str(self.state_dir / host / "delay.ready")],
                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 20
        while not (self.state_dir / host / "delay.ready").exists():
            if time.monotonic() > deadline:
                raise HostsError(f"the delay process of {host} did not start: see "
                                 f"{self.state_dir / host / 'delay.log'}")
            time.sleep(0.05)
        (self.state_dir / host / "delay.ready").unlink()
        self._iptables(host, "-A", "INPUT", "-i", "eth0", "-j", "NFQUEUE", "--queue-num",
                       str(_QUEUE), "--queue-bypass")

    def loss(self, host: str, fraction: float) -> None:
        """Drop this fraction of the packets arriving at ``host`` at random (0 removes it)."""
        self._clear_rule(host, "statistic")
        if fraction > 0:
            self._iptables(host, "-I", "INPUT", "1", "-i", "eth0", "-m", "statistic", "--mode",
                           "random", "--probability", f"{fraction:.4f}", "-j", "DROP")

    def clear(self, host: str) -> None:
        """No delay, no loss, plugged in, running."""
        self.delay(host, 0)
        self.loss(host, 0)
        self.thaw(host)
        self.heal(host)

    def _iptables(self, host: str, *args: str) -> str:
        res = self.run(host, ["iptables-legacy", "-w", *args], check=False)
        if res.returncode != 0:
            raise HostsError(f"iptables on {host} failed: {res.stderr.strip()}")
        return res.stdout

    def _clear_rule(self, host: str, marker: str) -> None:
        if not self._net(host).exists():
            return
        rules = self._iptables(host, "-S", "INPUT").splitlines()
        for rule in rules:
            if marker in rule and rule.startswith("-A INPUT"):
                self._iptables(host, "-D", *rule.split()[1:])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


# -- the delay: an NFQUEUE listener in the host, releasing each packet after a fixed time ----
_QUEUE = 77
_NETLINK_NETFILTER, _NFNL_SUBSYS_QUEUE = 12, 3
_MSG_PACKET, _MSG_VERDICT, _MSG_CONFIG = 0, 1, 2
_CFG_CMD, _CFG_PARAMS, _CFG_MAXLEN, _CFG_MASK, _CFG_FLAGS = 1, 2, 3, 4, 5
_CMD_BIND, _COPY_META, _F_FAIL_OPEN = 1, 1, 1
_NLM_F_REQUEST, _NF_ACCEPT = 1, 1


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _nfq_msg(msg: int, payload: bytes, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(_QUEUE)) + payload
    return struct.pack("=IHHII", 16 + len(body), (_NFNL_SUBSYS_QUEUE << 8) | msg,
                       _NLM_F_REQUEST, seq, 0) + body


def _packet_ids(data: bytes) -> Iterator[int]:
    """The packet ids of the NFQNL_MSG_PACKET messages in one netlink read."""
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            return
        if kind == (_NFNL_SUBSYS_QUEUE << 8) | _MSG_PACKET:
            a = off + 20
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype & 0x7FFF == 1:  # NFQA_PACKET_HDR: be32 id, be16 proto, u8 hook
                    yield struct.unpack_from("!I", data, a + 4)[0]
                a += (alen + 3) & ~3
        off += (length + 3) & ~3


def delay_forever(ms: float, ready: Path | None = None) -> None:
    """Accept each packet of queue `_QUEUE` ``ms`` after it arrived (in order)."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((0, 0))
    s.send(_nfq_msg(_MSG_CONFIG, _attr(_CFG_CMD, struct.pack("!BxH", _CMD_BIND,
                                                              socket.AF_INET))))
    s.send(_nfq_msg(_MSG_CONFIG, _attr(_CFG_PARAMS, struct.pack("!IB", 0, _COPY_META))
                    + _attr(_CFG_MAXLEN, struct.pack("!I", 65536))
                    + _attr(_CFG_FLAGS, struct.pack("!I", _F_FAIL_OPEN))
                    + _attr(_CFG_MASK, struct.pack("!I", _F_FAIL_OPEN))))
    if ready is not None:
        ready.write_text(str(os.getpid()))
    held: list[tuple[float, int]] = []
    wait = ms / 1000.0
    while True:
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, pid = heapq.heappop(held)
            s.send(_nfq_msg(_MSG_VERDICT, _attr(2, struct.pack("!II", _NF_ACCEPT, pid))))
        s.settimeout(max(0.0005, held[0][0] - now) if held else None)
        try:
            data = s.recv(1 << 16)
        except TimeoutError:
            continue
        except OSError:  # ENOBUFS: the kernel dropped some of ours; they fail open later
            continue
        t = time.monotonic() + wait
        for pid in _packet_ids(data):
            heapq.heappush(held, (t, pid))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="hi")
    p.add_argument("--subnet", default=SUBNET)
    p.add_argument("--hosts", type=int, default=2)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up")
    sub.add_parser("down")
    sub.add_parser("status")
    r = sub.add_parser("run")
    r.add_argument("host")
    r.add_argument("argv", nargs=argparse.REMAINDER)
    for name in ("freeze", "thaw", "partition", "heal", "kill", "revive", "clear"):
        sub.add_parser(name).add_argument("host")
    d = sub.add_parser("delay")
    d.add_argument("host")
    d.add_argument("ms", type=float)
    lo = sub.add_parser("loss")
    lo.add_argument("host")
    lo.add_argument("fraction", type=float)
    dl = sub.add_parser("_delay")  # the NFQUEUE process itself (inside a host)
    dl.add_argument("ms", type=float)
    dl.add_argument("ready", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "_delay":
        delay_forever(a.ms, a.ready)
        return 0
    c = Cluster(a.hosts, a.name, a.subnet)
    if a.cmd == "up":
        c.up()
        for h in c.hosts:
            print(f"{h} {c.addr(h)} netns {c.netns(h)}")
    elif a.cmd == "down":
        c.down()
    elif a.cmd == "status":
        for h in c.hosts:
            print(h, c.addr(h), "pids:", " ".join(map(str, c.pids(h))))
    elif a.cmd == "run":
        argv_ = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
        return subprocess.call(c.command(a.host, argv_))
    elif a.cmd in ("delay", "loss"):
        getattr(c, a.cmd)(a.host, a.ms if a.cmd == "delay" else a.fraction)
    else:
        getattr(c, a.cmd)(a.host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
