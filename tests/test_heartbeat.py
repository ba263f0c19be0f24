"""The heartbeat's period when our messages are slow (hosts far apart, Horovod's negotiation):
issue 22 row 9. On a fake clock, so that nothing here depends on the machine's load: a loop
with no collective of its own, whose step is 50 ms of compute, while each of our messages
takes 0.3 s (or 1.2 s) from issue to completion. Our waits must stay a few per cent of the
compute (before: the period shrank to one blocking message per step)."""
from __future__ import annotations

import types
from typing import Any

import pytest
import torch

import horovod_iter.sync as sync_mod
from horovod_iter.backend import AsyncHandle
from horovod_iter.sync import EndOfDataSync


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


class SlowHandle(AsyncHandle):
    """Completes ``latency`` fake seconds after it was issued; a wait blocks until then."""

    def __init__(self, clock: Clock, value: torch.Tensor, latency: float) -> None:
        super().__init__(None)
        self.clock, self.value, self.at = clock, value, clock.now + latency

    def _ready(self) -> bool:
        return self.clock.now >= self.at

    def _collect(self) -> Any:
        return self.value

    def wait(self, timeout: float | None = None, what: str = "") -> Any:
        self.clock.now = max(self.clock.now, self.at)  # blocking: time passes
        return super().wait(timeout, what)


class SlowWorld:
    """Rank 0 of 2 whose peer sends what it sends (the min of two equal messages)."""
    rank, size, name = 0, 2, "fake"

    def __init__(self, clock: Clock, latency: float) -> None:
        self.clock, self.latency, self.messages = clock, latency, 0

    def allreduce_async(self, tensor: torch.Tensor, op: str = "min", name: str = "") -> Any:
        self.messages += 1
        return SlowHandle(self.clock, tensor.clone(), self.latency)

    def fail(self, why: str) -> None:
        raise AssertionError(why)

    def adopt(self, handles: Any) -> None:
        list(handles)


@pytest.mark.parametrize("latency", [0.3, 1.2])
def test_slow_messages_cost_a_few_per_cent_of_a_step(monkeypatch, latency):
    clock = Clock()
    monkeypatch.setattr(sync_mod, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    world, steps, step_s = SlowWorld(clock, latency), 400, 0.05
    it = EndOfDataSync(iter(range(steps)), world, "pad", timeout=60,  # type: ignore[arg-type]
                       num_batches=steps)
    t0, seen = clock.now, 0
    for _ in it:
        clock.now += step_s  # the trainer's compute, no collective of its own
        seen += 1
    assert seen == steps
    compute = steps * step_s
    # the configuration check at the start and the confirmation at the end wait one message
    # each; the heartbeats in between must not add more than a few per cent
    overhead = (clock.now - t0 - compute - 2 * latency) / compute
    assert overhead < 0.05, (overhead, it.wait_s, world.messages)
    # and the others are still heard from: a message at least every 2 x latency
    assert world.messages >= compute / (2 * latency)


def test_a_fast_world_keeps_the_period_near_a_tenth_of_a_second(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(sync_mod, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    world, steps, step_s = SlowWorld(clock, 0.001), 400, 0.05
    for _ in EndOfDataSync(iter(range(steps)), world, "pad", timeout=60,  # type: ignore[arg-type]
                           num_batches=steps):
        clock.now += step_s
    # 20 s of steps, a message about every 0.1 s (2 steps)
    assert steps * step_s / 0.1 * 0.8 <= world.messages <= steps * step_s / 0.1 * 1.2 + 4


@pytest.mark.parametrize("kind", ["map", "iterable"])
def test_the_next_pass_starts_at_the_pace_the_last_one_settled_on(monkeypatch, kind):
    """Short passes between far hosts (an evaluation loop, small epochs) were mostly warm-up:
    each pass started at 8 steps a message, so with 1.2 s messages the third message waited
    ~1 s. A loader's passes share their message counter, which keeps the agreed period and
    the latency: from the second pass on only the configuration check and the end wait."""
    clock = Clock()
    monkeypatch.setattr(sync_mod, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    latency, steps, step_s = 1.2, 60, 0.05
    world, ops = SlowWorld(clock, latency), sync_mod.MessageCounter()
    extra = []
    for serial in range(3):
        t0, seen = clock.now, 0
        it = EndOfDataSync(iter(range(steps)), world, "stop", timeout=60,  # type: ignore[arg-type]
                           ops=ops, serial=serial,
                           num_batches=steps if kind == "map" else None)
        for _ in it:
            clock.now += step_s
            seen += 1
        assert seen == steps
        extra.append(clock.now - t0 - steps * step_s)
    # the first pass warms up (waits beyond the configuration check and the end); the next
    # ones start at its pace. Map-style data then waits for those two messages and nothing
    # else; iterable data still reports its first batches in the first message, whose wait
    # ends the look-ahead: about 2 latencies more (was 8.05 s on every pass)
    assert extra[0] > 2 * latency + 0.3, extra
    later = 2 * latency if kind == "map" else 4.5 * latency
    assert all(e <= later + 0.1 * steps * step_s for e in extra[1:]), extra
