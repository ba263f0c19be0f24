"""What the heartbeat costs a step when the hosts are far apart (issue 22 row 9).

Two hosts made by scripts/hosts.py (network namespaces on this machine; root), one rank each,
``delay`` added between them (half on each host's inbound packets: the round trip grows by the
RTT given). Each rank runs a loop with no collective of its own - evaluation over map-style
data with ``uneven="pad"`` (as gradient accumulation or local SGD would: only our messages
cross the network) - whose step is ``--step-ms`` of compute (a sleep). Printed per launcher
and RTT: the trainer's step time (steady state: from the 5th step to the last) against the
compute step, the overhead in per cent, the pass's end (its confirmation message: once per
pass, not per step) and the seconds our end-of-data check waited.

    python scripts/bench_heartbeat.py                       # RTT 0, 50, 200 ms, both launchers
    python scripts/bench_heartbeat.py --rtt 50 --launcher torch --steps 60
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SKIP = 5  # steps before the steady state (the configuration check, the first beats)


def worker(cfg: dict[str, Any]) -> None:
    import horovod_iter as hi

    b = hi.init()
    data = list(range(cfg["steps"] * b.size))  # one sample per rank and step
    kind = cfg.get("data", "map")
    loader = hi.DistributedLoader(data if kind == "map" else _Stream(data, b.rank, b.size),
                                  batch_size=1, uneven="pad", timeout=120)
    stamps = []
    for _ in loader:
        stamps.append(time.perf_counter())
        time.sleep(cfg["step_s"])  # the trainer's compute, no collective
    stamps.append(time.perf_counter())
    steady = stamps[SKIP:-1]  # batch to batch; the pass's end (one message) apart
    out = Path(cfg["out"]) / f"rank{b.rank}.json"
    out.write_text(json.dumps({
        "rank": b.rank, "steps": len(stamps) - 1,
        "step_s": (steady[-1] - steady[0]) / max(1, len(steady) - 1),
        "end_s": stamps[-1] - stamps[-2] - cfg["step_s"],
        "sync_wait_s": loader.stats().get("sync_wait_s", 0.0)}))


class _Stream:
    """An IterableDataset of this rank's share (the iterable flavour of the same loop)."""

    def __new__(cls, data: list[int], rank: int, size: int) -> Any:
        from torch.utils.data import IterableDataset

        class Share(IterableDataset):  # type: ignore[misc, type-arg]
            def __iter__(self) -> Any:
                return iter(data[rank::size])

        return Share()


def run(cluster: Any, launcher: str, rtt_ms: float, steps: int, step_s: float, data: str,
        limit: float) -> dict[str, Any]:
    for h in cluster.hosts:
        cluster.clear(h)
        cluster.delay(h, rtt_ms / 2)
    out = Path(tempfile.mkdtemp(prefix="hi-bench-hb-", dir="/var/tmp"))
    cfg = json.dumps({"steps": steps, "step_s": step_s, "out": str(out), "data": data})
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", cfg]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if launcher == "horovod":
        hr = str(Path(sys.executable).parent / "horovodrun")
        cmds = {"h1": [hr, "-np", "2", "-H", "h1:1,h2:1", "--gloo", "--network-interface",
                       "eth0", "--disable-cache", *me]}
    else:
        cmds = {h: [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                    "--nproc-per-node=1", "--rdzv-backend=c10d", "--rdzv-endpoint=h1:29500",
                    f"--rdzv-id=hb{int(time.time())}", *me[1:]] for h in cluster.hosts}
    logs = {h: open(out / f"{h}.log", "w") for h in cmds}  # closed below
    procs = {h: cluster.popen(h, cmd, cwd=str(ROOT), stdout=logs[h], stderr=subprocess.STDOUT,
                              env=env, start_new_session=True) for h, cmd in cmds.items()}
    try:
        for p in procs.values():
            p.wait(timeout=limit)
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    except (subprocess.TimeoutExpired, OSError, ValueError) as e:
        tail = "".join((out / f"{h}.log").read_text()[-2000:] for h in cmds)
        raise RuntimeError(f"{launcher} at {rtt_ms} ms RTT failed: {e!r}\n{tail}") from e
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for f in logs.values():
            f.close()
        shutil.rmtree(out, ignore_errors=True)
        for h in cluster.hosts:
            cluster.clear(h)
    worst = max(ranks, key=lambda r: r["step_s"])
    return {"launcher": launcher, "rtt_ms": rtt_ms, "data": data, "step_ms": step_s * 1e3,
            "measured_ms": worst["step_s"] * 1e3,
            "overhead_pct": (worst["step_s"] / step_s - 1) * 100,
            "sync_wait_s": max(r["sync_wait_s"] for r in ranks), "steps": worst["steps"],
            "end_ms": max(r["end_s"] for r in ranks) * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--rtt", type=float, action="append", help="added RTT in ms (repeatable)")
    p.add_argument("--launcher", choices=("torch", "horovod"), action="append")
    p.add_argument("--data", choices=("map", "iterable"), action="append")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--step-ms", type=float, default=50.0)
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args(argv)
    if a.worker:
        worker(json.loads(a.worker))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import hosts

    rows = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # tear the hosts down
    with hosts.Cluster(2, name="hi-bench", subnet="10.77.4") as cluster:
        for launcher in a.launcher or ["torch", "horovod"]:
            for data in a.data or ["map"]:
                for rtt in a.rtt or [0.0, 50.0, 200.0]:
                    limit = 120 + a.steps * (a.step_ms + 4 * rtt) / 1e3
                    row = run(cluster, launcher, rtt, a.steps, a.step_ms / 1e3, data, limit)
                    rows.append(row)
                    print(f"{launcher:<8} {data:<8} RTT {rtt:5.0f} ms: step "
                          f"{row['measured_ms']:7.1f} ms for {row['step_ms']:.0f} ms of compute "
                          f"({row['overhead_pct']:+6.1f} %), the pass's end "
                          f"{row['end_ms']:.0f} ms, our waits {row['sync_wait_s']:.2f} s over "
                          f"{row['steps']} steps", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
