"""The hot path, side by side with torch's DataLoader + DistributedSampler, in one run.

Cases (best of --repeats, CPU, printed as ours / DataLoader ratios):

* per-step cost: a trivial dataset (``__getitem__`` returns ``i``), batch 1, workers 0;
* TensorDataset gather: uint8 3x224x224, batch 256, workers 0 and 2 (GB/s);
* a per-sample Python dataset (~50 us of work per sample), batch 64, workers 0 and 2
  (samples/s);
* with ``--ranks N``: the per-step cost again on N ranks under horovodrun and torchrun.

    python scripts/bench_loader.py                    # one process
    python scripts/bench_loader.py --ranks 2          # + 2 ranks under both launchers
    python scripts/bench_loader.py --chart docs/img/loader.png   # + a chart (matplotlib)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


def _best(make: Callable[[], Any], repeats: int) -> tuple[float, int]:
    """Best wall time of a full pass over ``make()``, and its batch count."""
    best, count = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        count = 0
        for _ in make():
            count += 1
        best = min(best, time.perf_counter() - t0)
    return best, count


def cases(repeats: int, quick: bool, only_first: bool = False) -> list[dict[str, Any]]:
    import torch
    from torch.utils.data import DataLoader, Dataset, TensorDataset
    from torch.utils.data.distributed import DistributedSampler as TorchSampler

    import horovod_iter as hi

    b = hi.init()
    w, r = b.size, b.rank

    class Trivial(Dataset):
        def __init__(self, n: int) -> None:
            self.n = n

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> int:
            return i

    class PerSample(Dataset):
        def __init__(self, n: int) -> None:
            self.n = n

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> Any:
            end = time.perf_counter() + 50e-6
            while time.perf_counter() < end:
                pass
            return torch.full((16,), float(i))

    def theirs(ds: Any, bs: int, workers: int) -> Callable[[], Any]:
        sampler = TorchSampler(ds, w, r, shuffle=True, seed=0)
        dl = DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0)
        return lambda: dl

    def ours(ds: Any, bs: int, workers: int) -> Callable[[], Any]:
        ld = hi.DistributedLoader(ds, batch_size=bs, num_workers=workers, device="cpu",
                                  persistent_workers=workers > 0)
        return lambda: ld

    out = []
    k = 1 if quick else 3
    trivial = Trivial(k * 6000 * w)
    images = TensorDataset(torch.randint(0, 255, (k * 4 * 256 * w, 3, 224, 224),
                                         dtype=torch.uint8))
    python = PerSample(k * 12 * 64 * w)
    for name, unit, ds, bs, workers, per in [
        ("per step, trivial, batch 1, workers 0", "us/step", trivial, 1, 0, "step"),
        ("TensorDataset 3x224x224 u8, batch 256, workers 0", "GB/s", images, 256, 0, "bytes"),
        ("TensorDataset 3x224x224 u8, batch 256, workers 2", "GB/s", images, 256, 2, "bytes"),
        ("per-sample Python (~50 us), batch 64, workers 0", "samples/s", python, 64, 0,
         "samples"),
        ("per-sample Python (~50 us), batch 64, workers 2", "samples/s", python, 64, 2,
         "samples"),
    ][: 1 if only_first else None]:
        figures = {}
        for who, make in (("torch", theirs), ("ours", ours)):
            t, count = _best(make(ds, bs, workers), repeats)
            if per == "step":
                figures[who] = t / count * 1e6
            elif per == "bytes":
                figures[who] = len(ds) / w * ds[0][0].numel() / t / 1e9
            else:
                figures[who] = len(ds) / w / t
        ratio = figures["ours"] / figures["torch"]
        better = ratio if per != "step" else 1 / ratio
        out.append({"case": name, "unit": unit, **figures, "speedup": better})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ranks", type=int, default=0, help="also run on N ranks, both launchers")
    p.add_argument("--quick", action="store_true", help="smaller data (for smoke tests)")
    p.add_argument("--chart", help="write a bar chart of the speedups here (needs matplotlib)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        res = cases(a.repeats, False, only_first=True)
        import horovod_iter as hi

        if hi.init().rank == 0:
            print("RESULT " + json.dumps(res[0]), flush=True)
        return
    print(f"{os.cpu_count()} cores, torch DataLoader + DistributedSampler vs "
          f"horovod_iter.DistributedLoader, best of {a.repeats}")
    rows = [("local", 1, c) for c in cases(a.repeats, a.quick)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bindir = Path(sys.executable).parent
    me = [str(Path(__file__).resolve()), "--worker", "--repeats", str(a.repeats)]
    for launcher in (("horovod", "torch") if a.ranks else ()):
        cmd = ([str(bindir / "horovodrun"), "-np", str(a.ranks), "-H", f"localhost:{a.ranks}",
                "--gloo", sys.executable, *me] if launcher == "horovod" else
               [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={a.ranks}", *me])
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        line = next((ln for ln in out.stdout.splitlines() if "RESULT " in ln), None)
        if line is None:
            print(f"{launcher} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
            continue
        rows.append((launcher, a.ranks, json.loads(line.split("RESULT ", 1)[1])))
    print(f"{'launcher':>8} {'ranks':>5}  {'case':<50} {'unit':>9} {'DataLoader':>11} "
          f"{'ours':>11} {'speedup':>8}")
    for launcher, n, c in rows:
        print(f"{launcher:>8} {n:>5}  {c['case']:<50} {c['unit']:>9} {c['torch']:11.2f} "
              f"{c['ours']:11.2f} {c['speedup']:7.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps([{"launcher": ln, "ranks": n, **c}
                                            for ln, n, c in rows], indent=1))
    if a.chart:
        chart(rows, a.chart)


def chart(rows: list[tuple[str, int, dict[str, Any]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{c['case']} ({ln}, {n} rank{'s' if n > 1 else ''})" for ln, n, c in rows]
    speed = [c["speedup"] for _, _, c in rows]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    ax.barh(range(len(rows)), speed, color=["tab:green" if s >= 1 else "tab:red" for s in speed])
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xlim(0, max(speed) * 1.18)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over torch DataLoader + DistributedSampler (>1: ours faster)")
    for i, s in enumerate(speed):
        ax.text(s, i, f" {s:.2f}x", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
