"""Jobs across hosts: 2 hosts x 2 ranks under horovodrun (over ssh) and torchrun (c10d
rendezvous), the hosts made as network namespaces on this machine by scripts/hosts.py (each
with its own address, hostname, /tmp and sshd; nothing leaves the namespaces made there).

Every sample is trained exactly once across the hosts; a frozen host and a partitioned host
end the job: the ranks on the other host raise our error and their launcher exits non-zero.
Runs as root where `ip netns` works (else skipped, with the reason); the whole matrix and its
tight bounds are `python scripts/faults.py --hosts 2`. No wall-clock threshold: a job only has
to end within a generous cap.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from harness import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import faults
import hosts

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

TIMEOUT = 5.0
#: a job ends (detection, launcher exit) within TIMEOUT + this on any load
GENEROUS_S = 150.0
H = faults.HostCase
CASES = [
    H("none", "horovod", data="custom"),
    H("none", "torch", data="sharded"),
    H("host_stop", "horovod", data="custom"),
    H("host_stop", "torch", data="iterable"),
    H("host_partition", "horovod", data="iterable"),
    H("host_partition", "torch", data="custom"),
]


@pytest.fixture(scope="module")
def cluster():
    why = hosts.unavailable(install=True)
    if why:
        pytest.skip(f"multi-host tests need network namespaces: {why}")
    c = hosts.Cluster(2, name="hi-test", subnet="10.77.1")
    try:
        c.up()
    except hosts.HostsError as e:
        c.down()
        pytest.skip(f"multi-host tests: the hosts cannot be made here: {e}")
    yield c
    c.down()


@pytest.mark.parametrize("case", CASES, ids=[c.label() for c in CASES])
def test_job_across_hosts(cluster, case):
    res = faults.run_host_case(case, cluster, timeout=TIMEOUT, cap=TIMEOUT + GENEROUS_S)
    # late_detect / late_exit: past faults.py's tight bounds, which a loaded machine can miss;
    # the job still ended with our error on the other host
    assert res.outcome in ("ok", "late_detect", "late_exit"), f"{res.outcome}: {res.detail}"
    if case.fault == "none":
        assert set(res.launchers.values()) == {0}, res.launchers
    else:
        assert res.returncode != 0 and res.detect_s is not None and res.exit_s is not None
        survivors = [e for r, e in res.errors.items() if e[0] is not None]
        assert all(err in faults.OURS for err, _ in survivors), res.errors


def test_hosts_are_distinct_and_teardown_leaves_nothing():
    why = hosts.unavailable(install=False)
    if why:
        pytest.skip(f"needs network namespaces: {why}")
    c = hosts.Cluster(2, name="hi-test-td", subnet="10.77.2")
    try:
        c.up()
        seen = {h: c.run(h, ["sh", "-c", "hostname; hostname -I; ls /tmp"]).stdout.split()
                for h in c.hosts}
        assert seen["h1"][:2] == ["h1", "10.77.2.11"] and seen["h2"][:2] == ["h2", "10.77.2.12"]
        (c.tmp("h1") / "only-on-h1").write_text("1")
        assert "only-on-h1" in c.run("h1", ["ls", "/tmp"]).stdout
        assert "only-on-h1" not in c.run("h2", ["ls", "/tmp"]).stdout
        assert c.run("h1", ["ssh", "h2", "hostname"]).stdout.strip() == "h2"
        c.partition("h2")
        assert c.run("h1", ["ssh", "-o", "ConnectTimeout=2", "h2", "true"],
                     check=False).returncode != 0
    finally:
        c.down()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "hi-test-td" not in netns
    with open("/proc/self/mountinfo") as f:
        assert "hi-test-td" not in f.read()
    assert not c.run_dir.exists() and not c.state_dir.exists()
    c.down()  # idempotent
