"""Progress on rank 0 when asked for: a tqdm bar if tqdm is installed, log lines otherwise.

Everything goes through the ``horovod_iter`` logger (or tqdm's stderr bar); nothing is printed.
"""
from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["Progress", "format_stats"]

log = logging.getLogger("horovod_iter")


def format_stats(stats: dict[str, Any]) -> str:
    """One line of an iteration's figures, for logs."""
    return (f"{stats.get('steps', 0)} steps, {stats.get('samples', 0)} samples in "
            f"{stats.get('elapsed_s', 0.0):.2f} s; waited for data "
            f"{stats.get('data_wait_s', 0.0):.3f} s ("
            f"{100 * stats.get('input_bound_fraction', 0.0):.1f}% input-bound), end-of-data "
            f"check {stats.get('sync_wait_s', 0.0):.3f} s; host->device "
            f"{stats.get('h2d_bytes', 0) / 1e6:.1f} MB at {stats.get('h2d_gbps', 0.0):.2f} GB/s"
            + (f"; {stats['padded_steps']} padded steps" if stats.get("padded_steps") else ""))


class Progress:
    """Steps of one epoch on rank 0: a tqdm bar, or an INFO log line every ~10% (and at
    most every ``interval`` seconds) when tqdm is missing or ``use_tqdm`` is False."""

    def __init__(self, total: int | None, desc: str, enabled: bool,
                 use_tqdm: bool = True, interval: float = 10.0) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self._bar: Any = None
        self._n = 0
        self._every = max(1, -(-total // 10)) if total else 100
        self._interval = interval
        self._last = time.perf_counter()
        if not enabled:
            return
        if use_tqdm:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def update(self) -> None:
        if not self.enabled:
            return
        self._n += 1
        if self._bar is not None:
            self._bar.update(1)
            return
        now = time.perf_counter()
        if (self._n % self._every == 0 or self._n == self.total
                or now - self._last >= self._interval):
            self._last = now
            of = f"/{self.total}" if self.total else ""
            log.info("%s: step %d%s", self.desc, self._n, of)

    def close(self, stats: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        self.enabled = False
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if stats is not None:
            log.info("%s: %s", self.desc, format_stats(stats))
