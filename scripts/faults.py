"""Fault injection: one rank of a real 2- or 3-rank launch is killed, frozen, put to sleep, made
to raise (in the trainer's code or in its dataset), interrupted, loses a DataLoader worker, or
leaves the loop early; every other rank must raise one of our errors within the loader's
``timeout`` (plus a small constant) and exit, so that the launcher ends the job, non-zero,
within ``timeout + 30 s``. Control runs (no fault) must train on every sample exactly once.

    python scripts/faults.py --runs 120 --seed 1          # a random sample of the matrix
    python scripts/faults.py --all --timeout 5            # every cell once
    python scripts/faults.py --fault stop --launcher torch --runs 4

The matrix is data: `FAULTS` x `LAUNCHERS` x `DATA` x `UNEVEN` x `WORKERS` x `WORLDS`; each
run is a `Case`, launched with a hard wall-clock cap that kills the whole process tree. The
printout is one row per fault with, per launcher, the runs that ended as the contract says,
and the worst detection and launcher-exit times; then every run that did not, and why.
tests/test_faults.py runs a fixed sample of these cases in CI.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "fault_worker.py"

FAULTS = ("none", "kill", "stop", "sleep", "raise", "sigint", "dataset_raise",
          "dataset_stall", "worker_kill", "leave", "skip_epoch")
LAUNCHERS = ("horovod", "torch")
DATA = ("list", "tensor", "custom", "iterable", "sharded")
UNEVEN = ("stop", "pad")
WORKERS = (0, 2)
WORLDS = (2, 3)
#: our errors: what every surviving rank must raise
OURS = ("DataTimeoutError", "RankFailureError", "HorovodRankFailureError",
        "ConfigMismatchError", "SampleError")
#: detection within timeout + this (two heartbeat periods, plus scheduling slack on a
#: loaded 2-core machine); the documented bound is in docs/troubleshooting.md
DETECT_SLACK_S = 3.0
#: the launcher ends the job within timeout + this after the fault: our ranks detect and
#: exit within DETECT_SLACK_S, then a launcher may wait its own kill grace for a frozen
#: process (torchrun: 30 s from SIGTERM to SIGKILL; horovodrun: 5 s)
EXIT_SLACK_S = 30.0 + DETECT_SLACK_S
_TAG = "HOROVOD_ITER_FAULT_TAG"


@dataclass(frozen=True)
class Case:
    fault: str
    launcher: str
    data: str = "custom"
    uneven: str = "stop"
    workers: int = 0
    world: int = 2
    frank: int = 1
    fstep: int = 7

    def valid(self) -> bool:
        return not (self.fault == "worker_kill" and self.workers == 0)

    def label(self) -> str:
        return (f"{self.fault}/{self.launcher}/{self.data}/{self.uneven}/w{self.workers}/"
                f"np{self.world}/r{self.frank}@{self.fstep}")


@dataclass
class Result:
    case: Case
    outcome: str                 # "ok" or what broke the contract
    detail: str = ""
    detect_s: float | None = None  # worst survivor: its error's time - the fault's time
    exit_s: float | None = None    # the launcher's end - the fault's time
    returncode: int | None = None
    errors: dict[int, Any] = dataclasses.field(default_factory=dict)


def _venv_bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def command(case: Case, cfg: dict[str, Any]) -> list[str]:
    argv = [sys.executable, str(WORKER), json.dumps(cfg)]
    if case.launcher == "horovod":
        return [_venv_bin("horovodrun"), "-np", str(case.world), "-H",
                f"localhost:{case.world}", "--gloo", *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={case.world}", *argv[1:]]


def write_shards(folder: Path, n: int) -> None:
    """Uneven JSONL shards holding ids 0..n-1 (a few more shards than consumers)."""
    folder.mkdir()
    sizes = [n // 10 + (i * 7) % 13 for i in range(9)]
    sizes[-1] = n - sum(sizes[:-1])
    start = 0
    for i, size in enumerate(sizes):
        with open(folder / f"s{i:02d}.jsonl", "w") as f:
            for k in range(start, start + size):
                f.write(json.dumps({"id": k}) + "\n")
        start += size


def _tagged_pids(tag: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"{_TAG}={tag}".encode() in env:
            pids.append(int(entry.name))
    return pids


def _kill_all(tag: str, pgid: int) -> None:
    for pid in _tagged_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def expected_ids(case: Case, n: int) -> list[int] | None:
    """Every id of an epoch, for the exactly-once check of a control run (None: the
    stopping rule legitimately drops or repeats some)."""
    if case.uneven != "pad":
        return None
    if case.data == "iterable":
        lengths = [n // case.world + 3 * r for r in range(case.world)]
        return list(range(sum(lengths)))
    return list(range(n))


def run_case(case: Case, timeout: float = 5.0, n: int = 240, epochs: int = 3,
             cap: float | None = None, keep: bool = False) -> Result:
    """Launch ``case``; classify how it ended against the contract."""
    cap = cap if cap is not None else timeout + EXIT_SLACK_S + 45
    tag = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="hi-fault-") as tmp:
        out = Path(tmp)
        if case.data == "sharded":
            write_shards(out / "shards", n)
        cfg = dict(fault=case.fault, frank=case.frank, fstep=case.fstep, data=case.data,
                   uneven=case.uneven, workers=case.workers, timeout=timeout, n=n,
                   epochs=epochs, out=str(out), isolate=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", _TAG: tag,
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen(command(case, cfg), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd=str(ROOT),
                                start_new_session=True)
        hung = False
        try:
            output, _ = proc.communicate(timeout=cap)
        except subprocess.TimeoutExpired:
            hung = True
            _kill_all(tag, proc.pid)
            output, _ = proc.communicate()
        t_end = time.time()
        time.sleep(0.5)  # a moment for the process tree to go
        left = _tagged_pids(tag)
        if left:
            _kill_all(tag, proc.pid)
        reports = {}
        for r in range(case.world):
            f = out / f"rank{r}.json"
            if f.exists():
                reports[r] = json.loads(f.read_text())
        fault_file = out / "fault.json"
        t_fault = json.loads(fault_file.read_text())["t"] if fault_file.exists() else None
        if keep:
            (ROOT / "faults-last-output.txt").write_text(output)
    res = Result(case, "ok", returncode=proc.returncode,
                 errors={r: (v.get("error"), v.get("message", "")[:300])
                         for r, v in reports.items()})
    res.exit_s = None if t_fault is None else t_end - t_fault
    if hung:
        return _verdict(res, "hang", f"still running after the {cap:.0f} s cap", output)
    if left:
        return _verdict(res, "orphan", f"{len(left)} process(es) left after the launcher",
                        output)
    if case.fault == "none":
        return _control(res, reports, n, output)
    if t_fault is None:  # e.g. the dataset was read to its end before the fault was armed
        return _verdict(res, "not_fired", "the fault never fired (inconclusive)", output)
    if proc.returncode == 0 and len(reports) == case.world and all(
            rep.get("error") is None and not rep.get("left") for rep in reports.values()):
        # the job ran to its end through the fault (a worker killed after it had delivered
        # all its data): fine if, and only if, the data is still exactly once
        checked = _control(res, reports, n, output)
        if checked.outcome == "ok":
            return _verdict(res, "no_effect", "the fault did not affect the run (every "
                            "sample exactly once)", output)
        return checked
    survivors = [r for r in range(case.world) if r != case.frank]
    worst = 0.0
    for r in survivors:
        rep = reports.get(r)
        if rep is None:
            return _verdict(res, "missing", f"rank {r} reported nothing (killed before it "
                            "raised?)", output)
        if rep.get("error") is None:
            return _verdict(res, "silent", f"rank {r} ended without an error", output)
        if rep["error"] not in OURS:
            return _verdict(res, "foreign", f"rank {r} raised {rep['error']}: "
                            f"{rep.get('message', '')[:200]}", output)
        worst = max(worst, rep["t_error"] - t_fault)
    own = reports.get(case.frank)
    if own is not None and own.get("error") not in (None, "RuntimeError", "KeyboardInterrupt",
                                                    *OURS):
        return _verdict(res, "foreign", f"faulty rank {case.frank} raised {own['error']}",
                        output)
    res.detect_s = worst
    if proc.returncode == 0:
        return _verdict(res, "zero_exit", "the launcher exited 0 after a fault", output)
    if worst > timeout + DETECT_SLACK_S:
        return _verdict(res, "late_detect", f"detected after {worst:.1f} s", output)
    assert res.exit_s is not None
    if res.exit_s > timeout + EXIT_SLACK_S:
        return _verdict(res, "late_exit", f"launcher ended {res.exit_s:.1f} s after the fault",
                        output)
    return res


def _control(res: Result, reports: dict[int, Any], n: int, output: str) -> Result:
    case = res.case
    if res.returncode != 0 or len(reports) != case.world:
        return _verdict(res, "control_failed", f"exit {res.returncode}", output)
    for r, rep in reports.items():
        if rep.get("error") is not None:
            return _verdict(res, "control_failed", f"rank {r}: {rep['error']}", output)
    for noise in ("Exception ignored", "Traceback", "destroy_process_group"):
        if noise in output:  # the clean exit path must be clean
            return _verdict(res, "noisy_exit", f"{noise!r} in the output of a clean run", output)
    expected = expected_ids(case, n)
    epochs = sorted({e for rep in reports.values() for e in rep["seen"]})
    for e in epochs:
        ids = sorted(i for rep in reports.values() for i in rep["seen"].get(e, []))
        if expected is not None and ids != expected:
            return _verdict(res, "lost_or_repeated", f"epoch {e}: {len(ids)} ids, "
                            f"{len(set(ids))} distinct, {len(expected)} expected", output)
        if expected is None and case.data in ("iterable", "sharded") and \
                len(ids) != len(set(ids)):
            return _verdict(res, "lost_or_repeated", f"epoch {e}: repeated ids", output)
    return res


def _verdict(res: Result, outcome: str, detail: str, output: str) -> Result:
    res.outcome, res.detail = outcome, detail + "\n" + output[-3000:]
    return res


def matrix() -> list[Case]:
    """Every valid cell (the faulty rank and step are drawn per run)."""
    cells = [Case(f, la, d, u, w, np_) for f, la, d, u, w, np_ in itertools.product(
        FAULTS, LAUNCHERS, DATA, UNEVEN, WORKERS, WORLDS)]
    return [c for c in cells if c.valid()]


def draw(cell: Case, rng: random.Random) -> Case:
    return dataclasses.replace(cell, frank=rng.randrange(cell.world), fstep=rng.randrange(2, 30))


def summarise(results: list[Result]) -> str:
    lines = []
    by_fault: dict[str, dict[str, list[Result]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    for r in results:
        by_fault[r.case.fault][r.case.launcher].append(r)
    head = f"{'fault':<14}" + "".join(f"| {la:<34}" for la in LAUNCHERS)
    lines += [head, "-" * len(head)]
    for fault in FAULTS:
        if fault not in by_fault:
            continue
        row = f"{fault:<14}"
        for la in LAUNCHERS:
            rs = by_fault[fault][la]
            rs = [r for r in rs if r.outcome not in ("not_fired", "no_effect")]
            ok = sum(r.outcome == "ok" for r in rs)
            det = max((r.detect_s for r in rs if r.detect_s is not None), default=None)
            ex = max((r.exit_s for r in rs if r.exit_s is not None and r.outcome != "hang"),
                     default=None)
            cell = f"{ok}/{len(rs)} ok" if rs else "-"
            if det is not None:
                cell += f", detect<={det:.1f}s"
            if ex is not None:
                cell += f", exit<={ex:.1f}s"
            row += f"| {cell:<34}"
        lines.append(row)
    counts = collections.Counter(r.outcome for r in results)
    lines.append("")
    lines.append(f"{len(results)} runs: " + ", ".join(f"{k} {v}" for k, v in
                                                      counts.most_common()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100, help="random runs of the matrix")
    p.add_argument("--all", action="store_true", help="every cell once (overrides --runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=5.0, help="the loader's timeout")
    p.add_argument("--fault", choices=FAULTS, action="append")
    p.add_argument("--launcher", choices=LAUNCHERS, action="append")
    p.add_argument("--data", choices=DATA, action="append")
    p.add_argument("--json", help="also write every run's result to this file")
    p.add_argument("--verbose", action="store_true", help="print each failure's output")
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    cells = [c for c in matrix()
             if (not a.fault or c.fault in a.fault) and (not a.launcher or c.launcher in
                                                         a.launcher)
             and (not a.data or c.data in a.data)]
    chosen = cells if a.all else [rng.choice(cells) for _ in range(a.runs)]
    results = []
    t0 = time.time()
    for i, cell in enumerate(chosen):
        case = draw(cell, rng)
        r = run_case(case, timeout=a.timeout)
        results.append(r)
        extra = f" {r.detail.splitlines()[0]}" if r.outcome != "ok" else ""
        print(f"[{i + 1}/{len(chosen)} {time.time() - t0:6.0f}s] {case.label():<48} "
              f"{r.outcome}{extra}", flush=True)
        if a.verbose and r.outcome != "ok":
            print(r.detail, flush=True)
    print()
    print(summarise(results))
    bad = [r for r in results if r.outcome not in ("ok", "not_fired", "no_effect")]
    for r in bad:
        print(f"- {r.case.label()}: {r.outcome}: {r.detail.splitlines()[0]}")
    if a.json:
        Path(a.json).write_text(json.dumps([dict(case=dataclasses.asdict(r.case),
                                                 outcome=r.outcome, detect_s=r.detect_s,
                                                 exit_s=r.exit_s, returncode=r.returncode,
                                                 detail=(r.detail.splitlines() or [""])[0])
                                            for r in results], indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
