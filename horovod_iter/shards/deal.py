"""The deal of `ShardedDataset`'s default layout, as pure functions: the epoch's shard order,
the shards each consumer reads in a pass (and from which record), the deal anew after a change
of layout, and the merge of the consumers' progress into one position.

A *consumer* is one DataLoader worker of one rank (``rank * workers + worker``; one per rank
without workers). Each epoch the shards are put in an order that is a pure function of
(seed, epoch) - `permute()`, the sampler's - identical on every rank with no communication,
and dealt round-robin to the consumers: shard at position ``p`` goes to consumer ``p mod C``.
Every shard is read by exactly one consumer, so the world reads the data once.

Position: a consumer reads its shards in order, so its progress is which entries of its plan
it finished and how many records it consumed of the open ones (`ConsumerState`). The merge of
all consumers' progress (`Position`) says which shards are done and where the ones in
progress stand. Resume:

* same consumer count, never dealt anew: every consumer continues its own shards where it
  stopped - exactly the uninterrupted stream;
* another consumer count (or a pass that was dealt anew): the shards in progress (continuing
  at their offsets), then the shards not started, in the epoch's order, are dealt anew over
  the consumers (`redeal`).

No I/O; the saved form of a `Position` (`Position.to_state`) is the JSON users' checkpoints
hold, unchanged since state version 2.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..permutation import permute

__all__ = ["STATE_TYPE", "STATE_VERSION", "ConsumerState", "Position", "deal", "merge",
           "plan", "redeal", "shard_order"]

STATE_TYPE = "horovod_iter.ShardedDataset"
STATE_VERSION = 2

#: one entry of a consumer's plan: (shard index, first record to read)
Entry = tuple[int, int]


def shard_order(n: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The epoch's order of ``n`` shards (indices): the sampler's `permute` of (seed, epoch),
    or ``0..n-1`` without ``shuffle``."""
    if not shuffle or not n:
        return list(range(n))
    order: list[int] = permute(np.arange(n), n, seed, epoch).tolist()
    return order


@dataclass(frozen=True)
class ConsumerState:
    """One consumer's progress through its plan in a pass: the plan entries it read to
    their end, the records consumed of the ones open (``(entry, offset)``: the offset within
    the shard), and the records it yielded (its draws)."""

    finished: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    yielded: int

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ConsumerState:
        """From a consumer's ``state_dict()`` (its other keys say who it was)."""
        return cls(tuple(state["finished"]), tuple((i, o) for i, o in state["offsets"]),
                   state["yielded"])


@dataclass(frozen=True)
class Position:
    """Where a pass of the default layout stands, merged over its consumers: the shards done,
    the records consumed of those in progress, each consumer's draws, and the deal that read
    them (``consumers``; ``redealt``: dealt anew since the epoch's start)."""

    epoch: int
    consumers: int
    redealt: bool
    done: frozenset[int]
    partial: Mapping[int, int]
    yielded: tuple[int, ...]

    def same_deal(self, consumers: int) -> bool:
        """Whether ``consumers`` continue this pass's own deal (each its own shards)."""
        return self.consumers == consumers and not self.redealt

    def to_state(self, shards: int, seed: int, shuffle: bool) -> dict[str, Any]:
        """The saved form (plain JSON; ``done`` as ``[start, stop)`` ranges)."""
        return {"type": STATE_TYPE, "version": STATE_VERSION, "epoch": self.epoch,
                "shards": shards, "seed": seed, "shuffle": shuffle,
                "consumers": self.consumers, "redealt": self.redealt,
                "done": _ranges(sorted(self.done)),
                "partial": sorted([s, o] for s, o in self.partial.items()),
                "yielded": list(self.yielded)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], shards: int, seed: int,
                   shuffle: bool) -> Position:
        """Validate a saved position against the dataset's ``shards`` (count), ``seed`` and
        ``shuffle``: a `ValueError` names what differs and what it expected."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"ShardedDataset state version {state.get('version')!r} is not "
                             f"supported (expected {STATE_VERSION})")
        for key, mine in (("shards", shards), ("seed", seed), ("shuffle", shuffle)):
            if state.get(key) != mine:
                raise ValueError(f"the ShardedDataset state was saved with {key}="
                                 f"{state.get(key)!r}, but this dataset has {key}={mine!r}; "
                                 f"build it with {key}={state.get(key)!r}")
        try:
            consumers = int(state["consumers"])
            done = {s for a, b in state["done"] for s in range(int(a), int(b))}
            partial = {int(s): int(o) for s, o in state["partial"]}
            yielded = [int(y) for y in state["yielded"]]
            ok = (consumers >= 1 and len(yielded) == consumers and all(
                0 <= s < shards for s in (*done, *partial)) and all(
                o >= 0 for o in partial.values())
                and isinstance(state["redealt"], bool) and int(state["epoch"]) >= 0)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError("invalid ShardedDataset state: expected 'consumers', 'done' "
                             "(ranges of shard indices), 'partial' ([shard, offset] pairs), "
                             "'yielded' (one per consumer), 'redealt' and 'epoch'")
        return cls(int(state["epoch"]), consumers, state["redealt"], frozenset(done), partial,
                   tuple(yielded))


def deal(order: Sequence[int], consumer: int, consumers: int) -> list[int]:
    """The shards ``consumer`` of ``consumers`` reads from an epoch's start: every
    ``consumers``-th of the order, round robin."""
    return list(order[consumer::consumers])


def redeal(order: Sequence[int], resume: Position) -> list[Entry]:
    """The shards left after ``resume``, as another layout deals them round robin: those in
    progress (continuing at their offsets), then those not started, in the epoch's order."""
    where = {s: p for p, s in enumerate(order)}
    todo = [(s, resume.partial[s]) for s in sorted(resume.partial, key=where.__getitem__)]
    todo += [(s, 0) for s in order if s not in resume.done and s not in resume.partial]
    return todo


def plan(order: Sequence[int], consumer: int, consumers: int,
         resume: Position | None = None) -> list[Entry]:
    """``consumer``'s (shard, first record) list for a pass over ``order`` that resumes from
    ``resume`` (a position of the same epoch; None: the epoch's start)."""
    if resume is None:
        return [(s, 0) for s in deal(order, consumer, consumers)]
    if resume.same_deal(consumers):
        # continue exactly where this consumer stopped: its own shards, minus the done ones
        return [(s, resume.partial.get(s, 0)) for s in deal(order, consumer, consumers)
                if s not in resume.done]
    return redeal(order, resume)[consumer::consumers]


def merge(order: Sequence[int], epoch: int, states: Sequence[ConsumerState | None],
          consumers: int, base: Position | None = None, replayed: bool = False) -> Position:
    """All ``consumers``' progress (``None``: nothing handed out yet) in a pass of ``epoch``
    over ``order`` that resumed from ``base`` (a base of another epoch counts as none), as
    one position - whatever the layout that made it. ``replayed``: the consumers replayed
    their streams from the epoch's start (a shuffle buffer), so their progress is counted
    against the epoch's fresh plan."""
    if base is not None and base.epoch != epoch:
        base = None
    done = set(base.done) if base else set()
    partial = dict(base.partial) if base else {}
    same = base is not None and base.consumers == consumers and not base.redealt
    for c, st in enumerate(states):
        if st is None:
            continue
        mine = plan(order, c, consumers, None if replayed else base)
        for i in st.finished:
            done.add(mine[i][0])
            partial.pop(mine[i][0], None)
        for i, offset in st.offsets:
            if offset > 0:
                partial[mine[i][0]] = offset
    redealt = base is not None and (base.redealt or base.consumers != consumers)
    # a consumer that handed nothing out since the resume is where the base left it
    return Position(epoch, consumers, redealt, frozenset(done), partial,
                    tuple(st.yielded if st else (base.yielded[c] if same and base else 0)
                          for c, st in enumerate(states)))


def _ranges(values: list[int]) -> list[list[int]]:
    """Sorted ints as [start, stop) ranges: a compact "which shards are done"."""
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][1] == v:
            out[-1][1] = v + 1
        else:
            out.append([v, v + 1])
    return out
