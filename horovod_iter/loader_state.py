"""The loader's state dict: its keys, its validation, and the position of stateful iterable
data (every consumer's state, gathered over the ranks). A versioned, JSON-able contract."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from .backend import DEFAULT_TIMEOUT, Backend
from .sampler import is_int

__all__ = ["Resume", "check_dataset_state", "check_fingerprint", "gather_dataset_state",
           "position_digest", "validate"]

STATE_TYPE = "horovod_iter.DistributedLoader"
STATE_VERSION = 3  # 3: carries the source's fingerprint
TYPE, VERSION, EPOCH, STEPS, WORLD = "type", "version", "epoch", "steps", "world_size"
BATCH, GLOBAL_BATCH, UNEVEN_MODE = "batch_size", "global_batch_size", "uneven"
FINISHED, SAMPLES, SAMPLER, ITERATIONS = "finished", "samples", "sampler", "iterations"
MESSAGES, DATASET, BATCH_SAMPLER = "messages", "dataset", "batch_sampler"
FINGERPRINT = "fingerprint"
#: fields that count a rank's own passes and messages: not part of the position
_COUNTERS = (ITERATIONS, MESSAGES)


@dataclass
class Resume:
    """What the next ``iter()`` resumes (after a load): batches and samples already handed
    out in this epoch; our sampler keeps its own pending cursor alongside."""

    steps: int
    samples: int
    finished: bool
    dataset: Any = None  # a stateful iterable's saved state
    #: the loaded position, digested: every rank must start the pass from the same one
    digest: str | None = None


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def position_digest(state: Mapping[str, Any]) -> str:
    """A digest of a loaded state's position (without the rank's own counters): the ranks
    compare it when the resumed pass starts, so ranks resumed from different checkpoints
    (or a load on some ranks only) are refused instead of repeating or losing samples."""
    blob = json.dumps({k: v for k, v in state.items() if k not in _COUNTERS},
                      sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


def check_fingerprint(saved: Any, mine: Mapping[str, Any]) -> None:
    """Refuse a state saved for data dealt otherwise (another data kind, length, mix, shard
    list, seed...), naming each difference. States of version 1-2 carry none: accepted."""
    if saved is None:
        return
    if not isinstance(saved, Mapping):
        raise ValueError(f"invalid loader state: 'fingerprint' must be a dict, got {saved!r}")
    saved, here = _plain(saved), _plain(mine)
    diff = [f"{k}: saved {saved.get(k)!r}, this loader {here.get(k)!r}"
            for k in sorted(set(saved) | set(here)) if saved.get(k) != here.get(k)]
    if diff:
        raise ValueError(
            "loader state was saved for data dealt otherwise, so resuming from it would "
            "repeat or skip samples (" + "; ".join(diff) + "). Build the loader as the saving "
            "run did (the same dataset, sampler, weights, shards and seed), or start this "
            "data afresh without load_state_dict()")

def gather_dataset_state(dataset: Any, backend: Backend, consumers: int,
                         positions: Mapping[int, Any], base: Any = None,
                         agree: Callable[[], None] | None = None,
                         timeout: float | None = DEFAULT_TIMEOUT) -> Any:
    """A stateful iterable's position: every consumer's state as of the last batch handed
    out, gathered over the ranks (a collective: every rank calls it at the same step, which
    ``agree`` checks first). Datasets with ``elastic_state`` (``ShardedDataset``) merge them
    into one state."""
    states: list[Any] = [None] * consumers
    if backend.size > 1 and agree is not None:
        agree()
    parts = [dict(positions)] if backend.size == 1 else backend.allgather_object(
        dict(positions), timeout=timeout,
        what="the other ranks' dataset positions at state_dict()")
    for part in parts:
        for c, st in part.items():
            if c < consumers:
                states[c] = st
    merge = getattr(dataset, "merge_states", None)
    if getattr(dataset, "elastic_state", False) and callable(merge):
        return merge(states, consumers, base)
    return states


def check_dataset_state(dataset: Any, saved: Any, consumers: int) -> Any:
    """Validate a saved stateful-iterable position for this run; return what to resume."""
    if saved is None:
        return None
    if getattr(dataset, "elastic_state", False):
        dataset.load_state_dict(saved)  # validates; the workers get it at the next iter()
        dataset.load_state_dict(None)
        return saved
    if not isinstance(saved, list) or len(saved) != consumers:
        n = len(saved) if isinstance(saved, list) else "?"
        raise ValueError(
            f"loader state holds the dataset state of {n} consumers (ranks x workers), but "
            f"this run has {consumers}; a stateful IterableDataset resumes with the same world "
            "size and num_workers (horovod_iter.ShardedDataset resumes on any)")
    return saved


def validate(state: Any) -> dict[str, Any]:
    """Check a loader state's form; return a normalised copy or raise naming the fault."""
    if not isinstance(state, Mapping):
        raise TypeError(f"loader state must be a dict from state_dict(), got "
                        f"{type(state).__name__}")
    if state.get(TYPE) != STATE_TYPE:
        raise ValueError(f"not a horovod_iter loader state (type={state.get(TYPE)!r}); "
                         "pass the dict returned by DistributedLoader.state_dict()")
    if state.get(VERSION) not in (1, 2, STATE_VERSION):
        raise ValueError(f"loader state version {state.get(VERSION)!r} is not supported "
                         f"(expected 1 to {STATE_VERSION})")
    out = dict(state)
    out.setdefault(ITERATIONS, 0)
    out.setdefault(MESSAGES, 0)
    out.setdefault(SAMPLES, out.get(STEPS, 0) * out.get(BATCH, 0)
                   if is_int(out.get(STEPS)) and is_int(out.get(BATCH)) else 0)
    for key in (EPOCH, STEPS, WORLD, BATCH, ITERATIONS, MESSAGES, SAMPLES):
        if not is_int(out.get(key)) or out[key] < 0:
            raise ValueError(f"invalid loader state: {key!r} must be an int >= 0, "
                             f"got {out.get(key)!r}")
        out[key] = int(out[key])
    if not isinstance(out.get(FINISHED), bool):
        raise ValueError(f"invalid loader state: 'finished' must be a bool, "
                         f"got {out.get(FINISHED)!r}")
    return out
